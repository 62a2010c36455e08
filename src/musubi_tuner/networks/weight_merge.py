"""Add a weight delta to a stored weight: high precision, plain fp8, or scaled fp8 (specs/networks.md §5.1, §5.2).

A scaled fp8 weight is the pair ``(q, scale)`` with ``W = q · scale``. Adding ΔW to ``q`` (what the reference
inference merge does) is wrong by ``1/scale``; here the weight is dequantised, ΔW is added in float32, and the
result is re-quantised in the same mode (tensor / channel / block, same block size) with a fresh scale.
"""

from __future__ import annotations

import torch

from musubi_tuner.modules.fp8_optimization import cast_to_fp8, dequantize_weight, is_fp8_dtype, quantize_weight


def fp8_mode_of_scale(scale: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> tuple[str, int]:
    """``(mode, block_size)`` of an existing scale: ``[1]`` tensor, ``[out, 1]`` channel, ``[out, nb, 1]`` block."""
    if scale.ndim == 3:
        return "block", int(weight_shape[1]) // int(scale.shape[1])
    if scale.ndim == 2:
        return "channel", 1
    return "tensor", 1


def merge_delta_into_weight(
    weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(weight + delta, scale)`` stored like ``weight`` (``delta`` in any float dtype, same shape).

    - scaled fp8 (``scale`` given): dequantise, add in float32, re-quantise with a fresh scale in the same mode;
    - plain fp8 (no scale): upcast, add, cast back (saturating);
    - otherwise: add in float32 and round once to the weight's dtype.
    """
    if delta.shape != weight.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} does not match weight shape {tuple(weight.shape)}")
    delta = delta.to(device=weight.device, dtype=torch.float32)
    if scale is not None:
        mode, block_size = fp8_mode_of_scale(scale, weight.shape)
        w = dequantize_weight(weight, scale.to(weight.device), torch.float32).add_(delta)
        q, new_scale = quantize_weight(w.to(scale.dtype), mode, block_size, weight.dtype)
        return q, new_scale.to(scale.device).reshape(scale.shape)
    if is_fp8_dtype(weight.dtype):
        return cast_to_fp8(weight.to(torch.float32).add_(delta), weight.dtype), None
    return weight.to(torch.float32).add_(delta).to(weight.dtype), None
