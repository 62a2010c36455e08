"""``python -m musubi_tuner.demo --arch qwen_image``: the Qwen-Image pipeline on a tiny bundle, as a user types it.

T2I: cache latents → cache text → ``accelerate launch`` LoRA training with a sample → generate without and with the
LoRA → merge the LoRA → generate with the merged DiT. Edit (edit-2509, two control images per item): cache → train →
generate from two control images with the LoRA. Each step is its own process; logs go to ``<work>/logs``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musubi_tuner.demo.run_demo import ACCELERATE_CPU_CONFIG, _loss_trend, _module, _run, claim_work_dir
from musubi_tuner.utils.errors import UserError

PROMPT = "a red circle on a blue background"
EDIT_PROMPT = "put the shape of picture 2 into picture 1"


@dataclass
class QwenDemoResult:
    work_dir: Path
    lora: Path
    edit_lora: Path
    merged_dit: Path
    images: dict[str, Path]
    losses: list[float]
    lora_changes_output: float
    merged_matches_lora: float


def prepare_qwen_image(work_dir: str | os.PathLike, *, seed: int = 42):
    """The tiny bundle (``<work>/qwen_bundle``) and two datasets (``<work>/qwen_data/{t2i,edit}``)."""
    from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_bundle, write_qwen_image_dataset

    work = Path(work_dir).resolve()
    claim_work_dir(work)
    bundle = write_qwen_image_bundle(work / "qwen_bundle", seed=0)
    t2i = write_qwen_image_dataset(work / "qwen_data" / "t2i", n_images=4, size=(64, 64), batch_size=2, seed=seed)
    edit = write_qwen_image_dataset(work / "qwen_data" / "edit", n_images=2, size=(64, 64), controls=2, seed=seed + 1)
    print(f"tiny Qwen-Image bundle: {bundle.root}\nsynthetic datasets: {t2i.toml}, {edit.toml}")
    return bundle, t2i, edit


def _only_file(directory: Path) -> Path:
    files = sorted(directory.glob("*.png"))
    if len(files) != 1:
        raise UserError(f"{directory}: expected one image, found {len(files)}")
    return files[0]


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def run_qwen_image_demo(work_dir: str | os.PathLike, *, steps: int = 40, seed: int = 42) -> QwenDemoResult:
    work = Path(work_dir).resolve()
    print(f"demo work directory: {work}")
    bundle, t2i, edit = prepare_qwen_image(work, seed=seed)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    accelerate_config = work / "accelerate_cpu.yaml"
    accelerate_config.write_text(ACCELERATE_CPU_CONFIG, encoding="utf-8")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "-m"]

    def cache(ds, version: str, tag: str) -> None:
        common = ["--dataset_config", str(ds.toml), "--device", "cpu", "--model_version", version]
        _run(
            _module("musubi_tuner.qwen_image_cache_latents") + common + ["--vae", str(bundle.vae_file)],
            logs / f"{tag}_1_latents.log",
            env,
        )
        _run(
            _module("musubi_tuner.qwen_image_cache_text_encoder_outputs") + common + ["--text_encoder", str(bundle.text_encoder)],
            logs / f"{tag}_2_text.log",
            env,
        )

    def train(ds, version: str, out: Path, tag: str, extra: list[str]) -> Path:
        _run(
            launch
            + ["musubi_tuner.qwen_image_train_network", "--model_version", version, "--dit", str(bundle.dit)]
            + ["--dataset_config", str(ds.toml), "--network_module", "networks.lora_qwen_image", "--network_dim", "8"]
            + ["--learning_rate", "2e-3", "--optimizer_type", "AdamW", "--timestep_sampling", "qwen_shift"]
            + ["--mixed_precision", "no", "--max_train_steps", str(steps), "--seed", str(seed), "--output_dir", str(out)]
            + ["--output_name", "lora", "--dit_dtype", "float32", *extra],
            logs / f"{tag}_3_train.log",
            env,
        )
        lora = out / "lora.safetensors"
        if not lora.is_file():
            raise UserError(f"training finished but {lora} was not written (log: {logs / f'{tag}_3_train.log'})")
        return lora

    # -- T2I --------------------------------------------------------------------------------------------------------
    cache(t2i, "original", "t2i")
    prompts = work / "sample_prompts.txt"
    prompts.write_text(f"{PROMPT} --w 64 --h 64 --s 6 --d {seed}\n", encoding="utf-8")
    tracker = work / "tracker"
    lora = train(t2i, "original", work / "output", "t2i",
                 ["--vae", str(bundle.vae_file), "--text_encoder", str(bundle.text_encoder), "--sample_prompts", str(prompts),
                  "--sample_every_n_steps", str(max(1, steps // 2)), "--log_with", "jsonl", "--logging_dir", str(tracker)])  # fmt: skip
    gen = _module("musubi_tuner.qwen_image_generate_image") + [
        "--dit", str(bundle.dit), "--vae", str(bundle.vae_file), "--text_encoder", str(bundle.text_encoder),
        "--prompt", PROMPT, "--image_size", "64", "64", "--infer_steps", "6", "--seed", str(seed), "--device", "cpu",
    ]  # fmt: skip
    out = work / "images"
    _run(gen + ["--save_path", str(out / "base")], logs / "t2i_4_generate_base.log", env)
    _run(gen + ["--lora_weight", str(lora), "--save_path", str(out / "lora")], logs / "t2i_5_generate_lora.log", env)
    merged = work / "merged" / "qwen_image_tiny_lora.safetensors"
    merged.parent.mkdir(exist_ok=True)
    _run(
        _module("musubi_tuner.merge_lora")
        + ["--dit", str(bundle.dit), "--lora_weight", str(lora), "--save_merged_model", str(merged), "--no_progress"],
        logs / "t2i_6_merge.log",
        env,
    )
    merged_gen = [str(merged) if c == str(bundle.dit) else c for c in gen]
    _run(merged_gen + ["--save_path", str(out / "merged")], logs / "t2i_7_generate_merged.log", env)

    # -- Edit (2509, two controls) ----------------------------------------------------------------------------------
    cache(edit, "edit-2509", "edit")
    edit_lora = train(edit, "edit-2509", work / "output_edit", "edit", [])
    controls = sorted(edit.control_dir.glob("img_00_*.png"))
    _run(
        _module("musubi_tuner.qwen_image_generate_image")
        + ["--model_version", "edit-2509", "--dit", str(bundle.dit), "--vae", str(bundle.vae_file)]
        + ["--text_encoder", str(bundle.text_encoder), "--prompt", EDIT_PROMPT, "--control_image_path", *map(str, controls)]
        + ["--image_size", "64", "64", "--infer_steps", "6", "--seed", str(seed), "--device", "cpu"]
        + ["--resize_control_to_image_size", "--lora_weight", str(edit_lora), "--save_path", str(out / "edit")],
        logs / "edit_4_generate.log",
        env,
    )
    images = {name: _only_file(out / name) for name in ("base", "lora", "merged", "edit")}
    px = {k: _pixels(v) for k, v in images.items()}
    return QwenDemoResult(
        work_dir=work,
        lora=lora,
        edit_lora=edit_lora,
        merged_dit=merged,
        images=images,
        losses=_loss_trend(tracker),
        lora_changes_output=float(np.abs(px["base"] - px["lora"]).mean()),
        merged_matches_lora=float(np.abs(px["lora"] - px["merged"]).mean()),
    )


def print_qwen_summary(result: QwenDemoResult) -> None:
    losses = result.losses
    print("\n=== Blissful Tuner demo (Qwen-Image): done ===")
    if losses:
        q = max(1, len(losses) // 4)
        print(f"training loss: first {q} steps mean {sum(losses[:q]) / q:.4f} → last {q} steps mean {sum(losses[-q:]) / q:.4f}")
    print(f"LoRA (T2I):      {result.lora}\nLoRA (edit-2509): {result.edit_lora}\nmerged DiT:      {result.merged_dit}")
    for name, path in result.images.items():
        print(f"image ({name}):{' ' * (9 - len(name))}{path}")
    print(f"mean |pixel difference| base vs LoRA: {result.lora_changes_output:.2f} / 255")
    print(f"mean |pixel difference| LoRA-on-load vs merged DiT: {result.merged_matches_lora:.2f} / 255")
    print(f"logs of every step: {result.work_dir / 'logs'}")
