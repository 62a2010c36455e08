"""``python -m musubi_tuner.demo --arch wan``: the Wan pipeline on tiny official-format bundles, as the user types it.

T2V (``t2v-1.3B``): cache latents → cache T5 → ``accelerate launch`` LoRA training → generate without / with the LoRA
→ merge → generate with the merged DiT. Two experts (``i2v-A14B``): cache with ``--i2v`` → train ``--expert both``
(one run, two LoRAs ``<name>_high_noise`` / ``<name>_low_noise``) → generate an I2V clip with both LoRAs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musubi_tuner.demo.run_demo import ACCELERATE_CPU_CONFIG, _loss_trend, _module, _run, _video_frames, claim_work_dir
from musubi_tuner.utils.errors import UserError

PROMPT = "a red circle moving to the right on a dark background"


@dataclass
class WanDemoResult:
    work_dir: Path
    lora: Path
    expert_loras: list[Path]
    merged_dit: Path
    videos: dict[str, Path]
    losses: list[float]
    lora_changes_output: float
    merged_matches_lora: float


def prepare_wan(work_dir: str | os.PathLike, *, seed: int = 42):
    """Write ``<work>/bundle_t2v``, ``<work>/bundle_i2v_a14b`` and the synthetic dataset ``<work>/data``."""
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.demo.wan_bundle import write_wan_bundle

    work = Path(work_dir).resolve()
    claim_work_dir(work)
    t2v = write_wan_bundle(work / "bundle_t2v", task="t2v-1.3B", seed=0)
    a14b = write_wan_bundle(work / "bundle_i2v_a14b", task="i2v-A14B", seed=0)
    data = write_synthetic_video_dataset(work / "data", n_videos=4, frames=17, size=(64, 64), seed=seed, overwrite=True)
    print(f"tiny Wan bundles: {t2v.root} (t2v-1.3B), {a14b.root} (i2v-A14B)\nsynthetic dataset: {data.root} ({data.video_toml})")
    return t2v, a14b, data


def run_wan_demo(work_dir: str | os.PathLike, *, steps: int = 30, seed: int = 42) -> WanDemoResult:
    work = Path(work_dir).resolve()
    print(f"demo work directory: {work}")
    t2v, a14b, data = prepare_wan(work, seed=seed)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cfg = str(data.video_toml)

    _run(
        _module("musubi_tuner.wan_cache_latents") + ["--dataset_config", cfg, "--vae", str(t2v.vae), "--i2v", "--device", "cpu"],
        logs / "1_cache_latents.log",
        env,
    )
    _run(
        _module("musubi_tuner.wan_cache_text_encoder_outputs") + ["--dataset_config", cfg, "--t5", str(t2v.t5), "--device", "cpu"],
        logs / "2_cache_text.log",
        env,
    )

    accelerate_config = work / "accelerate_cpu.yaml"
    accelerate_config.write_text(ACCELERATE_CPU_CONFIG, encoding="utf-8")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "-m",
        "musubi_tuner.wan_train_network",
    ]
    train = ["--dataset_config", cfg, "--network_module", "networks.lora_wan", "--network_dim", "16", "--network_alpha", "16",
             "--learning_rate", "2e-3", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0", "--mixed_precision", "no",
             "--sdpa", "--seed", str(seed), "--max_train_steps", str(steps)]  # fmt: skip
    out = work / "output"
    tracker = work / "tracker"
    _run(launch + ["--task", "t2v-1.3B", "--dit", str(t2v.dit), *train, "--output_dir", str(out), "--output_name", "wan_t2v_lora",
                   "--log_with", "jsonl", "--logging_dir", str(tracker)], logs / "3_train_t2v.log", env)  # fmt: skip
    lora = out / "wan_t2v_lora.safetensors"
    if not lora.is_file():
        raise UserError(f"training finished but {lora} was not written (log: {logs / '3_train_t2v.log'})")

    videos = {n: work / "videos" / n for n in ("base", "lora", "merged", "i2v_experts")}
    gen = _module("musubi_tuner.wan_generate_video") + ["--task", "t2v-1.3B", "--vae", str(t2v.vae), "--t5", str(t2v.t5),
           "--prompt", PROMPT, "--video_size", "64", "64", "--video_length", "17", "--infer_steps", "4", "--seed", str(seed),
           "--device", "cpu", "--overwrite"]  # fmt: skip
    _run(gen + ["--dit", str(t2v.dit), "--save_path", str(videos["base"])], logs / "4_generate_base.log", env)
    _run(
        gen + ["--dit", str(t2v.dit), "--lora_weight", str(lora), "--save_path", str(videos["lora"])],
        logs / "5_generate_lora.log",
        env,
    )
    merged = work / "merged" / "wan_t2v_demo_lora.safetensors"
    merged.parent.mkdir(exist_ok=True)
    _run(
        _module("musubi_tuner.merge_lora")
        + ["--dit", str(t2v.dit), "--lora_weight", str(lora), "--save_merged_model", str(merged), "--no_progress"],
        logs / "6_merge.log",
        env,
    )
    _run(gen + ["--dit", str(merged), "--save_path", str(videos["merged"])], logs / "7_generate_merged.log", env)

    _run(launch + ["--task", "i2v-A14B", "--expert", "both", "--dit", str(a14b.dit), "--dit_high_noise", str(a14b.dit_high_noise),
                   "--offload_inactive_dit", *train[:-2], "--max_train_steps", str(max(4, steps // 3)),
                   "--output_dir", str(out), "--output_name", "wan_a14b_lora"], logs / "8_train_a14b.log", env)  # fmt: skip
    experts = [out / f"wan_a14b_lora_{e}_noise.safetensors" for e in ("high", "low")]
    _run(_module("musubi_tuner.wan_generate_video") + ["--task", "i2v-A14B", "--dit", str(a14b.dit), "--dit_high_noise", str(a14b.dit_high_noise),
         "--vae", str(a14b.vae), "--t5", str(a14b.t5), "--image_path", str(data.start_image), "--prompt", PROMPT,
         "--video_size", "64", "64", "--video_length", "17", "--infer_steps", "4", "--seed", str(seed), "--device", "cpu",
         "--lora_weight", str(experts[1]), "--lora_weight_high_noise", str(experts[0]), "--save_path", str(videos["i2v_experts"]),
         "--overwrite"], logs / "9_generate_i2v_experts.log", env)  # fmt: skip

    def first_video(d: Path) -> Path:
        found = sorted(d.glob("*.mp4"))
        if not found:
            raise UserError(f"no video written in {d}")
        return found[0]

    files = {n: first_video(d) for n, d in videos.items()}
    frames = {n: _video_frames(p) for n, p in files.items()}
    return WanDemoResult(
        work_dir=work,
        lora=lora,
        expert_loras=experts,
        merged_dit=merged,
        videos=files,
        losses=_loss_trend(tracker),
        lora_changes_output=float(np.abs(frames["base"] - frames["lora"]).mean()),
        merged_matches_lora=float(np.abs(frames["lora"] - frames["merged"]).mean()),
    )


def print_wan_summary(r: WanDemoResult) -> None:
    print("\n=== Blissful Tuner Wan demo: done ===")
    if r.losses:
        q = max(1, len(r.losses) // 4)
        print(
            f"T2V training loss: first {q} steps mean {np.mean(r.losses[:q]):.4f} → last {q} steps mean {np.mean(r.losses[-q:]):.4f}"
        )
    print(f"T2V LoRA:        {r.lora}")
    for p in r.expert_loras:
        print(f"expert LoRA:     {p}")
    print(f"merged DiT:      {r.merged_dit}")
    for name, path in r.videos.items():
        print(f"video ({name}): {path}")
    print(f"mean |pixel difference| base vs LoRA: {r.lora_changes_output:.2f} / 255")
    print(f"mean |pixel difference| LoRA-on-load vs merged DiT: {r.merged_matches_lora:.2f} / 255")
    print(f"logs of every step: {r.work_dir / 'logs'}")
