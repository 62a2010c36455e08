"""Real-size memory estimates for docs/memory.md (the table between the ``memory-table`` markers), and the speed of a
real-size estimate (specs/memory_estimator.md §10 test 7).

Usage: python bench/memory_table.py [--write docs/memory.md] [--rows lite|all] [--arch kandinsky5|flux_2|wan|qwen_image]

No weights are needed: for each variant a *sparse* safetensors file is written whose header declares the official
checkpoint's keys, shapes and dtypes (bf16) and whose data region is a hole (no disk space, never read). The estimator
reads only that header — exactly what it reads of a real checkpoint — and traces the trainer's step on fake tensors.
The step shape is given directly (no dataset), batch 1, LoRA rank 32 on the default targets, AdamW: Kandinsky 5 512x512
px, 61 frames (latent 16x16x64x64, 16 384 tokens), 256 text tokens; FLUX.2 1024x1024 px (4096 image tokens), 512 text
tokens, no reference image; Wan 832x480 px, 81 frames (latent 16x21x60x104, 32 760 tokens), 256 text tokens;
Qwen-Image 1024x1024 px (4096 image tokens; Edit-2509 + one 1024x1024 control: 8192), 256 text tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from musubi_tuner.memory.estimate import TrainingEstimator, budget
from musubi_tuner.memory.formulas import DEFAULT_CALIBRATION, GiB
from musubi_tuner.memory.hooks import StepShape, load_hooks
from musubi_tuner.memory.training import Settings, quiet_logs

GC_FP8 = Settings(mixed_precision="bf16", gradient_checkpointing=True, fp8=True)
ROWS = [
    # (task or model version, label, settings); the architecture comes from the task (ARCH_OF)
    ("k5-lite-t2v-5s-sd", "Lite, GC, bf16 autocast", Settings(mixed_precision="bf16", gradient_checkpointing=True)),
    ("k5-lite-t2v-5s-sd", "Lite, GC + fp8", Settings(mixed_precision="bf16", gradient_checkpointing=True, fp8=True)),
    ("k5-lite-t2v-5s-sd", "Lite, fp8, no GC", Settings(mixed_precision="bf16", fp8=True)),
    ("k5-pro-t2v-5s-sd", "Pro, GC + fp8", Settings(mixed_precision="bf16", gradient_checkpointing=True, fp8=True)),
    (
        "k5-pro-t2v-5s-sd",
        "Pro, GC + fp8 + swap 40",
        Settings(mixed_precision="bf16", gradient_checkpointing=True, fp8=True, blocks_to_swap=40),
    ),
    ("klein-9b", "FLUX.2 klein 9B, GC, bf16 autocast", Settings(mixed_precision="bf16", gradient_checkpointing=True)),
    ("dev", "FLUX.2 dev, GC + fp8", GC_FP8),
    ("dev", "FLUX.2 dev, GC + fp8 + swap 20", replace(GC_FP8, blocks_to_swap=20)),
    ("t2v-1.3B", "Wan 2.1 T2V 1.3B, GC, bf16 autocast", Settings(mixed_precision="bf16", gradient_checkpointing=True)),
    ("t2v-14B", "Wan 2.1 T2V 14B, GC + fp8", GC_FP8),
    ("t2v-14B", "Wan 2.1 T2V 14B, GC + fp8 + swap 20", replace(GC_FP8, blocks_to_swap=20)),
    ("qi:original", "Qwen-Image, GC + fp8", GC_FP8),
    ("qi:original", "Qwen-Image, GC + fp8 + swap 16", replace(GC_FP8, blocks_to_swap=16)),
    ("qi:edit-2509", "Qwen-Image Edit-2509 + 1 control, GC + fp8", GC_FP8),
]
SIZES = (24, 48, 80)
LATENT = (16, 16, 64, 64)
TEXT_LEN = 256


def arch_of(task: str) -> str:
    if task.startswith("qi:"):  # Qwen-Image model versions ("original", "edit-2509") get a prefix: names are not unique
        return "qwen_image"
    if task.startswith("k5-"):
        return "kandinsky5"
    return "flux_2" if task in ("dev",) or task.startswith("klein") else "wan"


def _meta_model(task: str) -> torch.nn.Module:
    """The architecture's DiT for ``task`` at its released dims, on the meta device (official state-dict keys)."""
    arch = arch_of(task)
    with torch.device("meta"):
        if arch == "kandinsky5":
            from musubi_tuner.kandinsky5.configs import dit_params_for, get_task_config
            from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

            return DiffusionTransformer3D(**dit_params_for(get_task_config(task)))
        if arch == "flux_2":
            from musubi_tuner.flux_2.configs import dit_params_for
            from musubi_tuner.flux_2.models.dit import Flux2

            return Flux2(**dit_params_for(task))
        if arch == "qwen_image":
            from musubi_tuner.qwen_image.configs import dit_params_for
            from musubi_tuner.qwen_image.models.dit import QwenImageTransformer

            return QwenImageTransformer(**dit_params_for(task[3:]))
        from musubi_tuner.wan.configs import dit_params_for, get_task_config
        from musubi_tuner.wan.models.dit import WanModel

        return WanModel(**dit_params_for(get_task_config(task)))


