"""Peak memory and time of ``merge_lora.py`` (streaming) vs a naive ``load_file`` + merge + ``save_file`` baseline.

    python bench/merge_peak_memory.py --work_dir /tmp/merge_bench --size_gb 1.0

Builds (or reuses with ``--reuse``) a synthetic bf16 checkpoint of ``size_gb`` made of 4096×4096 Linear weights and
a rank-32 LoRA for every one of them, then runs each method in its own subprocess and reports the child's peak RSS
above the RSS after imports (``VmHWM`` reset through ``/proc/self/clear_refs``; Linux only) and wall time. A third
child only does the imports (its wall time is the interpreter start-up included in the others).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DIM = 4096
RANK = 32


def build(work: Path, size_gb: float) -> tuple[Path, Path]:
    """Write the synthetic checkpoint and LoRA (bf16)."""
    import torch
    from safetensors.torch import save_file

    ckpt, lora = work / "dit.safetensors", work / "lora.safetensors"
    n = max(1, round(size_gb * 2**30 / (DIM * DIM * 2)))
    g = torch.Generator().manual_seed(0)
    sd, lsd = {}, {}
    for i in range(n):
        sd[f"blocks.{i}.attn.to_q.weight"] = (torch.randn(DIM, DIM, generator=g) * 0.02).to(torch.bfloat16)
        sd[f"blocks.{i}.attn.to_q.bias"] = torch.zeros(DIM, dtype=torch.bfloat16)
        name = f"lora_unet_blocks_{i}_attn_to_q"
        lsd[f"{name}.lora_down.weight"] = (torch.randn(RANK, DIM, generator=g) * 0.01).to(torch.bfloat16)
        lsd[f"{name}.lora_up.weight"] = (torch.randn(DIM, RANK, generator=g) * 0.01).to(torch.bfloat16)
        lsd[f"{name}.alpha"] = torch.tensor(float(RANK))
    save_file(sd, ckpt)
    save_file(lsd, lora)
    return ckpt, lora


def child_naive(ckpt: str, lora: str, out: str) -> None:
    """The usual approach: whole checkpoint in memory, merge in place, save_file."""
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    lsd = load_file(lora)
    for key in [k for k in lsd if k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        target = name[len("lora_unet_") :].replace("_", ".").replace("to.q", "to_q") + ".weight"
        down, up = lsd[key].float(), lsd[f"{name}.lora_up.weight"].float()
        scale = float(lsd[f"{name}.alpha"]) / down.shape[0]
        sd[target] = (sd[target].float() + up @ down * scale).to(sd[target].dtype)
    save_file(sd, out)


def child_stream(ckpt: str, lora: str, out: str) -> None:
    """Our tool, exactly as a user runs it."""
    from musubi_tuner.merge_lora import main

    main(["--dit", ckpt, "--lora_weight", lora, "--save_merged_model", out, "--no_progress"])


def child_baseline() -> None:
    """Interpreter + torch + safetensors imports only."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(kind: str, *args: str) -> dict:
    """Run one method in a fresh process; returns its peak RSS (MiB) and wall time (s)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--_child", kind, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return {"method": kind, "peak_rss_mib": json.loads(res.stdout.strip().splitlines()[-1])["maxrss_mib"], "wall_s": wall}


def main() -> None:
    """Build the inputs, run the three children, print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/merge_bench"))
    p.add_argument("--size_gb", type=float, default=1.0)
    p.add_argument("--reuse", action="store_true", help="reuse dit.safetensors / lora.safetensors in --work_dir")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        kind, rest = args._child[0], args._child[1:]
        child_baseline()
        import musubi_tuner.merge_lora  # noqa: F401 - imports are not what is measured

        start = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        {"naive": child_naive, "stream": child_stream, "baseline": lambda: None}[kind](*rest)
        print(json.dumps({"maxrss_mib": _status_mib("VmHWM") - start}))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt, lora = args.work_dir / "dit.safetensors", args.work_dir / "lora.safetensors"
    if not (args.reuse and ckpt.exists() and lora.exists()):
        ckpt, lora = build(args.work_dir, args.size_gb)
    size_mib = ckpt.stat().st_size / 2**20
    rows = [run_child("baseline")]
    rows.append(run_child("stream", str(ckpt), str(lora), str(args.work_dir / "merged_stream.safetensors")))
    rows.append(run_child("naive", str(ckpt), str(lora), str(args.work_dir / "merged_naive.safetensors")))
    from safetensors import safe_open

    with (
        safe_open(str(args.work_dir / "merged_stream.safetensors"), "pt") as a,
        safe_open(str(args.work_dir / "merged_naive.safetensors"), "pt") as b,
    ):
        key = "blocks.0.attn.to_q.weight"
        same = bool((a.get_tensor(key) == b.get_tensor(key)).all())
    print(f"checkpoint {size_mib:.0f} MiB bf16, LoRA rank {RANK}; merged weights identical: {same}")
    print("| method | peak RSS above imports (MiB) | wall incl. start-up (s) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} |")
    stream, naive = rows[1], rows[2]
    print(f"peak ratio naive/stream: {naive['peak_rss_mib'] / max(stream['peak_rss_mib'], 1):.1f}x")


if __name__ == "__main__":
    main()
