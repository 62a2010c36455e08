"""GPU calibration of the memory estimator's constants (specs/memory_estimator.md §9). Needs one CUDA GPU, < 5 min.

Usage: python bench/memory_calibration.py [--out src/musubi_tuner/memory/calibration.json] [--tokens 4096,16384]

Random-weight Kandinsky 5 Lite DiT (real size; no checkpoint: a sparse header file gives the estimator the shapes and
the GPU model gets ``normal_`` weights), LoRA rank 32, AdamW, bf16 autocast. Per grid point: 2 warm-up steps,
``reset_peak_memory_stats``, 1 measured step; recorded: ``max_memory_allocated`` / ``max_memory_reserved``, NVML used
(polled every 10 ms), and in the same process the estimator's traced peak of the same configuration. Written: the
ratios allocated/traced, reserved/allocated (slack), NVML − reserved (context), the cuBLAS workspace and the
attention workspace coefficient, keyed by GPU name, compute capability, torch and CUDA versions. The estimator uses
the entry whose GPU name matches ``nvidia-smi`` and says so in its report.

Status: written without access to a GPU; not run yet (the estimator reports "calibration: default constants").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def nvml_used_mib() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


class NvmlPeak:
    """Poll NVML used memory every 10 ms while active."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> NvmlPeak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, nvml_used_mib())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("src/musubi_tuner/memory/calibration.json"))
    parser.add_argument("--tokens", type=str, default="4096,16384")
    parser.add_argument("--task", type=str, default="k5-lite-t2v-5s-sd")
    args = parser.parse_args()
    before = nvml_used_mib()  # other processes, before this one touches CUDA

    import torch
    import torch.nn.functional as F
    from memory_table import write_sparse_checkpoint

    from musubi_tuner.kandinsky5.configs import dit_params_for, get_task_config
    from musubi_tuner.kandinsky5.memory import MEMORY_HOOKS
    from musubi_tuner.kandinsky5_train_network import Kandinsky5NetworkTrainer, setup_parser
    from musubi_tuner.memory.estimate import TrainingEstimator
    from musubi_tuner.memory.formulas import DEFAULT_CALIBRATION, MiB
    from musubi_tuner.memory.hooks import StepShape
    from musubi_tuner.memory.training import Settings

    dims = dit_params_for(get_task_config(args.task))

    torch.cuda.init()
    dev = torch.device("cuda")
    a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    r0 = torch.cuda.memory_reserved()
    (a @ a).sum().item()
    cublas = torch.cuda.memory_reserved() - r0
    q = torch.randn(1, 8, 1024, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    F.scaled_dot_product_attention(q, q, q).sum().backward()
    torch.cuda.synchronize()
    context = (nvml_used_mib() - before) * MiB - torch.cuda.memory_reserved()
    del a, q
    torch.cuda.empty_cache()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_sparse_checkpoint(args.task, Path(tmp) / "dit.safetensors")
        argv = ["--task", args.task, "--dit", str(ckpt), "--dataset_config", "unused.toml", "--network_module",
                "networks.lora_kandinsky", "--network_dim", "32", "--output_dir", tmp, "--output_name", "x"]  # fmt: skip
        targs = setup_parser().parse_args(argv)
        trainer = Kandinsky5NetworkTrainer()
        trainer._validate_and_init(targs)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            f = tokens // (32 * 32)
            shape = StepShape(1, (16, f, 64, 64), 256, details={"latent_dtype": "F32", "text_dim": 3584, "pooled_dim": 768,
                                                                 "text_dtype": "BF16"})  # fmt: skip
            est = TrainingEstimator(trainer, targs, MEMORY_HOOKS, shape, DEFAULT_CALIBRATION)
            for gc in (True, False) if tokens <= 4096 else (True,):
                for fp8 in (False, True):
                    s = Settings(mixed_precision="bf16", gradient_checkpointing=gc, fp8=fp8)
                    traced = est.predict(s).trace.result.peak
                    measured = _measure(trainer, targs, est, s, dev)
                    heads, head_dim = dims["model_dim"] // sum(dims["axes_dims"]), sum(dims["axes_dims"])
                    run = {"tokens": tokens, "gc": gc, "fp8": fp8, "traced": traced, **measured}
                    run["allocated_over_traced"] = measured["allocated"] / traced
                    run["slack"] = measured["reserved"] / measured["allocated"] - 1
                    run["attention_coefficient"] = (measured["allocated"] - traced - cublas) / (4 * heads * tokens * head_dim)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    entry = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "constants": {
            "cuda_context": int(context),
            "cublas_workspace": int(cublas),
            "slack": max(r["slack"] for r in runs),
            "attention_dq_coefficient": max(0.0, max(r["attention_coefficient"] for r in runs)),
        },
        "runs": runs,
    }
    table = json.loads(args.out.read_text()) if args.out.is_file() else []
    table = [e for e in table if e.get("gpu") != entry["gpu"]] + [entry]
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out} ({entry['gpu']})")


def _measure(trainer, targs, est, settings, dev) -> dict:
    """One real step of the same configuration on the GPU (random weights): allocator and NVML peaks."""
    import torch

    from musubi_tuner.hv_train_network import _Run
    from musubi_tuner.memory.training import TraceAccelerator, _trace_args
    from musubi_tuner.training.noise import apply_noise_options
    from musubi_tuner.utils.safetensors_utils import header_only_reads

    a = _trace_args(targs, settings, None)
    run = _Run(args=a)
    acc = TraceAccelerator(settings.mixed_precision)
    acc.device = dev
    acc.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    run.accelerator = acc
    trainer._resolve_dit_dtypes(run)
    with header_only_reads():  # shapes from the sparse header; values: random, initialised below
        trainer._load_dit(run)
    for t in [*run.transformer.parameters(), *run.transformer.buffers()]:
        if t.is_floating_point() and t.dtype.itemsize > 1:
            t.data.normal_(0, 0.02)
    trainer._create_network(run)
    run.transformer.train() if a.gradient_checkpointing else run.transformer.eval()
    run.network.prepare_grad_etc(run.transformer)
    params = list(run.network.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    shape = est.shape
    traced_dit, _ = est.hooks.prepare_trace(trainer, run.transformer)

    def step():
        with torch.device(dev):
            batch = est.hooks.make_fake_batch(a, shape)
        batch = {k: ([t.normal_() for t in v] if isinstance(v, list) else v.normal_()) for k, v in batch.items()}
        latents = batch["latents"]
        noise = apply_noise_options(a, latents, torch.randn_like(latents))
        with acc.autocast():
            loss, _ = trainer.process_batch(a, acc, traced_dit, latents, batch, noise, run.network_dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with NvmlPeak() as nv:
        step()
        torch.cuda.synchronize()
    out = {
        "allocated": torch.cuda.max_memory_allocated(),
        "reserved": torch.cuda.max_memory_reserved(),
        "nvml_peak_mib": nv.peak,
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
    }
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
