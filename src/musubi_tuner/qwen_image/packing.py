"""Latent ↔ token packing and the DiT's ``img_shapes`` (specs/qwen_image.md §3), shared by training and inference.

A latent ``(B, 16, h, w)`` becomes ``(B, (h/2)(w/2), 64)``: 2×2 patches, channel index ``c·4 + ph·2 + pw``, tokens
row-major. Multi-frame latents (Layered: composite + layers) pack frame after frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musubi_tuner.qwen_image.configs import PATCH_SIZE

P = PATCH_SIZE


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` or ``(B, C, F, h, w)`` → ``(B, F·(h/2)(w/2), C·4)``."""
    if latents.dim() == 4:
        latents = latents[:, :, None]
    b, c, f, h, w = latents.shape
    if h % P or w % P:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {P}")
    x = latents.reshape(b, c, f, h // P, P, w // P, P).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // P) * (w // P), c * P * P)


def unpack(tokens: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack``: ``(B, F·(h/2)(w/2), C·4)`` → ``(B, C, F, h, w)``."""
    b, n, d = tokens.shape
    c = d // (P * P)
    if n != frames * (h // P) * (w // P):
        raise ValueError(f"{n} tokens do not make {frames} frames of {h}x{w}")
    x = tokens.reshape(b, frames, h // P, w // P, c, P, P).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, frames, h, w)


def grid(h: int, w: int) -> tuple[int, int, int]:
    """The token grid ``(1, h/2, w/2)`` of one latent image."""
    return (1, h // P, w // P)


def img_shapes_for(
    target_hw: tuple[int, int], target_frames: int, control_hws: Sequence[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """``img_shapes``: one grid per target frame, then one per control image (shared by the whole batch)."""
    return [grid(*target_hw)] * target_frames + [grid(*hw) for hw in control_hws]
