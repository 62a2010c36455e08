"""fp8 without gradient checkpointing needs less memory than bf16 (specs/memory_estimator.md §3.4, §10 test 1).

Measured as the CPU allocator's peak (profiler Allocation events) of one LoRA training step (forward + backward) on
the medium Kandinsky 5 config, plus the bytes the model held before the step.
"""

from __future__ import annotations

import k5_medium
import pytest
import torch
import torch.nn as nn

from musubi_tuner.memory.allocator import cpu_allocator_peak


@pytest.fixture(scope="module")
def medium_checkpoints(tmp_path_factory):
    """bf16 and pre-quantised fp8 files of the same weights (fp8: the loader quantises nothing at test time)."""
    d = tmp_path_factory.mktemp("k5_medium")
    return {fp8: k5_medium.write_checkpoint(d / f"dit_{fp8}.safetensors", fp8=fp8) for fp8 in (False, True)}


def _resident(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _step_peak(path, fp8: bool) -> tuple[int, nn.Module]:
    dit = k5_medium.load(path, fp8=False, dtype=torch.float32)  # a pre-quantised file stays fp8
    k5_medium.add_network(dit)
    inputs = k5_medium.inputs((1, 16, 4, 16, 16), dtype=torch.float32)  # 256 visual tokens: weights dominate
    with cpu_allocator_peak() as peak:
        dit(**inputs).float().square().mean().backward()
    return _resident(dit) + peak.peak, dit


def test_fp8_without_checkpointing_below_full_precision_by_the_weight_bytes(medium_checkpoints):
    full, _ = _step_peak(medium_checkpoints[False], fp8=False)
    fp8, dit = _step_peak(medium_checkpoints[True], fp8=True)
    fp8_linears = [m for m in dit.modules() if isinstance(m, nn.Linear) and hasattr(m, "scale_weight")]
    assert fp8_linears
    hp_size = torch.float32.itemsize
    weight_bytes_saved = sum(m.weight.numel() * hp_size - m.weight.numel() - m.scale_weight.nbytes for m in fp8_linears)
    # while a Linear runs its weight is dequantised transiently; allow two high-precision copies of the largest
    transient = 2 * max(m.weight.numel() for m in fp8_linears) * hp_size
    saved = full - fp8
    assert weight_bytes_saved - transient <= saved <= weight_bytes_saved * 1.02, (saved, weight_bytes_saved, transient)
