"""DPM-Solver++ (multistep, order 2) for flow-matching models, deterministic (``dpm++``) or stochastic (``dpm++sde``).

The one implementation behind every generator's and every trainer sample's DPM++ (Kandinsky 5 ``--scheduler``,
Wan ``--sample_solver``). It configures diffusers' ``DPMSolverMultistepScheduler`` for flow matching
(``use_flow_sigmas``, ``prediction_type="flow_prediction"``, no dynamic shift) rather than copying the solver, and
replaces its sigma grid by the shifted Euler grid ``shift(linspace(1, 0, N+1))`` with ``shift(t) = s·t / (1 + (s−1)·t)``
(the official Wan ``get_sampling_sigmas`` grid), so every solver evaluates the model at the same noise levels and the
model time is ``1000·σ`` (a float, not diffusers' truncated integers).

Conventions: ``x_σ = (1−σ)·x0 + σ·ε``, σ = 1 is noise, the model predicts the velocity ``ε − x0``; the solver works on
the data prediction ``x̂0 = x − σ·v`` with ``α = 1 − σ`` and ``λ = log(α/σ)``.

- ``dpm++`` (``algorithm_type="dpmsolver++"``, midpoint): deterministic.
- ``dpm++sde`` (``algorithm_type="sde-dpmsolver++"``, midpoint, blissful-tuner's option): with ``h = λ' − λ``,
  ``x' = (σ'/σ)·e^(−h)·x + α'·(1 − e^(−2h))·(D0 + ½·D1) + σ'·√(1 − e^(−2h))·z``, ``z`` fresh Gaussian noise drawn
  from the caller's generator each step (seeded runs repeat exactly); ``D1 = 0`` on first-order steps (the first and
  the last). It adds noise every step, so latent previews are refused with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from musubi_tuner.utils.errors import UserError

TIMESTEP_SCALE = 1000.0
ALGORITHMS = {"dpm++": "dpmsolver++", "dpm++sde": "sde-dpmsolver++"}

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def shift_sigmas(x: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·x / (1 + (s − 1)·x)``."""
    return shift * x / (1 + (shift - 1) * x)


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``N + 1`` float32 noise levels from 1 to 0: ``shift(linspace(1, 0, N+1))`` (computed in float64)."""
    if num_steps < 1:
        raise UserError(f"the step count must be >= 1 (got {num_steps})")
    if shift <= 0:
        raise UserError(f"the flow shift must be > 0 (got {shift})")
    return shift_sigmas(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).float()


def make_flow_dpmpp_scheduler(
    num_steps: int,
    shift: float,
    *,
    solver_order: int = 2,
    sde: bool = False,
    device: torch.device | str | None = None,
):
    """A ``DPMSolverMultistepScheduler`` (DPM-Solver++ or its SDE variant, midpoint, first-order final step) on the flow
    grid.

    ``scheduler.sigmas`` holds the ``N + 1`` levels of ``flow_sigmas``; ``scheduler.timesteps`` the model times
    ``1000·σ`` of the ``N`` steps. Drive it with ``dpmpp_sample`` (or call ``scheduler.step(v, t, x)`` in order; the SDE
    variant takes ``generator=``).
    """
    from diffusers import DPMSolverMultistepScheduler

    if solver_order not in (1, 2, 3):
        raise UserError(f"DPM++ solver order must be 1, 2 or 3 (got {solver_order})")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=solver_order,
        prediction_type="flow_prediction",
        algorithm_type=ALGORITHMS["dpm++sde" if sde else "dpm++"],
        solver_type="midpoint",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=float(shift),
        use_dynamic_shifting=False,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps, device=device)
    sigmas = flow_sigmas(num_steps, shift)
    # The Euler grid's levels; the solver reads only ``sigmas`` once its step index is set.
    scheduler.sigmas = sigmas
    scheduler.timesteps = sigmas[:-1] * TIMESTEP_SCALE if device is None else (sigmas[:-1] * TIMESTEP_SCALE).to(device)
    scheduler.set_begin_index(0)
    return scheduler


def dpmpp_step(scheduler, velocity: torch.Tensor, index: int, x: torch.Tensor, generator: torch.Generator | None = None):
    """One solver step from σ_index to σ_index+1 (float32 math and result); ``generator`` draws the SDE noise."""
    kw = {"generator": generator} if scheduler.config.algorithm_type == ALGORITHMS["dpm++sde"] else {}
    return scheduler.step(velocity.float(), scheduler.timesteps[index], x.float(), return_dict=False, **kw)[0]


def dpmpp_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    num_steps: int,
    shift: float,
    *,
    solver_order: int = 2,
    sde: bool = False,
    generator: torch.Generator | None = None,
    step_callback: Callable[[int, torch.Tensor, float], None] | None = None,
) -> torch.Tensor:
    """Integrate from σ = 1 (``x`` = noise) to σ = 0 with DPM-Solver++ (``sde``: the stochastic variant, its noise from
    ``generator``).

    ``velocity_fn(x, t_model (B,), step_index)`` returns the (already guided) velocity, exactly as for the Euler
    samplers; ``step_callback(step_index, x, sigma_next)`` sees the latent after each step (previews). The update
    runs in float32 and the result keeps ``x``'s dtype.
    """
    scheduler = make_flow_dpmpp_scheduler(num_steps, shift, solver_order=solver_order, sde=sde)
    sigmas = scheduler.sigmas
    dtype = x.dtype
    sample = x.float()
    for i in range(num_steps):
        t_model = torch.full((x.shape[0],), float(sigmas[i]) * TIMESTEP_SCALE, device=x.device, dtype=torch.float32)
        v = velocity_fn(sample.to(dtype), t_model, i)
        sample = dpmpp_step(scheduler, v, i, sample, generator)
        if step_callback is not None:
            step_callback(i, sample.to(dtype), float(sigmas[i + 1]))
    return sample.to(dtype)
