"""Image conditioning of Kandinsky 5 video models — one code path for training, training-time samples and inference.

The official contract (specs/kandinsky5.md §9): the DiT input has ``2·16 + 1`` channels,
``concat([noisy latent, visual_cond, mask], dim=-1)``. For image-to-video the clean image latent *replaces* the
conditioned frames of the noisy stream (frame 0, and frame F−1 for first+last), the mask is 1 on those frames and the
``visual_cond`` channels stay zero. Text-to-video on a ``visual_cond`` model leaves the last 17 channels zero.
musubi-tuner wrote the image into ``visual_cond`` during training instead (defect #2); using the functions below in
both places keeps training and inference identical.

All tensors are channels-last: latents ``(B, F, H, W, C)``.
"""

from __future__ import annotations

from typing import Literal

import torch

I2VMode = Literal["none", "first", "first_last"]
LATENT_CHANNELS = 16


def conditioned_frame_indices(num_frames: int, mode: I2VMode) -> list[int]:
    """Latent frame indices that carry a clean image: ``[]``, ``[0]`` or ``[0, F−1]`` (``[0]`` when F = 1)."""
    if mode == "none":
        return []
    if mode == "first" or num_frames == 1:
        return [0]
    if mode == "first_last":
        return [0, num_frames - 1]
    raise ValueError(f"unknown i2v mode {mode!r}")


def apply_clean_frames(noisy: torch.Tensor, clean_frames: torch.Tensor | None, indices: list[int]) -> torch.Tensor:
    """Return ``noisy`` with frames ``indices`` replaced by ``clean_frames`` (``(B, len(indices), H, W, C)``)."""
    if not indices:
        return noisy
    if clean_frames is None or clean_frames.shape[1] != len(indices):
        got = None if clean_frames is None else tuple(clean_frames.shape)
        raise ValueError(f"expected {len(indices)} clean conditioning frames, got {got}")
    out = noisy.clone()
    out[:, indices] = clean_frames.to(out.dtype)
    return out


def build_dit_input(
    noisy: torch.Tensor,
    clean_frames: torch.Tensor | None,
    indices: list[int],
    visual_cond: bool,
) -> torch.Tensor:
    """Assemble the DiT's visual input from the current noisy latent ``(B, F, H, W, 16)``.

    Without ``visual_cond`` (Image Lite T2I) the input is the noisy latent alone (16 channels) and ``indices`` must be
    empty. With it, the result has 33 channels: conditioned noisy stream, zero ``visual_cond``, frame mask.
    """
    x = apply_clean_frames(noisy, clean_frames, indices)
    if not visual_cond:
        if indices:
            raise ValueError("image conditioning needs a visual_cond model (33 input channels)")
        return x
    b, f, h, w, _ = x.shape
    cond = torch.zeros((b, f, h, w, LATENT_CHANNELS), dtype=x.dtype, device=x.device)
    mask = torch.zeros((b, f, h, w, 1), dtype=x.dtype, device=x.device)
    if indices:
        mask[:, indices] = 1.0
    return torch.cat([x, cond, mask], dim=-1)


def loss_frame_weights(num_frames: int, indices: list[int], exclude_conditioned: bool = True) -> torch.Tensor:
    """Per-frame loss weights ``(F,)``: 0 on conditioned frames (their predictions are discarded at inference)."""
    return torch.tensor(loss_frame_weight_list(num_frames, indices, exclude_conditioned))


def loss_frame_weight_list(num_frames: int, indices: list[int], exclude_conditioned: bool = True) -> list[float]:
    """``loss_frame_weights`` as a list, computed without tensors (the memory estimator traces the step on fake tensors)."""
    weights = [1.0] * num_frames
    if exclude_conditioned and indices and len(indices) < num_frames:
        for i in indices:
            weights[i] = 0.0
    return weights


def normalize_first_frame(latents: torch.Tensor) -> torch.Tensor:
    """Match the statistics of the first 4 latent frames to the following ones (official post-processing, §9).

    ``latents`` is ``(F, H, W, C)`` or ``(B, F, H, W, C)``. Skipped when F < 5 (the official code returns a tuple for
    F ≤ 1 and NaN for F = 2..4 — defect #12).
    """
    if latents.dim() == 5:
        return torch.stack([normalize_first_frame(x) for x in latents])
    num_frames = latents.shape[0]
    if num_frames < 5:
        return latents
    x = latents.float()
    ref = x[4 : 4 + min(5, num_frames - 1)]
    ref_mean, ref_std = ref.mean(), ref.std(unbiased=True)
    out = x.clone()
    for i in range(4):
        src = x[i]
        src_mean, src_std = src.mean(), src.std(unbiased=True)
        mean = ref_mean.clamp(src_mean - 0.05, src_mean + 0.1)
        std = ref_std.clamp(src_std - 0.1, src_std + 0.25)
        out[i] = (src - src_mean) / src_std * std + mean
    return out.to(latents.dtype)
