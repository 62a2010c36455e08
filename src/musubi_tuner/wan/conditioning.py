"""Wan conditioning layouts shared by training and inference (specs/wan.md §8).

- I2V (2.1, 2.2 A14B) and FLF2V: ``y = cat([mask (4), image latent (16)])`` = 20 channels after the noisy 16. The
  image latent encodes ``[first, zeros × (F − 2), last or zero]``; the pixel mask ``[1, 0, ..., 0(, 1)]`` (length F)
  with its first entry repeated 4× is folded to ``(4, F')`` (4 pixel frames per latent frame).
- Fun-Control (``*-FC``, VideoX-Fun's Wan2.1-Fun Control models; musubi-tuner and VideoX-Fun agree): ``y = cat([control
  latent (16), start-image latent (16)])`` = 32 channels after the noisy 16 (48 in all, no mask). The control latent is
  the VAE latent of the whole control video; the start-image channels hold the first frame's latent on latent frame 0
  only and zeros elsewhere (all zeros without a start image).
- ``encode_image_condition`` / ``clip_image_tokens``: the one place the I2V / FLF2V condition and CLIP tokens are
  built, for the latent cache (training) and for generation alike.
- TI2V-5B: the first latent frame is the clean image latent; its tokens get timestep 0.
"""

from __future__ import annotations

from typing import Any

import torch


def i2v_mask(pixel_frames: int, h: int, w: int, *, last: bool = False) -> torch.Tensor:
    """``(4, F', h, w)`` float32: 1 where a pixel frame is given (first; and last for FLF2V)."""
    m = torch.zeros(pixel_frames)
    m[0] = 1.0
    if last:
        m[-1] = 1.0
    m = torch.cat([m[:1].repeat(4), m[1:]])  # length F + 3 = 4·F'
    lat = m.numel() // 4
    return m.view(lat, 4).transpose(0, 1)[:, :, None, None].expand(4, lat, h, w).contiguous()


def fun_control_y(control: torch.Tensor, image_latent: torch.Tensor | None) -> torch.Tensor:
    """Fun-Control condition channels ``cat([control (16), start image (16)])`` along the channel axis (``-4``: works for
    ``(C, F', h, w)`` and ``(B, C, F', h, w)``). ``image_latent``: the 16-channel latent of a video starting with the
    image (e.g. the I2V condition without its 4 mask channels); only its latent frame 0 is kept."""
    start = torch.zeros_like(control)
    if image_latent is not None:
        start[..., :1, :, :] = image_latent[..., :1, :, :].to(start.dtype)
    return torch.cat([control, start], dim=-4)


def condition_video(first: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 3, F, H, W)``: the first image (and the last for FLF2V) with zero frames between, in [-1, 1]."""
    b, c, h, w = first.shape
    video = first.new_zeros(b, c, frames, h, w)
    video[:, :, 0] = first
    if last is not None:
        video[:, :, -1] = last
    return video


def encode_image_condition(vae: Any, first: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 20, F', h, w)``: the mask (first, and last for FLF2V) + the VAE latent of ``condition_video``.

    ``first`` / ``last``: ``(B, 3, H, W)`` in [-1, 1]; ``vae.encode`` returns normalised latents.
    """
    lat = vae.encode(condition_video(first, frames, last)).float()
    mask = i2v_mask(frames, lat.shape[-2], lat.shape[-1], last=last is not None).to(lat.device)
    return torch.cat([mask[None].expand(lat.shape[0], -1, -1, -1, -1), lat], dim=1)


def clip_image_tokens(clip: Any, first: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP tokens of each sample's image(s): ``(B, 257, 1280)`` (2.1 I2V) or, with ``last`` (FLF2V),
    ``(B, 2, 257, 1280)`` (first, last)."""
    if last is None:
        return clip.encode(first)
    b = first.shape[0]
    tokens = clip.encode(torch.stack([first, last], dim=1).flatten(0, 1))
    return tokens.view(b, 2, *tokens.shape[1:])


def ti2v_token_timesteps(t: torch.Tensor, grid: tuple[int, int, int], first_frame_clean: bool) -> torch.Tensor:
    """Per-token timesteps ``(B, F'·h'·w')`` for TI2V-5B: ``t`` everywhere, 0 on the first latent frame's tokens."""
    f, h, w = grid
    out = t.float().view(-1, 1).expand(-1, f * h * w).clone()
    if first_frame_clean:
        out[:, : h * w] = 0.0
    return out


def ti2v_replace_first(x: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """``(1 − m)·cond + m·x`` with m = 0 on latent frame 0: the clean image latent replaces frame 0 of ``x``."""
    out = x.clone()
    out[:, :, :1] = image_latent[:, :, :1].to(x.dtype)
    return out
