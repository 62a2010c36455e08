"""Timestep sampling (specs/training.md §5), loss weighting (§6) and ``--show_timesteps``.

Every method is a deterministic map from a uniform ``u`` (and ``n = Φ⁻¹(u)``) to ``t ∈ [0, 1]`` (``t = 1`` is pure
noise), so the stratified pool of ``--num_timestep_buckets`` and the fixed validation quantiles go through the same
formulas as free sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
_U_EPS = 1e-7
_SIGMA_FLOOR = 1e-3  # loss weights σ⁻² are evaluated at max(σ, 1e-3), the smallest sigma of the 1000-step grid


@dataclass(frozen=True)
class TimestepConfig:
    """The timestep options of a run (``from_args``)."""

    method: str = "sigma"
    weighting_scheme: str = "none"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: float | None = None
    max_timestep: float | None = None
    preserve_distribution_shape: bool = False

    @classmethod
    def from_args(cls, args: Any) -> TimestepConfig:
        cfg = cls(
            method=args.timestep_sampling,
            weighting_scheme=args.weighting_scheme,
            discrete_flow_shift=args.discrete_flow_shift,
            sigmoid_scale=args.sigmoid_scale,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
            min_timestep=args.min_timestep,
            max_timestep=args.max_timestep,
            preserve_distribution_shape=args.preserve_distribution_shape,
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        lo, hi = self.t_range_1000
        if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got {lo}, {hi}")

    @property
    def t_range_1000(self) -> tuple[float, float]:
        lo = 0.0 if self.min_timestep is None else float(self.min_timestep)
        hi = float(NUM_TRAIN_TIMESTEPS) if self.max_timestep is None else float(self.max_timestep)
        return lo, hi

    @property
    def has_range(self) -> bool:
        return self.min_timestep is not None or self.max_timestep is not None


def lin_fn(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through (x1, y1) and (x2, y2) evaluated at x."""
    m = (y2 - y1) / (x2 - x1)
    return m * x + (y1 - m * x1)


