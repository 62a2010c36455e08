"""``python -m musubi_tuner.demo --arch flux_2``: the FLUX.2 pipeline on tiny bundles through the real command lines.

klein-style (with reference images): cache latents + references → cache Qwen3 text → ``accelerate launch`` LoRA
training (batch size 2, samples with a reference) → generate without and with the LoRA (editing with a reference)
→ merge → generate with the merged DiT. dev-style: generate with the Mistral 3 encoder in fp8 and dev's embedded
guidance (training dev works the same way; the tests cover it). Prints each command, the loss trend and where every output is.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musubi_tuner.demo.run_demo import ACCELERATE_CPU_CONFIG, _loss_trend, _module, _run, claim_work_dir
from musubi_tuner.utils.errors import UserError

PROMPT = "a red circle standing still on a dark background"


@dataclass
class Flux2DemoResult:
    work_dir: Path
    lora: Path
    merged_dit: Path
    images: dict[str, Path]
    samples: list[Path]
    losses: list[float]
    lora_changes_output: float
    merged_matches_lora: float


def prepare_flux2(work_dir: str | os.PathLike, *, seed: int = 42):
    """Write the tiny FLUX.2 bundle (``<work>/bundle``) and the editing dataset (``<work>/data``)."""
    from musubi_tuner.demo.flux2_bundles import write_flux2_bundle
    from musubi_tuner.demo.flux2_data import write_flux2_dataset

    work = Path(work_dir).resolve()
    claim_work_dir(work)
    bundle = write_flux2_bundle(work / "bundle", seed=0)
    data_dir = work / "data"
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    data = write_flux2_dataset(data_dir, seed=seed)
    print(
        f"tiny FLUX.2 bundle: {bundle.root}\ndataset with reference images: {data.root} (configs {data.edit_toml}, {data.t2i_toml})"
    )
    return bundle, data


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def _single_png(directory: Path) -> Path:
    pngs = sorted(directory.glob("*.png"))
    if len(pngs) != 1:
        raise UserError(f"{directory}: expected one generated PNG, found {len(pngs)}")
    return pngs[0]


def run_flux2_demo(work_dir: str | os.PathLike, *, steps: int = 40, seed: int = 42) -> Flux2DemoResult:
    work = Path(work_dir).resolve()
    print(f"demo work directory: {work}")
    bundle, data = prepare_flux2(work, seed=seed)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    accelerate_config = work / "accelerate_cpu.yaml"
    accelerate_config.write_text(ACCELERATE_CPU_CONFIG, encoding="utf-8")
    reference = data.control_dir / "still_000_0.png"

    _run(
        _module("musubi_tuner.flux_2_cache_latents")
        + ["--dataset_config", str(data.edit_toml), "--vae", str(bundle.vae), "--device", "cpu"],
        logs / "1_cache_latents.log",
        env,
    )
    _run(
        _module("musubi_tuner.flux_2_cache_text_encoder_outputs")
        + ["--dataset_config", str(data.edit_toml), "--model_version", "klein-4b", "--text_encoder", str(bundle.text_encoder_qwen3)]
        + ["--device", "cpu"],
        logs / "2_cache_text.log",
        env,
    )
    prompts = work / "sample_prompts.txt"
    prompts.write_text(f"{PROMPT} --w 64 --h 64 --s 4 --d {seed} --ci {reference}\n", encoding="utf-8")
    output_dir, tracker_dir = work / "output", work / "tracker"
    train = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "-m"]
    _run(
        train
        + ["musubi_tuner.flux_2_train_network", "--model_version", "klein-4b", "--dit", str(bundle.dit_klein)]
        + ["--vae", str(bundle.vae), "--text_encoder", str(bundle.text_encoder_qwen3), "--dataset_config", str(data.edit_toml)]
        + ["--network_module", "networks.lora_flux_2", "--network_dim", "16", "--network_alpha", "16"]
        + ["--learning_rate", "2e-3", "--optimizer_type", "AdamW", "--timestep_sampling", "flux2_shift", "--mixed_precision", "no"]
        + ["--max_train_steps", str(steps), "--seed", str(seed), "--sample_prompts", str(prompts)]
        + ["--sample_every_n_steps", str(max(1, steps // 2)), "--sample_at_first", "--output_dir", str(output_dir)]
        + ["--output_name", "klein_lora", "--log_with", "jsonl", "--logging_dir", str(tracker_dir)],
        logs / "3_train_klein.log",
        env,
    )
    lora = output_dir / "klein_lora.safetensors"
    generate = (
        _module("musubi_tuner.flux_2_generate_image")
        + ["--model_version", "klein-4b", "--dit", str(bundle.dit_klein), "--vae", str(bundle.vae)]
        + ["--text_encoder", str(bundle.text_encoder_qwen3), "--prompt", PROMPT, "--image_size", "64", "64"]
        + ["--control_image_path", str(reference), "--seed", str(seed), "--device", "cpu"]
    )
    images_dir = work / "images"
    _run(generate + ["--save_path", str(images_dir / "base")], logs / "4_generate_base.log", env)
    _run(generate + ["--lora_weight", str(lora), "--save_path", str(images_dir / "lora")], logs / "5_generate_lora.log", env)
    merged = work / "merged" / "flux2_klein_tiny_lora.safetensors"
    merged.parent.mkdir(exist_ok=True)
    _run(
        _module("musubi_tuner.merge_lora")
        + ["--dit", str(bundle.dit_klein), "--lora_weight", str(lora), "--save_merged_model", str(merged), "--no_progress"],
        logs / "6_merge.log",
        env,
    )
    merged_generate = [str(merged) if c == str(bundle.dit_klein) else c for c in generate]
    _run(merged_generate + ["--save_path", str(images_dir / "merged")], logs / "7_generate_merged.log", env)

    # dev-style: Mistral 3 text encoder in fp8, embedded guidance, the klein LoRA's dev sibling is not trained here
    _run(
        _module("musubi_tuner.flux_2_generate_image")
        + [
            "--model_version",
            "dev",
            "--dit",
            str(bundle.dit_dev),
            "--vae",
            str(bundle.vae),
            "--text_encoder",
            str(bundle.text_encoder_mistral3),
        ]
        + [
            "--fp8_text_encoder",
            "--prompt",
            PROMPT,
            "--image_size",
            "64",
            "64",
            "--infer_steps",
            "8",
            "--embedded_cfg_scale",
            "4.0",
        ]
        + ["--seed", str(seed), "--device", "cpu", "--save_path", str(images_dir / "dev")],
        logs / "8_generate_dev.log",
        env,
    )
    images = {name: _single_png(images_dir / name) for name in ("base", "lora", "merged", "dev")}
    px = {name: _pixels(p) for name, p in images.items()}
    return Flux2DemoResult(
        work_dir=work,
        lora=lora,
        merged_dit=merged,
        images=images,
        samples=sorted((output_dir / "sample").glob("*")),
        losses=_loss_trend(tracker_dir),
        lora_changes_output=float(np.abs(px["base"] - px["lora"]).mean()),
        merged_matches_lora=float(np.abs(px["lora"] - px["merged"]).mean()),
    )


def print_flux2_summary(result: Flux2DemoResult) -> None:
    losses = result.losses
    print("\n=== Blissful Tuner FLUX.2 demo: done ===")
    if losses:
        q = max(1, len(losses) // 4)
        first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
        print(f"klein training loss: first {q} steps mean {first:.4f} → last {q} steps mean {last:.4f}")
    print(f"klein LoRA:      {result.lora}")
    print(f"merged DiT:      {result.merged_dit}")
    for name, path in result.images.items():
        print(f"image ({name}):{' ' * (9 - len(name))}{path}")
    for path in result.samples:
        print(f"training sample: {path}")
    print(f"mean |pixel difference| base vs LoRA: {result.lora_changes_output:.2f} / 255")
    print(f"mean |pixel difference| LoRA-on-load vs merged DiT: {result.merged_matches_lora:.2f} / 255")
    print(f"logs of every step: {result.work_dir / 'logs'}")
