"""Kandinsky 5 sampler: shifted grid, Euler integration, CFG (specs/kandinsky5.md §8)."""

from __future__ import annotations

import pytest
import torch

from musubi_tuner.kandinsky5.sampling import (
    cfg_combine,
    euler_sample,
    euler_step,
    model_timestep,
    needs_uncond,
    timestep_grid,
)
from musubi_tuner.utils.errors import UserError


@pytest.mark.parametrize("steps, s", [(50, 10.0), (16, 5.0), (50, 3.0), (4, 1.0)])
def test_grid_is_shifted_linspace(steps, s):
    grid = timestep_grid(steps, s)
    expected = [s * (1 - i / steps) / (1 + (s - 1) * (1 - i / steps)) for i in range(steps + 1)]
    assert grid.dtype == torch.float32 and len(grid) == steps + 1
    assert torch.allclose(grid.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert grid[0] == 1.0 and grid[-1] == 0.0


def test_grid_is_shifted_once():
    # s = 10, N = 50: the second grid point of a single shift is 10·0.98 / (1 + 9·0.98) = 0.99795...
    assert abs(timestep_grid(50, 10.0)[1].item() - 9.8 / 9.82) < 1e-6


def test_invalid_grid_arguments():
    with pytest.raises(UserError, match="infer_steps"):
        timestep_grid(0, 5.0)
    with pytest.raises(UserError, match="scheduler_scale"):
        timestep_grid(10, 0.0)


def test_cfg_rules():
    assert not needs_uncond(1.0) and not needs_uncond(1.0 + 5e-7)
    assert needs_uncond(1.00001) and needs_uncond(0.5) and needs_uncond(5.0)
    vc, vu = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(vc, vu, 5.0), torch.tensor([6.0, -9.0]))
    assert torch.equal(cfg_combine(vc, vu, 1.0), vc)


def test_model_timestep_is_exactly_1000_t():
    assert torch.equal(model_timestep(0.25, batch_size=3), torch.tensor([250.0, 250.0, 250.0]))
    assert torch.equal(model_timestep(torch.tensor([0.5, 1.0])), torch.tensor([500.0, 1000.0]))


def test_euler_integrates_the_exact_flow():
    """With the true velocity noise - x0 of x_t = (1-t)·x0 + t·noise, Euler lands on x0 from pure noise."""
    x0, noise = torch.randn(1, 2, 4, 4, 16), torch.randn(1, 2, 4, 4, 16)
    grid = timestep_grid(7, 10.0)
    seen_t = []

    def velocity(x, t, step):
        seen_t.append(t.clone())
        return noise - x0

    out = euler_sample(velocity, noise.clone(), grid)
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(seen_t) == 7 and torch.allclose(torch.cat(seen_t), grid[:-1] * 1000)
    step = euler_step(noise.bfloat16(), (noise - x0), 1.0, 0.5)
    assert step.dtype == torch.bfloat16
    assert torch.allclose(step.float(), (noise.bfloat16().float() - 0.5 * (noise - x0)).bfloat16().float())
