"""DPM-Solver++ (multistep) for flow-matching models (``--scheduler dpm++``).

Uses diffusers' ``DPMSolverMultistepScheduler`` configured for flow matching (``use_flow_sigmas``,
``prediction_type="flow_prediction"``, ``flow_shift``, no dynamic shift) rather than a hand copy of the solver.
The sigma grid is replaced by the same shifted grid the Euler samplers use, ``shift(linspace(1, 0, N+1))`` with
``shift(t) = s·t / (1 + (s−1)·t)``, so ``--scheduler default`` and ``--scheduler dpm++`` evaluate the model at the
same noise levels and the model time is ``1000·σ`` (float, not diffusers' truncated integers).

Conventions (as in every flow sampler here): ``x_t = (1−σ)·x0 + σ·ε``, σ = 1 is noise, the model predicts the
velocity ``ε − x0``. The solver is deterministic (no SDE variant), so latent previews work with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from musubi_tuner.utils.errors import UserError

TIMESTEP_SCALE = 1000.0

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``N + 1`` float32 noise levels from 1 to 0: ``linspace(1, 0, N+1)`` shifted by ``shift``."""
    if num_steps < 1:
        raise UserError(f"the step count must be >= 1 (got {num_steps})")
    if shift <= 0:
        raise UserError(f"the flow shift must be > 0 (got {shift})")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    return shift * t / (1 + (shift - 1) * t)


def make_flow_dpmpp_scheduler(num_steps: int, shift: float, *, solver_order: int = 2, device: torch.device | str | None = None):
    """A ``DPMSolverMultistepScheduler`` (DPM-Solver++, midpoint, lower-order final step) on the flow grid.

    ``scheduler.sigmas`` holds the ``N + 1`` levels of ``flow_sigmas``; ``scheduler.timesteps`` the model times
    ``1000·σ`` of the ``N`` steps. Drive it with ``dpmpp_sample`` (or call ``scheduler.step(v, t, x)`` in order).
    """
    from diffusers import DPMSolverMultistepScheduler

    if solver_order not in (1, 2, 3):
        raise UserError(f"DPM++ solver order must be 1, 2 or 3 (got {solver_order})")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=solver_order,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=float(shift),
        use_dynamic_shifting=False,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps, device=device)
    sigmas = flow_sigmas(num_steps, shift)
    # Same levels as the Euler grid; the solver reads only ``sigmas`` once its step index is set.
    scheduler.sigmas = sigmas
    scheduler.timesteps = (sigmas[:-1] * TIMESTEP_SCALE).to(device) if device is not None else sigmas[:-1] * TIMESTEP_SCALE
    scheduler.set_begin_index(0)
    return scheduler


def dpmpp_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    num_steps: int,
    shift: float,
    *,
    solver_order: int = 2,
    step_callback: Callable[[int, torch.Tensor, float], None] | None = None,
) -> torch.Tensor:
    """Integrate from σ = 1 (``x`` = noise) to σ = 0 with DPM-Solver++.

    ``velocity_fn(x, t_model (B,), step_index)`` returns the (already guided) velocity, exactly as for the Euler
    samplers; ``step_callback(step_index, x, sigma_next)`` sees the latent after each step (previews). The update
    runs in float32 and the result keeps ``x``'s dtype.
    """
    scheduler = make_flow_dpmpp_scheduler(num_steps, shift, solver_order=solver_order)
    sigmas = scheduler.sigmas
    dtype = x.dtype
    sample = x.float()
    for i in range(num_steps):
        t_model = torch.full((x.shape[0],), float(sigmas[i]) * TIMESTEP_SCALE, device=x.device, dtype=torch.float32)
        v = velocity_fn(sample.to(dtype), t_model, i).float()
        sample = scheduler.step(v, scheduler.timesteps[i], sample, return_dict=False)[0]
        if step_callback is not None:
            step_callback(i, sample.to(dtype), float(sigmas[i + 1]))
    return sample.to(dtype)
