"""Wan schedules (specs/wan.md §7): UniPC / DPM++ / Euler grids against the spec's formulas, solver consistency,
expert routing and the V2V start index."""

from __future__ import annotations

import math

import pytest
import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.sampling import SOLVERS, cfg_combine, denoise_start_index, expert_for, make_sampler


def _shift(x: float, s: float) -> float:
    return s * x / (1 + (s - 1) * x)


@pytest.mark.parametrize("steps, shift", [(4, 5.0), (10, 3.0)])
def test_unipc_grid_is_the_spec_formula(steps, shift):
    f = make_sampler("unipc", steps, shift)
    base = [1 + (1 / 1000 - 1) * i / steps for i in range(steps)]  # linspace(1, 1/1000, N + 1)[:-1]
    want = [_shift(x, shift) for x in base]
    got = f.sigmas.tolist()
    assert len(got) == steps + 1 and got[-1] == 0.0
    for g, w in zip(got, want):
        assert math.isclose(g, w, abs_tol=2e-6)  # diffusers nudges the first sigma by 1e-6
    assert torch.allclose(f.model_timesteps, f.sigmas[:-1] * 1000)


@pytest.mark.parametrize("solver", ["dpm++", "vanilla"])
def test_official_grid(solver):
    f = make_sampler(solver, 5, 16.0)
    want = [_shift(1 - i / 5, 16.0) for i in range(6)]
    assert f.sigmas.tolist() == pytest.approx(want, abs=1e-6)
    assert f.model_timesteps[0].item() == pytest.approx(1000.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_reaches_x0_with_the_exact_velocity(solver):
    """On a straight flow path the exact velocity is (x_σ − x0)/σ; every solver must land on x0."""
    g = torch.Generator().manual_seed(0)
    x0, x = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    f = make_sampler(solver, 7, 3.0)
    for i in range(f.num_steps):
        x = f.step((x - x0) / f.sigmas[i], i, x)
    assert (x - x0).abs().max() < 1e-5


def test_cfg_expert_routing_and_denoise_index():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_combine(c, u, 5.0).item() == 6.0
    assert expert_for(0.875, 0.875) == "high" and expert_for(0.8749, 0.875) == "low" and expert_for(0.5, None) is None
    assert denoise_start_index(40, 1.0) == 0 and denoise_start_index(40, 0.25) == 30
    with pytest.raises(UserError, match="--denoise_strength"):
        denoise_start_index(40, 0.0)
    with pytest.raises(UserError, match="--sample_solver"):
        make_sampler("euler_a", 4, 5.0)