def time_shift(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``s·t / (1 + (s − 1)·t)``."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(method: str, h: int, w: int, discrete_flow_shift: float) -> float:
    """The shift ``s`` of the shift-family methods for latents of height ``h`` and width ``w``."""
    if method == "shift":
        return discrete_flow_shift
    if method in ("flux_shift", "qinglong_flux"):
        return math.exp(lin_fn(256, 0.5, 4096, 1.15, (h / 2) * (w / 2)))
    if method == "flux2_shift":
        return math.exp(lin_fn(256, 0.5, 4096, 1.15, h * w))
    if method in ("qwen_shift", "qinglong_qwen"):
        return math.exp(lin_fn(256, 0.5, 8192, 0.9, (h / 2) * (w / 2)))
    if method == "krea2_shift":
        return math.exp(lin_fn(256, 0.5, 6400, 1.15, (h / 2) * (w / 2)))
    raise ValueError(f"no resolution shift for {method}")


def normal_icdf(u: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(u) = √2·erfinv(2u − 1), with u kept inside (0, 1)."""
    u = u.clamp(_U_EPS, 1 - _U_EPS)
    return math.sqrt(2.0) * torch.erfinv(2 * u - 1)


def _logsnr(n: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * n) / 2)


def sigma_density(u: torch.Tensor, cfg: TimestepConfig) -> torch.Tensor:
    """The density transform of ``sigma`` sampling: ``u' `` from ``--weighting_scheme``."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal_icdf(u))
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def t_from_uniform(u: torch.Tensor, cfg: TimestepConfig, hw: tuple[int, int], choice: torch.Tensor | None = None) -> torch.Tensor:
    """Map uniforms ``u`` (float64 or float32, shape (B,)) to timesteps ``t`` in [0, 1] before range limits.

    ``choice`` (uniforms) picks the mixture component of the qinglong methods; ``hw`` is the latent (H, W).
    ``sigma`` already applies ``--min/max_timestep`` through its index (and returns grid values).
    """
    m = cfg.method
    n = normal_icdf(u)
    if m == "sigma":
        # grid index i (σ = 1 − i/1000, the reversed 1000-step scheduler grid); the full range equals the
        # reference's int(u'·1000); a --min/max_timestep range keeps σ in (min/1000, max/1000] like every method
        lo, hi = cfg.t_range_1000
        idx = (sigma_density(u, cfg) * (hi - lo) + (NUM_TRAIN_TIMESTEPS - hi)).floor()
        idx = idx.clamp(NUM_TRAIN_TIMESTEPS - hi, max(NUM_TRAIN_TIMESTEPS - lo - 1, NUM_TRAIN_TIMESTEPS - hi))
        return 1 - idx / NUM_TRAIN_TIMESTEPS
    if m == "uniform":
        return u
    if m == "sigmoid":
        return torch.sigmoid(cfg.sigmoid_scale * n)
    if m in ("shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift"):
        return time_shift(torch.sigmoid(cfg.sigmoid_scale * n), resolution_shift(m, *hw, cfg.discrete_flow_shift))
    if m == "ideogram4_shift":
        h, w = hw
        mu = 0.5 * math.log((16 * h) * (16 * w) / 512**2)
        lo, hi = 1 - 1 / (1 + math.exp(-7.5)), 1 - 1 / (1 + math.exp(9))
        return torch.sigmoid(mu + 1.5 * n).clamp(lo, hi)
    if m == "logsnr":
        return _logsnr(n, cfg.logit_mean, cfg.logit_std)
    if m in ("qinglong_flux", "qinglong_qwen"):
        if choice is None:
            choice = torch.rand_like(u)
        shifted = time_shift(torch.sigmoid(cfg.sigmoid_scale * n), resolution_shift(m, *hw, cfg.discrete_flow_shift))
        far = _logsnr(n, 5.36, 1.0)
        if m == "qinglong_flux":
            mid = _logsnr(n, cfg.logit_mean, cfg.logit_std)
            return torch.where(choice < 0.79, shifted, torch.where(choice < 0.90, mid, far))
        return torch.where(choice < 0.95, shifted, far)
    raise UserError(f"--timestep_sampling: unknown method {m!r}")


class TimestepSampler:
    """Draws ``t`` per sample with range limits (rescale or rejection) and computes loss weights."""

    MAX_REJECTION_ROUNDS = 1000

    def __init__(self, cfg: TimestepConfig):
        self.cfg = cfg
        self._warned_clamp = False

    def sample(
        self,
        batch_size: int,
        hw: tuple[int, int],
        device: torch.device | str = "cpu",
        uniforms: list[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``t`` of shape (B,) in float32; ``uniforms`` (the batch's stratified pool slice) replace fresh draws."""
        cfg = self.cfg
        if uniforms is not None:
            u = torch.tensor(uniforms, dtype=torch.float64)
            if u.numel() != batch_size:
                raise ValueError(f"timestep pool slice has {u.numel()} values for a batch of {batch_size}")
        else:
            u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        choice = torch.rand(batch_size, generator=generator, dtype=torch.float64) if "qinglong" in cfg.method else None
        t = t_from_uniform(u, cfg, hw, choice)
        if cfg.method != "sigma" and cfg.has_range:
            t = self._limit(t, hw, generator)
        return t.to(torch.float32).to(device)

    def _limit(self, t: torch.Tensor, hw: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        lo, hi = (x / NUM_TRAIN_TIMESTEPS for x in self.cfg.t_range_1000)
        if not self.cfg.preserve_distribution_shape:
            return t * (hi - lo) + lo
        for _ in range(self.MAX_REJECTION_ROUNDS):
            bad = (t < lo) | (t > hi)
            if not bad.any():
                return t
            k = int(bad.sum())
            u = torch.rand(k, generator=generator, dtype=torch.float64)
            choice = torch.rand(k, generator=generator, dtype=torch.float64)
            t[bad] = t_from_uniform(u, self.cfg, hw, choice)
        if not self._warned_clamp:
            logger.warning(
                f"--preserve_distribution_shape: some timesteps stayed outside [{lo:.3f}, {hi:.3f}] after "
                f"{self.MAX_REJECTION_ROUNDS} redraws and were clamped (the range is very unlikely under this method)"
            )
            self._warned_clamp = True
        return t.clamp(lo, hi)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight of ``--weighting_scheme`` at σ = t (σ floored at 1e-3 for ``sigma_sqrt``)."""
        scheme = self.cfg.weighting_scheme
        sigma = t.float().clamp(_SIGMA_FLOOR, 1.0)
        if scheme == "sigma_sqrt":
            return sigma**-2.0
        if scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return torch.ones_like(sigma)


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε`` with ``t`` of shape (B,) broadcast over the other dimensions."""
    tb = t.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - tb) * latents + tb * noise


def show_timesteps(args: Any, hw: tuple[int, int] = (64, 64), num_samples: int = 100_000) -> str:
    """Draw ``num_samples`` timesteps (and their loss weights) and show the histogram; returns the text or file path.

    ``console``: a text histogram printed to stdout. ``image``: ``<output_dir or .>/timesteps.png``.
    """
    from pathlib import Path

    cfg = TimestepConfig.from_args(args)
    sampler = TimestepSampler(cfg)
    gen = torch.Generator().manual_seed(0 if args.seed is None else int(args.seed))
    t = sampler.sample(num_samples, hw, generator=gen)
    w = sampler.loss_weight(t)
    bins = 40
    counts = torch.histc(t, bins=bins, min=0, max=1)
    weight_sum = torch.zeros(bins).index_add_(0, (t * bins).long().clamp(0, bins - 1), w)
    mean_w = weight_sum / counts.clamp(min=1)
    title = f"{cfg.method} (weighting {cfg.weighting_scheme}), {num_samples} samples, latent {hw[0]}x{hw[1]}"
    if args.show_timesteps == "console":
        top = float(counts.max())
        lines = [title, "    t      count  mean w"]
        for i in range(bins):
            bar = "#" * int(round(50 * float(counts[i]) / top))
            lines.append(f"{i / bins:5.3f} {int(counts[i]):8d} {float(mean_w[i]):7.3f} {bar}")
        text = "\n".join(lines)
        print(text)
        return text
    from PIL import Image, ImageDraw

    width, height, pad = 800, 400, 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = float(counts.max())
    bw = (width - 2 * pad) / bins
    for i in range(bins):
        h = (height - 2 * pad) * float(counts[i]) / top
        draw.rectangle([pad + i * bw, height - pad - h, pad + (i + 1) * bw - 1, height - pad], fill=(70, 110, 200))
    wmax = float(mean_w.max()) or 1.0
    pts = [(pad + (i + 0.5) * bw, height - pad - (height - 2 * pad) * float(mean_w[i]) / wmax) for i in range(bins)]
    draw.line(pts, fill=(220, 60, 60), width=2)
    draw.text((pad, 8), title + "  (bars: t histogram, red: mean loss weight)", fill="black")
    draw.text((pad, height - pad + 6), "t = 0", fill="black")
    draw.text((width - pad - 30, height - pad + 6), "t = 1", fill="black")
    out = Path(args.output_dir or ".") / "timesteps.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    logger.info(f"timestep distribution written to {out}")
    return str(out)
