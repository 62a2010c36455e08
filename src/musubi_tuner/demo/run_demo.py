"""The demo: a tiny Kandinsky 5 bundle and a synthetic dataset, then the real command lines a user types.

``python -m musubi_tuner.demo`` (or ``blissful-tuner-demo``) runs, each as its own process exactly as documented in
docs/kandinsky5.md: cache latents → cache text-encoder outputs → ``accelerate launch`` LoRA training with sampling →
generate without and with the LoRA → merge the LoRA into the DiT → generate with the merged DiT. It prints each
command, the loss trend read from the trainer's ``metrics.jsonl`` and where every output is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musubi_tuner.utils.errors import UserError, cli_entry
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

TASK = "k5-lite-t2v-5s-sd"
WORK_DIR_MARKER = ".blissful_demo"
RUN_OUTPUTS = ("output", "videos", "merged", "tracker", "logs")  # cleared when the demo runs again
PROMPT = "a red circle moving to the right on a dark background"
ACCELERATE_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: "NO"
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: "no"
dynamo_config: {}
use_cpu: true
main_training_function: main
"""


@dataclass
class DemoResult:
    """What the demo produced (absolute paths) and the loss trend it measured."""

    work_dir: Path
    lora: Path
    merged_dit: Path
    videos: dict[str, Path]
    samples: list[Path]
    losses: list[float]
    lora_changes_output: float  # mean |Δ| of pixel values (0..255) between the videos without and with the LoRA
    merged_matches_lora: float  # mean |Δ| between LoRA-on-load and merged-DiT videos


# a tqdm progress line: "<desc>: 45%|####5     | 27/60 [00:30<00:36, 1.1it/s, loss=0.31]"
_PROGRESS = re.compile(r"^\s*(?P<desc>[\w .-]{1,40}): +(?P<pct>\d{1,3})%\|.*?\| *(?P<count>\d+/\d+) *(?P<rest>\[[^\]]*\])?")


def _progress_text(segment: str) -> str | None:
    """``steps 27/60 45% [00:30<00:36, 1.1it/s, loss=0.31]`` for a tqdm line, else None."""
    m = _PROGRESS.match(segment)
    if m is None:
        return None
    return f"{m['desc'].strip()} {m['count']} {m['pct']}% {(m['rest'] or '').strip()}".rstrip()


def _run(cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
    """Run one CLI step, its output to ``log_path``; a failure shows the log's tail and stops the demo.

    Progress bars of the step (training steps, encoding...) are echoed on one console line while it runs, so a long
    step is never silent.
    """
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {shown}", flush=True)
    started = time.perf_counter()
    shown_progress = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        pending = b""
        while chunk := proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
            log.write(chunk)
            pending += chunk
            *segments, pending = re.split(rb"[\r\n]", pending)
            for raw in segments:
                text = _progress_text(raw.decode("utf-8", errors="replace"))
                if text:
                    print(f"\r  {text[:110]:<110}", end="", flush=True)
                    shown_progress = True
        returncode = proc.wait()
    if shown_progress:
        print(flush=True)
    if returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise UserError(f"demo step failed (exit {returncode}); log {log_path}:\n{tail}")
    print(f"  done in {time.perf_counter() - started:.1f} s (log: {log_path})", flush=True)


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _video_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def _loss_trend(logging_dir: Path) -> list[float]:
    from musubi_tuner.training.trackers import METRICS_FILE, read_metrics

    files = sorted(logging_dir.rglob(METRICS_FILE))
    if not files:
        return []
    return [float(r["loss/current"]) for r in read_metrics(files[-1]) if "loss/current" in r]


def claim_work_dir(work: Path) -> None:
    """Use ``work`` only when it is new, empty or an earlier demo's (marker file); clear that demo's run outputs.

    Re-running the demo then never mixes old samples into the summary, and a mistyped ``--work_dir`` pointing at a
    directory of the user's is refused instead of being overwritten.
    """
    if work.is_file() or (work.is_dir() and any(work.iterdir()) and not (work / WORK_DIR_MARKER).is_file()):
        raise UserError(f"{work}: exists and is not a demo work directory (no {WORK_DIR_MARKER}); choose another --work_dir")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_DIR_MARKER).write_text("written by python -m musubi_tuner.demo\n", encoding="utf-8")
    for name in RUN_OUTPUTS:
        shutil.rmtree(work / name, ignore_errors=True)


