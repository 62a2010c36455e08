"""The estimator's command-line options, shared by every train / generate script and ``estimate_memory.py``."""

from __future__ import annotations

import argparse

from musubi_tuner.utils.errors import UserError

DEFAULT_GPU_GB = 24.0


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """``--estimate_memory`` and its options (specs/memory_estimator.md §4)."""
    g = parser.add_argument_group("memory estimate (docs/memory.md)")
    g.add_argument(
        "--estimate_memory",
        action="store_true",
        help="validate the arguments, read only file headers, print the predicted GPU / host memory and exit",
    )
    g.add_argument("--gpu_memory", type=float, default=None, help="GPU size in GB for the verdict (default: this GPU, else 24)")
    g.add_argument("--memory_margin", type=float, default=0.05, help="fraction of the GPU kept free in the verdict (0.05)")
    g.add_argument("--estimate_json", type=str, default=None, help="also write the estimate as JSON to this path")
    g.add_argument("--estimate_device", type=str, default="cpu", choices=("cpu",), help="device of the fake-tensor trace")
    g.add_argument("--gpu", type=str, default=None, help="comma-separated GPU sizes in GB for fit verdicts, e.g. 24,32,48,80")
    g.add_argument("--suggest", action="store_true", help="also print the cheapest settings that fit, with two alternatives")
    g.add_argument("--frames_sweep", action="store_true", help="also print the largest frame count that fits")


def gpu_sizes(args: argparse.Namespace) -> list[float]:
    """``--gpu 24,32`` as a list of GB values (empty when not given)."""
    if not getattr(args, "gpu", None):
        return []
    try:
        sizes = [float(v) for v in str(args.gpu).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--gpu expects comma-separated sizes in GB, e.g. 24,32,48,80; got {args.gpu!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise UserError(f"--gpu sizes must be positive numbers of GB, got {args.gpu!r}")
    return sizes


def check_memory_args(args: argparse.Namespace) -> None:
    """Range checks of the estimator options (a bad value is an error even without ``--estimate_memory``)."""
    if not 0 <= args.memory_margin < 1:
        raise UserError(f"--memory_margin must be in [0, 1), got {args.memory_margin}")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise UserError(f"--gpu_memory must be > 0 GB, got {args.gpu_memory}")
    gpu_sizes(args)
    if args.estimate_device != "cpu":  # traces run on fake CPU tensors (never touch or initialise a GPU; spec §3.1)
        raise UserError(f"--estimate_device {args.estimate_device}: only cpu is supported")
    wants = [f for f in ("gpu", "suggest", "frames_sweep", "estimate_json") if getattr(args, f, None)]
    if wants and not args.estimate_memory:
        raise UserError(f"--{wants[0]} is an option of the memory estimate; add --estimate_memory (or use estimate_memory.py)")
