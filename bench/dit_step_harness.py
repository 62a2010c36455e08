"""The harness of the ``bench/*_dit_step.py`` scripts: one LoRA training step of our DiT vs its diffusers peer.

A script supplies ``worker(args) -> (step, lora_modules)`` for a side (``ours`` / ``diffusers``) and a one-line
description of its config; ``run_dit_step_bench`` does the rest: the command line (``--steps``, ``--threads``,
``--repeats`` plus the script's own options), one subprocess per side and repeat (so peak memory is not polluted by
the other model), the timing loop after a warm-up step that also samples peak memory, and the printed table and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

SIDES = ("ours", "diffusers")
Worker = Callable[[argparse.Namespace], tuple[Callable[[], None], int]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step(step: Callable[[], None], steps: int, device: str = "cpu") -> dict:
    """Seconds per step over ``steps`` timed calls after one warm-up call, and the warm-up's peak memory above the
    resident size before it (CUDA: allocated bytes; CPU: ``ru_maxrss`` above RSS)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return {"seconds_per_step": (time.perf_counter() - t0) / steps, "peak_extra_mib": peak / 2**20}


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The options a worker subprocess gets: every parsed option but ``--repeats`` and ``--worker``."""
    out = []
    for name, value in vars(args).items():
        if name not in ("repeats", "worker"):
            out += [f"--{name}", str(value)]
    return out


def best_of_sides(script: str, args: argparse.Namespace) -> dict[str, dict]:
    """Run each side ``args.repeats`` times, alternating, in its own process; the fastest run of each side.

    Alternating and keeping the fastest: the machine may be shared, and contention only slows.
    """
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for side in SIDES:
            cmd = [sys.executable, script, "--worker", side, *_forwarded(args)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            if side not in results or r["seconds_per_step"] < results[side]["seconds_per_step"]:
                results[side] = r
    return results


def print_comparison(config_line: str, ours: dict, ref: dict) -> None:
    """The config line, the s/step and peak-MiB table, and the ours/diffusers ratios."""
    print(config_line)
    print(f"{'':10s} {'s/step':>8s} {'peak MiB':>9s}")
    for name, r in (("ours", ours), ("diffusers", ref)):
        print(f"{name:10s} {r['seconds_per_step']:8.3f} {r['peak_extra_mib']:9.1f}")
    print(
        f"time ratio ours/diffusers: {ours['seconds_per_step'] / ref['seconds_per_step']:.2f}; "
        f"peak memory ratio: {ours['peak_extra_mib'] / max(ref['peak_extra_mib'], 1e-9):.2f}"
    )


def run_dit_step_bench(
    script: str,
    description: str,
    worker: Worker,
    describe: Callable[[argparse.Namespace, dict, dict], str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The ``main`` of a DiT-step bench script (module docstring).

    ``worker(args)`` builds ``args.worker``'s side after the thread count and seed are set and returns the step
    function and its LoRA module count; ``describe(args, ours, diffusers)`` is the first printed line.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest is reported")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        step, n_lora = worker(args)
        result = measure_step(step, args.steps, getattr(args, "device", "cpu"))
        print(json.dumps({"side": args.worker, **result, "lora_modules": n_lora}))
        return
    results = best_of_sides(script, args)
    ours, ref = results["ours"], results["diffusers"]
    print_comparison(describe(args, ours, ref), ours, ref)