def prepare(work_dir: str | os.PathLike, *, seed: int = 42):
    """Write the tiny bundle (``<work>/bundle``) and the synthetic dataset (``<work>/data``); returns both."""
    from musubi_tuner.demo.bundles import write_k5_bundle
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset

    work = Path(work_dir).resolve()
    claim_work_dir(work)
    bundle = write_k5_bundle(work / "bundle", task=TASK, seed=0)
    data = write_synthetic_video_dataset(work / "data", n_videos=4, frames=17, size=(64, 64), seed=seed, overwrite=True)
    print(f"tiny Kandinsky 5 bundle: {bundle.root}\nsynthetic dataset: {data.root} (config {data.video_toml})")
    return bundle, data


def run_demo(work_dir: str | os.PathLike, *, steps: int = 60, seed: int = 42) -> DemoResult:
    """Build the bundle and data under ``work_dir`` and run the whole pipeline; returns what it produced."""
    work = Path(work_dir).resolve()
    print(f"demo work directory: {work}")
    bundle, data = prepare(work, seed=seed)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    encoders = ["--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip", str(bundle.text_encoder_clip)]
    common = ["--task", TASK, "--dit", str(bundle.dit), "--vae", str(bundle.vae)]

    _run(
        _module("musubi_tuner.kandinsky5_cache_latents")
        + ["--dataset_config", str(data.video_toml), "--vae", str(bundle.vae), "--device", "cpu", "--seed", str(seed)],
        logs / "1_cache_latents.log",
        env,
    )
    _run(
        _module("musubi_tuner.kandinsky5_cache_text_encoder_outputs")
        + ["--dataset_config", str(data.video_toml), *encoders, "--device", "cpu"],
        logs / "2_cache_text.log",
        env,
    )

    accelerate_config = work / "accelerate_cpu.yaml"
    accelerate_config.write_text(ACCELERATE_CPU_CONFIG, encoding="utf-8")
    prompts = work / "sample_prompts.txt"
    prompts.write_text(f"{PROMPT} --w 64 --h 64 --f 17 --s 6 --d {seed}\n", encoding="utf-8")
    output_dir = work / "output"
    tracker_dir = work / "tracker"
    _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
        + ["-m", "musubi_tuner.kandinsky5_train_network"]
        + common
        + encoders
        + ["--dataset_config", str(data.video_toml), "--network_module", "networks.lora_kandinsky"]
        + ["--network_dim", "16", "--network_alpha", "16", "--learning_rate", "2e-3", "--optimizer_type", "AdamW"]
        + ["--timestep_sampling", "shift", "--discrete_flow_shift", "5.0", "--mixed_precision", "no", "--sdpa"]
        + ["--max_train_steps", str(steps), "--seed", str(seed)]
        + ["--sample_prompts", str(prompts), "--sample_every_n_steps", str(max(1, steps // 2)), "--sample_at_first"]
        + ["--save_every_n_steps", str(max(1, steps // 2)), "--output_dir", str(output_dir), "--output_name", "demo_lora"]
        + ["--log_with", "jsonl", "--logging_dir", str(tracker_dir)],
        logs / "3_train.log",
        env,
    )
    lora = output_dir / "demo_lora.safetensors"
    if not lora.is_file():
        raise UserError(f"training finished but {lora} was not written (log: {logs / '3_train.log'})")

    videos = {name: work / "videos" / f"{name}.mp4" for name in ("base", "lora", "merged")}
    generate = (
        _module("musubi_tuner.kandinsky5_generate_video")
        + common
        + encoders
        + ["--prompt", PROMPT, "--width", "64", "--height", "64", "--video_length", "17", "--steps", "6"]
        + ["--seed", str(seed), "--device", "cpu"]
    )
    _run(generate + ["--output", str(videos["base"])], logs / "4_generate_base.log", env)
    _run(generate + ["--lora_weight", str(lora), "--output", str(videos["lora"])], logs / "5_generate_lora.log", env)

    merged = work / "merged" / "k5_tiny_demo_lora.safetensors"
    merged.parent.mkdir(exist_ok=True)
    _run(
        _module("musubi_tuner.merge_lora")
        + ["--dit", str(bundle.dit), "--lora_weight", str(lora), "--save_merged_model", str(merged), "--no_progress"],
        logs / "6_merge.log",
        env,
    )
    merged_generate = [str(merged) if c == str(bundle.dit) else c for c in generate]
    _run(merged_generate + ["--output", str(videos["merged"])], logs / "7_generate_merged.log", env)

    frames = {name: _video_frames(path) for name, path in videos.items()}
    return DemoResult(
        work_dir=work,
        lora=lora,
        merged_dit=merged,
        videos=videos,
        samples=sorted((output_dir / "sample").glob("*")),
        losses=_loss_trend(tracker_dir),
        lora_changes_output=float(np.abs(frames["base"] - frames["lora"]).mean()),
        merged_matches_lora=float(np.abs(frames["lora"] - frames["merged"]).mean()),
    )


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def print_summary(result: DemoResult) -> None:
    """The loss trend and the output paths."""
    losses = result.losses
    print("\n=== Blissful Tuner demo: done ===")
    if losses:
        q = max(1, len(losses) // 4)
        print(f"training loss: first {q} steps mean {_mean(losses[:q]):.4f} → last {q} steps mean {_mean(losses[-q:]):.4f}")
        marks = [losses[i] for i in range(0, len(losses), max(1, len(losses) // 10))]
        print("loss every ~10% of the run: " + ", ".join(f"{v:.3f}" for v in marks))
    print(f"LoRA:            {result.lora}")
    print(f"merged DiT:      {result.merged_dit}")
    for name, path in result.videos.items():
        print(f"video ({name}):{' ' * (9 - len(name))}{path}")
    for path in result.samples:
        print(f"training sample: {path}")
    print(f"mean |pixel difference| base vs LoRA: {result.lora_changes_output:.2f} / 255")
    print(f"mean |pixel difference| LoRA-on-load vs merged DiT: {result.merged_matches_lora:.2f} / 255")
    print(f"logs of every step: {result.work_dir / 'logs'}")


# --arch of the other architectures: (module, prepare(work_dir, seed), run(work_dir, steps, seed), print_summary(result))
ARCH_DEMOS: dict[str, tuple[str, str, str, str]] = {
    "flux_2": ("musubi_tuner.demo.flux2_demo", "prepare_flux2", "run_flux2_demo", "print_flux2_summary"),
    "qwen_image": ("musubi_tuner.demo.qwen_image_demo", "prepare_qwen_image", "run_qwen_image_demo", "print_qwen_summary"),
    "wan": ("musubi_tuner.demo.wan_demo", "prepare_wan", "run_wan_demo", "print_wan_summary"),
}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m musubi_tuner.demo",
        description="Run cache → train → generate → merge on a tiny random-weight Kandinsky 5 bundle (CPU, minutes).",
    )
    p.add_argument("--work_dir", default="blissful_demo", help="where the bundle, data and outputs go (default ./blissful_demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--arch",
        choices=("kandinsky5", *ARCH_DEMOS),
        default="kandinsky5",
        help="which architecture's pipeline to run (default kandinsky5)",
    )
    p.add_argument(
        "--prepare_only",
        action="store_true",
        help="only write <work_dir>/bundle and <work_dir>/data (for the command lines of docs/kandinsky5.md)",
    )
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 (got {args.steps})")
    if args.arch in ARCH_DEMOS:
        module_name, prepare_name, run_name, summary_name = ARCH_DEMOS[args.arch]
        module = importlib.import_module(module_name)
        if args.prepare_only:
            getattr(module, prepare_name)(args.work_dir, seed=args.seed)
            return
        started = time.perf_counter()
        getattr(module, summary_name)(getattr(module, run_name)(args.work_dir, steps=args.steps, seed=args.seed))
        print(f"total time: {time.perf_counter() - started:.0f} s")
        return
    if args.prepare_only:
        prepare(args.work_dir, seed=args.seed)
        return
    started = time.perf_counter()
    result = run_demo(args.work_dir, steps=args.steps, seed=args.seed)
    print_summary(result)
    print(f"total time: {time.perf_counter() - started:.0f} s")
