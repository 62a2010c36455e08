"""Trainer start-up: wall time of every ``<arch>_train_network.py --help`` and, for ``--arch``, from process start to
the first step.

Writes the tiny bundle of ``--arch`` (Kandinsky 5: a synthetic dataset of 2 clips of 17 frames at 64x64; FLUX.2
klein-4b: the demo's image dataset without references), caches it with the caching scripts, then runs each measured command as a fresh process, alternating, and keeps each command's fastest
run (the machine is shared). "First step" is the moment the trainer's progress bar shows ``1/<steps>`` on stderr,
i.e. the first optimizer step is done. The peer is ``python -c "import torch"``, measured in the same run, so the
numbers can be read as a multiple of the bare interpreter + torch import.

    python bench/trainer_startup.py                  # 3 repeats
    python bench/trainer_startup.py --repeats 1      # quick run
    python bench/trainer_startup.py --arch flux_2    # flux_2_train_network.py
    # the same rows for another source tree too (e.g. an older commit: git archive <rev> | tar -x -C /tmp/old)
    python bench/trainer_startup.py --baseline_src /tmp/old
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELP_SCRIPTS = ("kandinsky5_train_network.py", "flux_2_train_network.py", "qwen_image_train_network.py", "wan_train_network.py")
TASK = "k5-lite-t2v-5s-sd"
FIRST_STEP = re.compile(rb"steps:\s+\d+%\|[^|]*\|\s*1/\d+")


def _env(src: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if src is not None:  # run another source tree's package instead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(src / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def prepare(work: Path) -> list[str]:
    """Kandinsky 5 bundle + dataset + caches in ``work``; returns the trainer's arguments."""
    from musubi_tuner.demo.bundles import write_k5_bundle
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset

    bundle = write_k5_bundle(work / "bundle", task=TASK, seed=0)
    data = write_synthetic_video_dataset(work / "data", n_videos=2, n_images=0, seed=1)
    run = [sys.executable, "-m"]
    subprocess.run([*run, "musubi_tuner.kandinsky5_cache_latents", "--dataset_config", str(data.video_toml), "--vae",
                    str(bundle.vae), "--device", "cpu"], check=True, env=_env(), capture_output=True)  # fmt: skip
    subprocess.run([*run, "musubi_tuner.kandinsky5_cache_text_encoder_outputs", "--dataset_config", str(data.video_toml),
                    "--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip",
                    str(bundle.text_encoder_clip), "--device", "cpu"], check=True, env=_env(), capture_output=True)  # fmt: skip
    return [
        "--task", TASK, "--dit", str(bundle.dit), "--dataset_config", str(data.video_toml),
        "--network_module", "networks.lora_kandinsky", "--network_dim", "4", "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW", "--lr_scheduler", "cosine", "--max_data_loader_n_workers", "0", "--seed", "1",
        "--max_train_steps", "2", "--output_dir", str(work / "out"), "--output_name", "k5",
    ]  # fmt: skip


def prepare_flux2(work: Path) -> list[str]:
    """FLUX.2 klein-4b bundle + the demo's image dataset (no references) + caches; returns the trainer's arguments."""
    from musubi_tuner.demo.flux2_bundles import write_flux2_bundle
    from musubi_tuner.demo.flux2_data import write_flux2_dataset

    bundle = write_flux2_bundle(work / "bundle", seed=0)
    data = write_flux2_dataset(work / "data", seed=1)
    run = [sys.executable, "-m"]
    subprocess.run([*run, "musubi_tuner.flux_2_cache_latents", "--dataset_config", str(data.t2i_toml), "--vae",
                    str(bundle.vae), "--device", "cpu"], check=True, env=_env(), capture_output=True)  # fmt: skip
    subprocess.run([*run, "musubi_tuner.flux_2_cache_text_encoder_outputs", "--dataset_config", str(data.t2i_toml),
                    "--model_version", "klein-4b", "--text_encoder", str(bundle.text_encoder_qwen3), "--device", "cpu"],
                   check=True, env=_env(), capture_output=True)  # fmt: skip
    return [
        "--model_version", "klein-4b", "--dit", str(bundle.dit_klein), "--dataset_config", str(data.t2i_toml),
        "--network_module", "networks.lora_flux_2", "--network_dim", "4", "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW", "--mixed_precision", "no", "--max_data_loader_n_workers", "0", "--seed", "1",
        "--max_train_steps", "2", "--output_dir", str(work / "out"), "--output_name", "f2",
    ]  # fmt: skip


# --arch -> (trainer script, bundle/caches writer)
ARCHS = {"kandinsky5": ("kandinsky5_train_network.py", prepare), "flux_2": ("flux_2_train_network.py", prepare_flux2)}


def time_to_exit(cmd: list[str], src: Path | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(src), capture_output=True)
    return time.perf_counter() - started


def time_to_first_step(cmd: list[str], src: Path | None = None) -> float:
    """Seconds from starting ``cmd`` until its progress bar reports the first step (the process is then stopped)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    try:
        while chunk := proc.stderr.read1(65536):
            seen = (seen + chunk)[-4096:]
            if FIRST_STEP.search(seen):
                return time.perf_counter() - started
        raise RuntimeError(f"no first step in the trainer's output (exit {proc.wait()}): {seen[-2000:].decode(errors='replace')}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", choices=sorted(ARCHS), default="kandinsky5", help="whose trainer to time (kandinsky5)")
    p.add_argument("--work_dir", type=str, default=None, help="where the bundle and caches go (default: a temp dir)")
    p.add_argument("--baseline_src", type=str, default=None, help="also time this source tree's trainer (its src/ first)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        script, prepare_arch = ARCHS[args.arch]
        train_args = prepare_arch(work)
        trees = {"": (REPO, None)}
        if args.baseline_src:
            trees["baseline: "] = (Path(args.baseline_src), Path(args.baseline_src))
        rows = {"python -c 'import torch' (peer)": (time_to_exit, [sys.executable, "-c", "import torch"], None)}
        for label, (root, src) in trees.items():
            trainer = [sys.executable, str(root / script)]
            for help_script in HELP_SCRIPTS:
                rows[f"{label}{help_script} --help"] = (time_to_exit, [sys.executable, str(root / help_script), "--help"], src)
            rows[f"{label}start -> first step done"] = (time_to_first_step, [*trainer, *train_args], src)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (fn, cmd, src) in rows.items():
                best[name] = min(best.get(name, float("inf")), fn(cmd, src))
    peer = best["python -c 'import torch' (peer)"]
    print(f"{'command':<40} {'best s':>8} {'x import torch':>15}")
    for name, seconds in best.items():
        print(f"{name:<40} {seconds:8.2f} {seconds / peer:15.2f}")


if __name__ == "__main__":
    main()
