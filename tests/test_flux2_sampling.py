"""FLUX.2 schedule: empirical μ check values, the shifted grid vs diffusers, flux2_shift training sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from musubi_tuner.flux_2.sampling import empirical_mu, get_schedule, pack_latents, unpack_latents
from musubi_tuner.training.timesteps import resolution_shift


@pytest.mark.parametrize("tokens, steps, expected", [(4096, 50, 2.02335), (4096, 4, 2.29118), (1024, 50, 1.70196)])
def test_empirical_mu_check_values(tokens, steps, expected):
    assert empirical_mu(tokens, steps) == pytest.approx(expected, abs=1e-5)


def test_empirical_mu_large_images_use_m200():
    assert empirical_mu(8192, 50) == pytest.approx(0.00016927 * 8192 + 0.45666666)
    assert empirical_mu(8192, 4) == empirical_mu(8192, 50)


@pytest.mark.parametrize("tokens, steps", [(4096, 50), (1024, 4), (6000, 28)])
def test_schedule_matches_diffusers(tokens, steps):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    mu = empirical_mu(tokens, steps)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    ours = get_schedule(steps, tokens)
    assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.allclose(ours, sched.sigmas.float(), atol=2e-7)
    # formula computed independently: e^mu / (e^mu + 1/t - 1)
    t = 1 - 3 / steps
    assert ours[3].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / t - 1), rel=1e-6)


def test_flux2_shift_at_1024_equals_m200():
    """A 1024x1024 image is 64x64 = 4096 packed tokens: flux2_shift's μ is 1.15 = the 200-step empirical μ."""
    s = resolution_shift("flux2_shift", 64, 64, 1.0)
    assert math.log(s) == pytest.approx(1.15)
    assert math.log(s) == pytest.approx(empirical_mu(4096, 200), abs=1e-4)


def test_pack_roundtrip_row_major():
    z = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    tok = pack_latents(z)
    assert tok.shape == (2, 8, 3)
    assert tok[0, 5].tolist() == z[0, :, 1, 1].tolist()  # token 5 = row 1, column 1
    assert torch.equal(unpack_latents(tok, 2, 4), z)
