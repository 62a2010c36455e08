"""Kandinsky 5 flow-matching sampling: the official shifted grid, Euler steps and classifier-free guidance (§8).

Conventions: t = 1 is noise, t = 0 is data; the DiT predicts the velocity ``noise − x0`` and takes ``1000·t``.
The grid is ``linspace(1, 0, N+1)`` shifted once by ``s·t / (1 + (s−1)·t)`` (s = scheduler_scale), computed in
float32 like the official pipeline. This avoids diffusers' double shift (defect #10).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from musubi_tuner.utils.errors import UserError

TIMESTEP_SCALE = 1000.0
CFG_EPS = 1e-6


def shift_timesteps(t: torch.Tensor, scheduler_scale: float) -> torch.Tensor:
    """``s·t / (1 + (s−1)·t)``; ``s = 1`` is the identity."""
    return scheduler_scale * t / (1 + (scheduler_scale - 1) * t)


def timestep_grid(num_steps: int, scheduler_scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``N + 1`` float32 flow times from 1 to 0, shifted by ``scheduler_scale`` (``--scheduler_scale`` / task default)."""
    if num_steps < 1:
        raise UserError(f"--infer_steps must be >= 1 (got {num_steps})")
    if scheduler_scale <= 0:
        raise UserError(f"--scheduler_scale must be > 0 (got {scheduler_scale})")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32, device=device)
    return shift_timesteps(t, scheduler_scale)


def model_timestep(t: torch.Tensor | float, batch_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """The DiT's ``time`` input ``(B,)``: ``1000·t`` exactly (no +1 offset, defect #15)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size)
    return t * TIMESTEP_SCALE


def needs_uncond(guidance: float) -> bool:
    """Whether CFG needs the unconditional pass: ``|g − 1| > 1e-6``."""
    return abs(guidance - 1.0) > CFG_EPS


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """``v_u + g·(v_c − v_u)``."""
    return v_uncond + guidance * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t_cur: float | torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """``x + (t_next − t_cur)·v`` computed in float32, returned in x's dtype."""
    dt = torch.as_tensor(t_next, dtype=torch.float32) - torch.as_tensor(t_cur, dtype=torch.float32)
    return (x.float() + dt.to(x.device) * velocity.float()).to(x.dtype)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def euler_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    grid: torch.Tensor,
    *,
    step_callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``grid[0]`` to ``grid[-1]``; one ``velocity_fn(x, t_model (B,), step)`` call per step.

    ``velocity_fn`` returns the (already guided) velocity; it may also apply conditioning (e.g. I2V frame
    replacement) to its input. ``step_callback(step, x)`` sees the latent after each step (previews).
    """
    for i in range(len(grid) - 1):
        t_model = model_timestep(grid[i], x.shape[0], x.device)
        x = euler_step(x, velocity_fn(x, t_model, i), grid[i], grid[i + 1])
        if step_callback is not None:
            step_callback(i, x)
    return x
