"""Host memory per process of FSDP2-sharded Kandinsky 5 LoRA training vs one process and 2-process data parallel.

Writes a mid-size random Kandinsky 5 DiT (model_dim 1024, ff 4096, 1 text + 8 visual blocks, ~150M parameters,
stored in float32) with the tiny VAE/text encoders, caches two 17-frame 64x64 clips, then trains 2 LoRA steps
(bf16 DiT weights, rank 16) three ways, each in fresh processes on the CPU:

  one    one process (`python kandinsky5_train_network.py ...`)
  ddp    2 processes (torchrun), every process holds the whole DiT
  fsdp2  2 processes (torchrun + the FSDP2 config environment), the DiT sharded per block

For every process it prints the resident size before loading (interpreter, torch, imports), the peak after the DiT
is loaded (and sharded), the peak over the run, and the bytes of DiT parameters the process holds; the host peak is
the largest sum of the RSS of all processes of a run, sampled every 20 ms by this script. Every run gets
``MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=0`` (``--default_malloc`` to measure without).

    python bench/fsdp_memory.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(out_dir: str, argv: list[str]) -> None:
    """Run the K5 trainer in this process, recording memory at the three points."""
    from musubi_tuner.kandinsky5_train_network import Kandinsky5NetworkTrainer, setup_parser
    from musubi_tuner.training.args import read_config_from_file
    from musubi_tuner.training.fsdp import local_parameter_bytes

    record: dict[str, float] = {"rss_before_load": _vm("VmRSS")}

    class Measured(Kandinsky5NetworkTrainer):
        def on_train_start(self, args, accelerator, transformer, network) -> None:
            record["peak_after_load"] = _vm("VmHWM")
            record["rss_after_load"] = _vm("VmRSS")
            record["dit_bytes"] = local_parameter_bytes(transformer)
            record["rank"] = accelerator.process_index

    parser = setup_parser()
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    Measured().train(args)
    record["peak_run"] = _vm("VmHWM")
    Path(out_dir, f"memory_{int(record['rank'])}.json").write_text(json.dumps(record))


def _prepare(root: Path) -> list[str]:
    from musubi_tuner.demo.bundles import tiny_dit_config, write_k5_bundle, write_tiny_dit
    from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
    from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
    from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text

    bundle = write_k5_bundle(root / "bundle", task="k5-lite-t2v-5s-sd", seed=0)
    config = {**tiny_dit_config("k5-lite-t2v-5s-sd"), "model_dim": 1024, "ff_dim": 4096, "time_dim": 256}
    config.update(num_text_blocks=1, num_visual_blocks=8, axes_dims=[16, 24, 24])
    dit, _ = write_tiny_dit(root / "dit", config, seed=0, file_name="k5_mid.safetensors")
    ds = write_synthetic_video_dataset(root / "data", n_videos=2, n_images=0, seed=1)
    cache_latents(["--dataset_config", str(ds.video_toml), "--vae", str(bundle.vae), "--device", "cpu", "--vae_dtype", "float32"])
    cache_text(["--dataset_config", str(ds.video_toml), "--text_encoder_qwen", str(bundle.text_encoder_qwen),
                "--text_encoder_clip", str(bundle.text_encoder_clip), "--device", "cpu"])  # fmt: skip
    return ["--task", "k5-lite-t2v-5s-sd", "--dit", str(dit), "--dataset_config", str(ds.video_toml),
            "--network_module", "networks.lora_kandinsky", "--network_dim", "16", "--network_alpha", "16",
            "--output_name", "bench", "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "1",
            "--dit_dtype", "bfloat16", "--mixed_precision", "bf16", "--max_train_steps", "2"]  # fmt: skip


def _host_peak(proc: subprocess.Popen, stop: threading.Event, result: list[int]) -> None:
    import psutil

    parent = psutil.Process(proc.pid)
    peak = 0
    while not stop.is_set():
        try:
            procs = [parent, *parent.children(recursive=True)]
            total = sum(p.memory_info().rss for p in procs if "python" in p.name())
        except psutil.Error:
            total = 0
        peak = max(peak, total)
        time.sleep(0.02)
    result.append(peak)


def run_variant(name: str, argv: list[str], work: Path, keep_malloc: bool) -> dict:
    out = work / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLISSFUL_LOG_LEVEL": "WARNING"}
    if not keep_malloc:
        # every run: blocks of >= 1 MiB are mapped and returned to the OS when freed. Without this, glibc keeps the
        # per-block all-gather buffers of the sharded run resident as heap holes and its RSS creeps up every step
        env.update(MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    for key in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(key, None)
    this = str(Path(__file__).resolve())
    child_cmd = [this, "--child", str(out), "--", *argv, "--output_dir", str(out)]
    if name == "one":
        cmd = [sys.executable, *child_cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571", *child_cmd]
        if name == "fsdp2":
            env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=_host_peak, args=(proc, stop, peak))
    sampler.start()
    _, err = proc.communicate(timeout=900)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("memory_*.json"))]
    return {"name": name, "ranks": ranks, "host_peak": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--default_malloc", action="store_true", help="keep glibc's default mmap/trim thresholds")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    if ns.child:
        child(ns.child, [a for a in ns.rest if a != "--"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        argv = _prepare(work / "setup")
        results = [run_variant(name, argv, work, ns.default_malloc) for name in ("one", "ddp", "fsdp2")]
    print(
        "| Run | Process | DiT params held | RSS before load | Load peak | RSS after load | Peak over the run | Host peak (all processes) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for rank in r["ranks"]:
            print(
                f"| {r['name']} | {int(rank['rank'])} | {rank['dit_bytes'] / MIB:.0f} MiB | {rank['rss_before_load'] / MIB:.0f} MiB | "
                f"{rank['peak_after_load'] / MIB:.0f} MiB | {rank['rss_after_load'] / MIB:.0f} MiB | {rank['peak_run'] / MIB:.0f} MiB | {r['host_peak'] / MIB:.0f} MiB |"
            )


if __name__ == "__main__":
    main()
