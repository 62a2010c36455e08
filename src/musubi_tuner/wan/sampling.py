"""Wan sampling schedules (specs/wan.md §7): UniPC and DPM++ through diffusers schedulers, vanilla Euler, LCM, CFG.

Conventions: σ = 1 is noise, σ = 0 data, ``x_σ = (1 − σ)·x0 + σ·ε``; the DiT predicts the velocity ``ε − x0`` and
receives ``σ·1000`` (a float, not diffusers' truncated integer timesteps).

- ``unipc`` (official default): ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=s)`` (order 2, bh2, predict x0): σ = shift(linspace(1, 1/1000, N + 1)[:-1]), final σ 0.
- ``dpm++``: the official ``get_sampling_sigmas`` grid σ = shift(linspace(1, 0, N + 1)[:N]) driven by
  ``DPMSolverMultistepScheduler`` (DPM-Solver++ order 2, flow prediction), final σ 0 — the shared solver of
  ``modules.flow_dpmpp``.
- ``dpm++sde`` (blissful-tuner): the same grid and solver, stochastic variant (``sde-dpmsolver++``); its fresh noise
  comes from the run's generator, so a seed repeats the video.
- ``vanilla``: Euler on the ``dpm++`` grid.
- ``lcm`` (blissful-tuner, for distilled models / LoRAs): ``x̂0 = x − σ·v``, then ``(1 − σ')·x̂0 + σ'·ε`` with fresh ε.

``shift(x) = s·x / (1 + (s − 1)·x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from musubi_tuner.modules.flow_dpmpp import dpmpp_step, flow_sigmas, make_flow_dpmpp_scheduler
from musubi_tuner.utils.errors import UserError

SOLVERS = ("unipc", "dpm++", "dpm++sde", "vanilla", "lcm")
NUM_TRAIN_TIMESTEPS = 1000
CFG_EPS = 1e-6


@dataclass
class FlowSampler:
    """One sampling run: ``sigmas`` (N + 1, last 0), ``model_timesteps`` (N,) = ``1000·σ``, ``step(v, i, x)``."""

    solver: str
    sigmas: torch.Tensor
    scheduler: Any = None
    generator: torch.Generator | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def model_timesteps(self) -> torch.Tensor:
        return self.sigmas[:-1] * NUM_TRAIN_TIMESTEPS

    def start_at(self, index: int) -> None:
        """Begin at step ``index`` (V2V / ``--denoise_strength``): the multistep history starts empty there."""
        if self.scheduler is not None:
            self.scheduler.set_begin_index(index)

    def step(self, velocity: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` at σ_{i+1} from the velocity at σ_i (float32 math; returned as float32)."""
        v, xf = velocity.float(), x.float()
        if self.solver == "lcm":
            x0 = xf - self.sigmas[index].item() * v
            nxt = self.sigmas[index + 1].item()
            if nxt == 0.0:
                return x0
            eps = torch.randn(x0.shape, generator=self.generator, device=self.generator.device if self.generator else "cpu")
            return (1 - nxt) * x0 + nxt * eps.to(x0.device)
        if self.scheduler is None:
            return xf + (self.sigmas[index + 1] - self.sigmas[index]).item() * v
        if self.solver.startswith("dpm++"):
            return dpmpp_step(self.scheduler, v, index, xf, self.generator)
        return self.scheduler.step(v, self.scheduler.timesteps[index], xf, return_dict=False)[0]


def make_sampler(
    solver: str, num_steps: int, shift: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> FlowSampler:
    """The sampler of ``--sample_solver`` for ``num_steps`` steps and ``--flow_shift`` (``generator``: the fresh noise of
    lcm and dpm++sde)."""
    if solver not in SOLVERS:
        raise UserError(f"--sample_solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if num_steps < 1:
        raise UserError(f"--infer_steps must be >= 1 (got {num_steps})")
    if shift <= 0:
        raise UserError(f"--flow_shift must be > 0 (got {shift})")
    if solver in ("vanilla", "lcm"):
        return FlowSampler(solver, flow_sigmas(num_steps, shift), generator=generator)
    if solver == "unipc":
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=float(shift),
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        sched.set_timesteps(num_steps, device=device)
        sched.set_begin_index(0)
        return FlowSampler(solver, sched.sigmas.float().cpu(), sched)
    sched = make_flow_dpmpp_scheduler(num_steps, shift, sde=solver == "dpm++sde")
    return FlowSampler(solver, sched.sigmas, sched, generator=generator)


def needs_uncond(guidance: float) -> bool:
    """Whether CFG needs the unconditional pass."""
    return abs(guidance - 1.0) > CFG_EPS


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """``u + w·(c − u)``."""
    return v_uncond + guidance * (v_cond - v_uncond)


def expert_for(sigma: float, boundary: float | None) -> str | None:
    """Two-expert models: ``high`` while ``t ≥ boundary`` (t = σ, compared on the 0..1000 scale), else ``low``."""
    if boundary is None:
        return None
    return "high" if sigma * NUM_TRAIN_TIMESTEPS >= boundary * NUM_TRAIN_TIMESTEPS else "low"


def denoise_start_index(num_steps: int, strength: float) -> int:
    """First step that runs for V2V / I2I with ``--denoise_strength`` p: the last ``round(N·p)`` steps run."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--denoise_strength must be in (0, 1] (got {strength})")
    return num_steps - max(1, round(num_steps * strength))


StepCallback = Callable[[int, torch.Tensor, float], None]
