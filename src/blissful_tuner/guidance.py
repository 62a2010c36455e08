"""Classifier-free guidance and its extensions (specs/generation.md §1).

- ``parse_cfg_schedule``: the ``--cfg_schedule`` mini-language → per-step ``CfgStep(apply_cfg, scale)``.
- ``cfg_combine``: ``v_u + g·(v_c − v_u)``.
- ``cfg_zero_star_combine``: CFG-Zero★ with the per-sample (or per-frame) projection coefficient α.
- ``perp_neg_combine``: perpendicular negative guidance (three predictions).
- ``GuidancePlan``: the per-step decision for a whole run (which passes to compute, how to combine them, zero-init),
  built once from the parsed arguments with ``GuidancePlan.from_args``.

Steps are 1-based in the user syntax; step index ``i`` (0-based) is user step ``i + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from blissful_tuner.blissful_logger import get_logger
from musubi_tuner.utils.errors import UserError

logger = get_logger(__name__)

CFG_EPS = 1e-6
CFGZERO_EPS = 1e-8


def needs_uncond(scale: float) -> bool:
    """Whether a scale needs the unconditional pass: ``|g − 1| > 1e-6`` (§1.1)."""
    return abs(scale - 1.0) > CFG_EPS


@dataclass(frozen=True)
class CfgStep:
    """The guidance decision for one step: run CFG (uncond pass + combine) or not, and with which scale."""

    apply_cfg: bool
    scale: float


def _int_or_error(text: str, token: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"--cfg_schedule: {what} {text.strip()!r} in token {token!r} is not an integer") from None


def _token_steps(body: str, token: str, num_steps: int) -> list[int]:
    body = body.strip()
    if not body:
        raise UserError(f"--cfg_schedule: token {token!r} has no step, range or e~K")
    if body.lower().startswith("e~"):
        k = _int_or_error(body[2:], token, "interval")
        if k < 1:
            raise UserError(f"--cfg_schedule: interval in {token!r} must be >= 1")
        if k > num_steps:
            logger.warning(f"--cfg_schedule: {token!r} selects no step ({k} > {num_steps} steps)")
        return list(range(k, num_steps + 1, k))
    if "-" in body:
        parts = body.split("-")
        if len(parts) != 2:
            raise UserError(f"--cfg_schedule: malformed range {token!r} (use A-B with 1 <= A <= B <= {num_steps})")
        start = _int_or_error(parts[0], token, "range start")
        end = _int_or_error(parts[1], token, "range end")
        if start < 1 or end < 1:
            raise UserError(f"--cfg_schedule: range {token!r} must start at step 1 or later")
        if start > end:
            raise UserError(f"--cfg_schedule: range {token!r} starts after it ends")
        if end > num_steps:
            raise UserError(f"--cfg_schedule: range {token!r} ends after the last step ({num_steps})")
        return list(range(start, end + 1))
    step = _int_or_error(body, token, "step")
    if not 1 <= step <= num_steps:
        raise UserError(f"--cfg_schedule: step {token!r} is outside 1..{num_steps}")
    return [step]


def parse_cfg_schedule_map(schedule: str, num_steps: int, default_scale: float) -> dict[int, float]:
    """The ``{user step → scale}`` map of a schedule (§1.2). Raises ``UserError`` naming the bad token."""
    if num_steps < 1:
        raise UserError(f"--cfg_schedule needs at least one step (got {num_steps})")
    tokens = [t.strip() for t in schedule.split(",")]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise UserError("--cfg_schedule is empty (give steps such as '1-10, e~2:6.0')")
    included: dict[int, float] = {}
    excluded: set[int] = set()
    for token in tokens:
        exclude = token.startswith("!")
        body = token[1:] if exclude else token
        scale = default_scale
        if ":" in body:
            body, scale_text = body.rsplit(":", 1)
            try:
                scale = float(scale_text.strip())
            except ValueError:
                raise UserError(f"--cfg_schedule: scale {scale_text.strip()!r} in token {token!r} is not a number") from None
            if not math.isfinite(scale):
                raise UserError(f"--cfg_schedule: scale in token {token!r} must be finite")
        steps = _token_steps(body, token, num_steps)
        if exclude:
            excluded.update(steps)
        else:
            for s in steps:
                included[s] = scale  # later tokens overwrite earlier ones
    return {s: g for s, g in sorted(included.items()) if s not in excluded}


def parse_cfg_schedule(
    schedule: str | None, num_steps: int, default_scale: float, *, skip_last_step: bool = False
) -> list[CfgStep]:
    """Per-step guidance for ``num_steps`` steps (index ``i`` = user step ``i + 1``).

    Without a schedule every step uses ``default_scale``. A step runs CFG iff it is selected and its scale is not
    within 1e-6 of 1.0; other steps are cond-only (``apply_cfg=False``, ``scale=1.0``). ``skip_last_step`` also
    turns the last step cond-only (Blissful's Kandinsky 5 behaviour, off by default). Build the plan for the *final*
    step count: with an img2img strength that keeps only the last steps, pass the remaining count (user step 1 is
    then the first step that actually runs).
    """
    if num_steps < 1:
        raise UserError(f"the step count must be >= 1 (got {num_steps})")
    if schedule is None or not schedule.strip():
        mapping = {s: default_scale for s in range(1, num_steps + 1)}
    else:
        mapping = parse_cfg_schedule_map(schedule, num_steps, default_scale)
    plan = []
    for i in range(num_steps):
        scale = mapping.get(i + 1)
        run = scale is not None and needs_uncond(scale) and not (skip_last_step and i == num_steps - 1)
        plan.append(CfgStep(apply_cfg=run, scale=float(scale) if run else 1.0))
    return plan


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + g·(v_c − v_u)``."""
    return uncond + scale * (cond - uncond)


def _reduce_dims(x: torch.Tensor, frame_dim: int | None) -> tuple[int, ...]:
    keep = {0}
    if frame_dim is not None:
        keep.add(frame_dim % x.ndim)
    return tuple(d for d in range(x.ndim) if d not in keep)


def cfg_zero_star_alpha(cond: torch.Tensor, uncond: torch.Tensor, frame_dim: int | None = None) -> torch.Tensor:
    """``α = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e-8)`` per sample (dim 0), or per sample and frame with ``frame_dim``.

    Computed in float32 and returned with singleton reduced dimensions (broadcastable against the predictions).
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond shapes differ: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    dims = _reduce_dims(cond, frame_dim)
    c, u = cond.float(), uncond.float()
    if not dims:
        return (c * u) / (u * u + CFGZERO_EPS)
    return (c * u).sum(dim=dims, keepdim=True) / ((u * u).sum(dim=dims, keepdim=True) + CFGZERO_EPS)


def cfg_zero_star_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, frame_dim: int | None = None) -> torch.Tensor:
    """CFG-Zero★ (§1.3): ``v = α·v_u + g·(v_c − α·v_u)`` with α cast to the prediction dtype.

    ``frame_dim`` selects Blissful's per-frame α (e.g. 2 for ``(B, C, F, H, W)``); the default is the paper's
    per-sample α.
    """
    alpha = cfg_zero_star_alpha(cond, uncond, frame_dim).to(cond.dtype)
    scaled_uncond = alpha * uncond
    return scaled_uncond + scale * (cond - scaled_uncond)


def perp_neg_combine(cond: torch.Tensor, neg: torch.Tensor, nocond: torch.Tensor, scale: float, perp_neg: float) -> torch.Tensor:
    """Perpendicular negative guidance (§1.4), per sample: ``ε∅ + g·(pos − S·neg⊥)``.

    ``pos = ε₊ − ε∅``, ``neg = ε₋ − ε∅``, ``neg⊥ = neg − (⟨neg, pos⟩ / ‖pos‖²)·pos``.
    """
    pos = (cond - nocond).float()
    negd = (neg - nocond).float()
    dims = tuple(range(1, cond.ndim))
    if dims:
        dot = (negd * pos).sum(dim=dims, keepdim=True)
        norm2 = (pos * pos).sum(dim=dims, keepdim=True)
    else:
        dot, norm2 = negd * pos, pos * pos
    # A zero positive direction has no perpendicular component to remove: keep neg as it is.
    coef = torch.where(norm2 > 0, dot / norm2.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    neg_perp = negd - coef * pos
    return (nocond.float() + scale * (pos - perp_neg * neg_perp)).to(cond.dtype)


@dataclass
class GuidancePlan:
    """How every step of one run is guided.

    Per step ``i``: ``needs_uncond(i)`` — compute the negative-prompt prediction; ``needs_nocond(i)`` — also the
    empty-prompt prediction (perpendicular negative guidance); ``combine(i, cond, uncond, nocond)`` — the final
    prediction, including CFG-Zero★ zero-init (``--cfgzerostar_init_steps N``: user steps 1..N are multiplied by
    ``--cfgzerostar_multiplier``, whether or not CFG runs on them).
    """

    steps: list[CfgStep]
    cfgzerostar: bool = False
    cfgzerostar_frame_dim: int | None = None
    zero_init_steps: int = -1
    zero_init_multiplier: float = 0.0
    perp_neg: float | None = None

    def __post_init__(self) -> None:
        if self.cfgzerostar and self.perp_neg is not None:
            raise UserError("--cfgzerostar_scaling and --perp_neg cannot be combined")

    @classmethod
    def build(
        cls,
        num_steps: int,
        guidance_scale: float,
        *,
        cfg_schedule: str | None = None,
        skip_last_step: bool = False,
        cfgzerostar: bool = False,
        cfgzerostar_frame_dim: int | None = None,
        zero_init_steps: int = -1,
        zero_init_multiplier: float = 0.0,
        perp_neg: float | None = None,
    ) -> GuidancePlan:
        """A plan for ``num_steps`` steps (see ``parse_cfg_schedule``)."""
        steps = parse_cfg_schedule(cfg_schedule, num_steps, guidance_scale, skip_last_step=skip_last_step)
        return cls(steps, cfgzerostar, cfgzerostar_frame_dim, zero_init_steps, zero_init_multiplier, perp_neg)

    @classmethod
    def from_args(
        cls, args: Any, num_steps: int, guidance_scale: float, *, cfgzerostar_frame_dim: int | None = None
    ) -> GuidancePlan:
        """A plan from the options of ``add_blissful_generation_args`` (missing attributes mean "off")."""
        return cls.build(
            num_steps,
            guidance_scale,
            cfg_schedule=getattr(args, "cfg_schedule", None),
            skip_last_step=bool(getattr(args, "cfg_skip_last_step", False)),
            cfgzerostar=bool(getattr(args, "cfgzerostar_scaling", False)),
            cfgzerostar_frame_dim=cfgzerostar_frame_dim,
            zero_init_steps=int(getattr(args, "cfgzerostar_init_steps", -1) or -1),
            zero_init_multiplier=float(getattr(args, "cfgzerostar_multiplier", 0.0) or 0.0),
            perp_neg=getattr(args, "perp_neg", None),
        )

    def __len__(self) -> int:
        return len(self.steps)

    def needs_uncond(self, i: int) -> bool:
        """Whether step ``i`` needs the negative-prompt (unconditional) prediction."""
        return self.steps[i].apply_cfg

    def needs_nocond(self, i: int) -> bool:
        """Whether step ``i`` needs the empty-prompt prediction (perpendicular negative guidance only)."""
        return self.steps[i].apply_cfg and self.perp_neg is not None

    def scale(self, i: int) -> float:
        """The CFG scale of step ``i`` (1.0 where CFG does not run)."""
        return self.steps[i].scale

    def zero_init_active(self, i: int) -> bool:
        """Whether CFG-Zero★ zero-init scales step ``i`` (user steps 1..``zero_init_steps``)."""
        return self.zero_init_steps >= 1 and i < self.zero_init_steps

    def combine(
        self, i: int, cond: torch.Tensor, uncond: torch.Tensor | None = None, nocond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The guided prediction of step ``i`` from the predictions the step asked for."""
        step = self.steps[i]
        if not step.apply_cfg:
            out = cond
        else:
            if uncond is None:
                raise ValueError(f"step {i + 1} runs CFG but no unconditional prediction was given")
            if self.perp_neg is not None:
                if nocond is None:
                    raise ValueError(f"step {i + 1} uses --perp_neg but no empty-prompt prediction was given")
                out = perp_neg_combine(cond, uncond, nocond, step.scale, self.perp_neg)
            elif self.cfgzerostar:
                out = cfg_zero_star_combine(cond, uncond, step.scale, frame_dim=self.cfgzerostar_frame_dim)
            else:
                out = cfg_combine(cond, uncond, step.scale)
        if self.zero_init_active(i):
            out = out * self.zero_init_multiplier
        return out

    def describe(self) -> str:
        """A one-line summary for logs: how many steps run CFG and with which scales."""
        cfg = [i + 1 for i, s in enumerate(self.steps) if s.apply_cfg]
        scales = sorted({s.scale for s in self.steps if s.apply_cfg})
        return f"CFG on {len(cfg)}/{len(self.steps)} steps" + (f" (scales {', '.join(f'{g:g}' for g in scales)})" if scales else "")
