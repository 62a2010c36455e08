"""FLUX.2 position ids, token packing and the sampling schedule (specs/flux2.md §4, §6, §8).

The empirical-μ schedule: ``t = linspace(1, 0, N+1)`` shifted by ``t' = e^μ / (e^μ + (1/t − 1))`` with μ from the
target token count and the step count; an Euler step is ``x ← x + (t'_{i+1} − t'_i)·v``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from musubi_tuner.flux_2.configs import REFERENCE_T_STEP

# empirical_mu fit (BFL reference)
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """μ of the FLUX.2 schedule for ``image_seq_len`` target tokens and ``num_steps`` steps."""
    m200 = _A2 * image_seq_len + _B2
    if image_seq_len > 4300:
        return float(m200)
    m10 = _A1 * image_seq_len + _B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^μ / (e^μ + (1/t − 1))`` (t = 0 stays 0, t = 1 stays 1)."""
    t = t.double()
    em = math.exp(mu)
    out = torch.where(t > 0, em / (em + (1.0 / t.clamp_min(1e-12) - 1.0)), torch.zeros_like(t))
    return out.float()


def get_schedule(num_steps: int, image_seq_len: int, mu: float | None = None) -> torch.Tensor:
    """The ``num_steps + 1`` timesteps from 1 to 0 (float32); ``mu`` defaults to ``empirical_mu``."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, empirical_mu(image_seq_len, num_steps) if mu is None else mu)


def build_txt_ids(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1, L, 4)`` ids ``(0, 0, 0, l)``."""
    ids = torch.zeros(1, length, 4, device=device)
    ids[0, :, 3] = torch.arange(length, device=device)
    return ids


def _grid_ids(t: float, h: int, w: int, device) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, 4, device=device)
    ids[:, 0] = t
    ids[:, 1] = hh.reshape(-1)
    ids[:, 2] = ww.reshape(-1)
    return ids


def build_img_ids(
    target_hw: tuple[int, int], reference_hws: Sequence[tuple[int, int]] = (), device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(1, S, 4)`` ids for one item: target ``(0, h, w, 0)`` row-major, reference i at ``t = 10 + 10·i``."""
    parts = [_grid_ids(0.0, *target_hw, device)]
    for i, (h, w) in enumerate(reference_hws):
        parts.append(_grid_ids(float(REFERENCE_T_STEP * (i + 1)), h, w, device))
    return torch.cat(parts)[None]


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` → tokens ``(B, h·w, C)`` row-major."""
    return z.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``(B, h·w, C)`` → ``(B, C, h, w)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
