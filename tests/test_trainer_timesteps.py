"""Timestep sampling (specs/training.md §5) and loss weighting (§6): empirical distributions against CDFs written
independently here with ``statistics.NormalDist``."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from musubi_tuner.training.args import setup_parser_common
from musubi_tuner.training.timesteps import TimestepConfig, TimestepSampler, show_timesteps

PHI = NormalDist()
N = 200_000
HW = (64, 48)  # latent h, w


def logit(x: float) -> float:
    return math.log(x / (1 - x))


def unshift(y: float, s: float) -> float:
    """Inverse of s·t / (1 + (s−1)·t)."""
    return y / (s - (s - 1) * y)


def cdf_sigmoid_shift(x: float, s: float, scale: float = 1.0) -> float:
    return PHI.cdf(logit(unshift(x, s)) / scale)


def cdf_logsnr(x: float, mean: float, std: float) -> float:
    # t = sigmoid(-λ/2) <= x  <=>  λ >= -2·logit(x)
    return 1 - PHI.cdf((-2 * logit(x) - mean) / std)


def flux_s(h: int, w: int, x2: float = 4096, y2: float = 1.15, tokens: float | None = None) -> float:
    x = tokens if tokens is not None else (h / 2) * (w / 2)
    m = (y2 - 0.5) / (x2 - 256)
    return math.exp(m * x + 0.5 - m * 256)


def draw(method: str, **kw) -> torch.Tensor:
    cfg = TimestepConfig(method=method, **kw)
    return TimestepSampler(cfg).sample(N, HW, generator=torch.Generator().manual_seed(0)).double()


def empirical_cdf(t: torch.Tensor, x: float) -> float:
    return float((t <= x).double().mean())


POINTS = (0.05, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95)
TOL = 0.006  # ~ 4 standard errors at N = 200k


@pytest.mark.parametrize(
    "method,kw,cdf",
    [
        ("uniform", {}, lambda x: x),
        ("sigmoid", {"sigmoid_scale": 1.5}, lambda x: PHI.cdf(logit(x) / 1.5)),
        ("shift", {"discrete_flow_shift": 3.0}, lambda x: cdf_sigmoid_shift(x, 3.0)),
        ("flux_shift", {}, lambda x: cdf_sigmoid_shift(x, flux_s(*HW))),
        ("flux2_shift", {}, lambda x: cdf_sigmoid_shift(x, flux_s(*HW, tokens=HW[0] * HW[1]))),
        ("qwen_shift", {}, lambda x: cdf_sigmoid_shift(x, flux_s(*HW, x2=8192, y2=0.9))),
        ("krea2_shift", {}, lambda x: cdf_sigmoid_shift(x, flux_s(*HW, x2=6400, y2=1.15))),
        ("logsnr", {"logit_mean": -0.5, "logit_std": 1.2}, lambda x: cdf_logsnr(x, -0.5, 1.2)),
        (
            "qinglong_flux",
            {"logit_mean": 0.3, "logit_std": 0.8},
            lambda x: 0.79 * cdf_sigmoid_shift(x, flux_s(*HW)) + 0.11 * cdf_logsnr(x, 0.3, 0.8) + 0.10 * cdf_logsnr(x, 5.36, 1.0),
        ),
        (
            "qinglong_qwen",
            {},
            lambda x: 0.95 * cdf_sigmoid_shift(x, flux_s(*HW, x2=8192, y2=0.9)) + 0.05 * cdf_logsnr(x, 5.36, 1.0),
        ),
    ],
)
def test_distribution_matches_cdf(method, kw, cdf):
    t = draw(method, **kw)
    assert 0 <= float(t.min()) and float(t.max()) <= 1
    for x in POINTS:
        assert abs(empirical_cdf(t, x) - cdf(x)) < TOL, (method, x)


def test_ideogram4_shift_is_clamped_logit_normal():
    t = draw("ideogram4_shift")
    mu = 0.5 * math.log((16 * HW[0]) * (16 * HW[1]) / 512**2)
    lo, hi = 1 - 1 / (1 + math.exp(-7.5)), 1 - 1 / (1 + math.exp(9))
    assert float(t.min()) >= lo - 1e-6 and float(t.max()) <= hi + 1e-6
    for x in (0.2, 0.5, 0.8):
        assert abs(empirical_cdf(t, x) - PHI.cdf((logit(x) - mu) / 1.5)) < TOL


def test_sigma_uses_unshifted_grid_and_weighting_density():
    # logit_normal density on the reversed 1000-step grid; --discrete_flow_shift is ignored (reference behaviour)
    t = draw("sigma", weighting_scheme="logit_normal", logit_mean=0.4, discrete_flow_shift=5.0)
    grid = torch.round(t * 1000)
    assert torch.allclose(grid / 1000, t, atol=1e-6)
    # σ = 1 − floor(1000·sigmoid(0.4 + n))/1000  ⇒  P(σ <= x) = P(sigmoid(0.4+n) >= 1 − x) (up to one grid cell)
    for x in (0.2, 0.5, 0.8):
        expected = 1 - PHI.cdf(logit(1 - x) - 0.4)
        assert abs(empirical_cdf(t, x) - expected) < TOL + 1e-3
    uni = draw("sigma")
    assert abs(float(uni.mean()) - 0.5005) < 0.003


def test_mode_weighting_density():
    t = draw("sigma", weighting_scheme="mode", mode_scale=1.29)
    u = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = 1 - torch.floor((1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)) * 1000) / 1000
    assert abs(float(t.mean()) - float(ref.mean())) < 0.004
    assert abs(float(t.std()) - float(ref.std())) < 0.004


def test_range_rescale_changes_shape_linearly():
    t = draw("uniform", min_timestep=200, max_timestep=800)
    assert 0.2 <= float(t.min()) and float(t.max()) <= 0.8
    assert abs(float(t.mean()) - 0.5) < 0.003
    assert abs(empirical_cdf(t, 0.35) - 0.25) < TOL
    s = draw("sigma", min_timestep=300, max_timestep=700)
    assert 0.3 < float(s.min()) and float(s.max()) <= 0.7 + 1e-6


def test_preserve_distribution_shape_is_truncation():
    t = draw("shift", discrete_flow_shift=3.0, min_timestep=400, max_timestep=900, preserve_distribution_shape=True)
    assert 0.4 <= float(t.min()) and float(t.max()) <= 0.9
    lo, hi = cdf_sigmoid_shift(0.4, 3.0), cdf_sigmoid_shift(0.9, 3.0)
    for x in (0.5, 0.7, 0.85):
        expected = (cdf_sigmoid_shift(x, 3.0) - lo) / (hi - lo)
        assert abs(empirical_cdf(t, x) - expected) < TOL


def test_preserve_shape_clamps_after_max_rounds():
    cfg = TimestepConfig(
        method="logsnr", logit_mean=60.0, logit_std=0.1, min_timestep=900, max_timestep=1000, preserve_distribution_shape=True
    )
    sampler = TimestepSampler(cfg)
    sampler.MAX_REJECTION_ROUNDS = 3
    t = sampler.sample(8, HW)
    assert torch.all(t >= 0.9 - 1e-6)


def test_stratified_uniforms_go_through_the_formula():
    cfg = TimestepConfig(method="shift", discrete_flow_shift=2.0)
    pool = [0.05, 0.35, 0.65, 0.95]
    t = TimestepSampler(cfg).sample(4, HW, uniforms=pool)
    expected = []
    for u in pool:
        y = 1 / (1 + math.exp(-PHI.inv_cdf(u)))
        expected.append(2 * y / (1 + y))
    assert torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_loss_weights():
    t = torch.tensor([0.1, 0.5, 0.9])
    w = TimestepSampler(TimestepConfig(weighting_scheme="sigma_sqrt")).loss_weight(t)
    assert torch.allclose(w, torch.tensor([100.0, 4.0, 1 / 0.81]), rtol=1e-5)
    w = TimestepSampler(TimestepConfig(weighting_scheme="cosmap")).loss_weight(t)
    expected = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)]
    assert torch.allclose(w, torch.tensor(expected), rtol=1e-5)
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(TimestepSampler(TimestepConfig(weighting_scheme=scheme)).loss_weight(t), torch.ones(3))


def test_show_timesteps_console_and_image(tmp_path, capsys):
    args = setup_parser_common().parse_args(
        ["--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--show_timesteps", "console"]
    )
    text = show_timesteps(args, num_samples=5000)
    assert "shift" in capsys.readouterr().out and text.count("\n") == 41
    args = setup_parser_common().parse_args(["--show_timesteps", "image", "--output_dir", str(tmp_path)])
    path = show_timesteps(args, num_samples=5000)
    from PIL import Image

    assert Image.open(path).size == (800, 400)