def _trainer_and_args(task: str, dit: Path, tmp: str):
    """The architecture's trainer after argument validation, for a command line naming ``dit``."""
    arch = arch_of(task)
    common = ["--dit", str(dit), "--dataset_config", "unused.toml", "--network_dim", "32", "--network_alpha", "32",
              "--output_dir", tmp, "--output_name", "x", "--max_data_loader_n_workers", "2"]  # fmt: skip
    if arch == "kandinsky5":
        from musubi_tuner.kandinsky5_train_network import Kandinsky5NetworkTrainer as Trainer
        from musubi_tuner.kandinsky5_train_network import setup_parser

        argv = ["--task", task, "--network_module", "networks.lora_kandinsky", *common]
    elif arch == "flux_2":
        from musubi_tuner.flux_2_train_network import Flux2NetworkTrainer as Trainer
        from musubi_tuner.flux_2_train_network import setup_parser

        argv = ["--model_version", task, "--network_module", "networks.lora_flux_2", *common]
    elif arch == "qwen_image":
        from musubi_tuner.qwen_image_train_network import QwenImageNetworkTrainer as Trainer
        from musubi_tuner.qwen_image_train_network import setup_parser

        argv = ["--model_version", task[3:], "--network_module", "networks.lora_qwen_image", *common]
    else:
        from musubi_tuner.wan.trainer import WanNetworkTrainer as Trainer
        from musubi_tuner.wan_train_network import setup_parser

        argv = ["--task", task, "--network_module", "networks.lora_wan", *common]
    args = setup_parser().parse_args(argv)
    trainer = Trainer()
    trainer._validate_and_init(args)
    return trainer, args


def _step_shape(task: str) -> StepShape:
    arch = arch_of(task)
    if arch == "kandinsky5":
        details = {"latent_dtype": "F32", "text_dim": 3584, "pooled_dim": 768, "text_dtype": "BF16"}
        return StepShape(batch=1, latent=LATENT, text_len=TEXT_LEN, details=details)
    if arch == "flux_2":
        from musubi_tuner.flux_2.configs import get_model_version

        ctx = get_model_version(task).context_in_dim
        details = {"latent_dtype": "F32", "references": [], "reference_dtypes": [], "text_dim": ctx, "text_dtype": "BF16"}
        return StepShape(batch=1, latent=(128, 64, 64), text_len=512, details=details)
    if arch == "qwen_image":
        controls = [[16, 1, 128, 128]] if task == "qi:edit-2509" else []
        details = {"latent_dtype": "BF16", "controls": controls, "control_dtypes": ["BF16"] * len(controls),
                   "text_dim": 3584, "text_dtype": "F32"}  # fmt: skip
        return StepShape(batch=1, latent=(16, 1, 128, 128), text_len=TEXT_LEN, details=details)
    details = {"latent_dtype": "BF16", "text_dim": 4096, "text_dtype": "BF16"}
    return StepShape(batch=1, latent=(16, 21, 60, 104), text_len=TEXT_LEN, details=details)


def write_sparse_checkpoint(task: str, path: Path) -> Path:
    """A safetensors file with the official keys/shapes (bf16) whose data is a hole (header only on disk)."""
    model = _meta_model(task)
    header, offset = {}, 0
    for key, t in model.state_dict().items():
        n = t.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def estimate_rows(rows=ROWS) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp, quiet_logs():
        ckpts: dict[str, Path] = {}
        estimators: dict[str, TrainingEstimator] = {}
        for task, label, settings in rows:
            if task not in ckpts:
                ckpts[task] = write_sparse_checkpoint(task, Path(tmp) / f"{task}.safetensors")
                trainer, args = _trainer_and_args(task, ckpts[task], tmp)
                hooks = load_hooks(arch_of(task))
                estimators[task] = TrainingEstimator(trainer, args, hooks, _step_shape(task), DEFAULT_CALIBRATION)
            t0 = time.time()
            pred = estimators[task].predict(settings)
            out.append(
                {
                    "label": label,
                    "task": task,
                    "flags": " ".join(settings.flags()),
                    "traced": pred.trace.result.peak,
                    "predicted": pred.predicted_peak,
                    "host": pred.host["peak"],
                    "seconds": time.time() - t0,
                }
            )
            print(f"{label}: predicted {pred.predicted_peak / GiB:.2f} GiB ({time.time() - t0:.1f} s)", file=sys.stderr)
    return out


def table(rows: list[dict]) -> str:
    head = "| Variant / settings | Flags | traced (GiB) | predicted GPU (GiB) | host peak (GiB) | " + " | ".join(
        f"{s} GB" for s in SIZES
    )
    lines = [head + " |", "|" + "---|" * (5 + len(SIZES))]
    for r in rows:
        verdicts = ["fits" if r["predicted"] <= budget(s * GiB, 0.05) else "no" for s in SIZES]
        lines.append(
            f"| {r['label']} | `{r['flags']}` | {r['traced'] / GiB:.2f} | {r['predicted'] / GiB:.2f} | {r['host'] / GiB:.1f} | "
            + " | ".join(verdicts)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="replace the table between the memory-table markers")
    parser.add_argument("--rows", choices=("lite", "all"), default="all")
    parser.add_argument(
        "--arch", choices=("kandinsky5", "flux_2", "wan", "qwen_image"), default=None, help="only this architecture's rows"
    )
    args = parser.parse_args()
    rows = [r for r in ROWS if (args.rows == "all" or "lite" in r[0]) and (args.arch is None or arch_of(r[0]) == args.arch)]
    result = estimate_rows(rows)
    text = table(result)
    timing = ", ".join(f"{r['label']} {r['seconds']:.0f} s" for r in result)
    print(text)
    print(f"\nseconds per estimate (trace + formulas; a row reuses its variant's traces): {timing}")
    if args.write:
        doc = args.write.read_text()
        new = re.sub(
            r"(<!-- memory-table:start -->\n).*?(\n<!-- memory-table:end -->)",
            lambda m: m.group(1) + text + m.group(2),
            doc,
            flags=re.S,
        )
        args.write.write_text(new)


if __name__ == "__main__":
    main()
