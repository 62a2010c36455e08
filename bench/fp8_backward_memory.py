"""fp8 Linear backward memory: one LoRA training step without gradient checkpointing, bf16 vs fp8 (CPU allocator).

Usage: python bench/fp8_backward_memory.py [--frames 4] [--size 32]

Medium Kandinsky 5 config (tests/k5_medium.py: model_dim 512, 2+4 blocks, LoRA rank 16), bf16 compute. Three runs:
bf16 weights; fp8 (block-scaled) with this project's fp8 Linear (saves the fp8 weight + scale, dequantises again in
backward); and fp8 with the dequantise-then-``F.linear`` forward that the peer tools use (autograd keeps the
dequantised bf16 weight of every Linear until backward). Peak = bytes the model holds + the CPU allocator's peak
during the step (profiler Allocation events; specs/memory_estimator.md §10 test 1).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import k5_medium  # noqa: E402

from musubi_tuner.memory.allocator import cpu_allocator_peak  # noqa: E402
from musubi_tuner.modules.fp8_optimization import dequantize_weight  # noqa: E402


def _dequantise_then_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The peer tools' fp8 forward: autograd saves the dequantised weight for the input gradient."""
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, dequantize_weight(self.weight, self.scale_weight, x.dtype), bias)


def run(path: Path, mode: str, latent: tuple[int, ...]) -> int:
    dit = k5_medium.load(path, fp8=mode != "bf16")
    if mode == "fp8-peer":
        for m in dit.modules():
            if isinstance(m, nn.Linear) and hasattr(m, "scale_weight"):
                m.forward = types.MethodType(_dequantise_then_linear, m)
    k5_medium.add_network(dit)
    resident = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()])
    inputs = k5_medium.inputs(latent)
    with cpu_allocator_peak() as peak:
        dit(**inputs).float().square().mean().backward()
    return resident + peak.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    latent = (1, 16, args.frames, args.size, args.size)
    tokens = args.frames * (args.size // 2) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        path = k5_medium.write_checkpoint(Path(tmp) / "dit.safetensors")
        peaks = {mode: run(path, mode, latent) for mode in ("bf16", "fp8", "fp8-peer")}
    mib = 2**20
    print(f"medium K5 (model_dim 512, 2+4 blocks), {tokens} visual tokens, LoRA r16, bf16 compute, no checkpointing")
    for mode, peak in peaks.items():
        print(f"{mode:10s} {peak / mib:8.1f} MiB  ({peak / peaks['bf16']:.2f}x bf16)")


if __name__ == "__main__":
    main()
