"""CFG schedule mini-language, CFG combination, CFG-Zero* and perpendicular negative guidance."""

from __future__ import annotations

import pytest
import torch

from blissful_tuner.guidance import (
    CfgStep,
    GuidancePlan,
    cfg_combine,
    cfg_zero_star_combine,
    parse_cfg_schedule,
    parse_cfg_schedule_map,
    perp_neg_combine,
)
from musubi_tuner.utils.errors import UserError


def test_spec_worked_example():
    m = parse_cfg_schedule_map("e~2:6.4, 1-10, 46-50", 50, 5.0)
    assert all(m[s] == 5.0 for s in list(range(1, 11)) + list(range(46, 51)))
    assert all(m[s] == 6.4 for s in range(12, 45, 2))
    assert all(s not in m for s in range(11, 46, 2))
    m2 = parse_cfg_schedule_map("e~2:6.4, 1-10, 46-50, !1-3", 50, 5.0)
    assert set(m) - set(m2) == {1, 2, 3}


def test_token_kinds_and_whitespace():
    assert parse_cfg_schedule_map(" 3 ,, 5-6:2.5 ", 8, 4.0) == {3: 4.0, 5: 2.5, 6: 2.5}
    assert parse_cfg_schedule_map("e~3", 10, 4.0) == {3: 4.0, 6: 4.0, 9: 4.0}


def test_later_token_overwrites_and_exclusions_apply_wherever_they_are():
    assert parse_cfg_schedule_map("1-4:3, 2:7", 4, 5.0) == {1: 3.0, 2: 7.0, 3: 3.0, 4: 3.0}
    # Exclusion first in the string still removes steps included later; its scale is ignored.
    assert parse_cfg_schedule_map("!2:9, 1-3", 3, 5.0) == {1: 5.0, 3: 5.0}


def test_per_step_plan_skips_uncond_off_schedule_and_at_scale_one():
    plan = parse_cfg_schedule("1-2, 3:1.0", 4, 6.0)
    assert plan == [CfgStep(True, 6.0), CfgStep(True, 6.0), CfgStep(False, 1.0), CfgStep(False, 1.0)]
    assert all(not s.apply_cfg for s in parse_cfg_schedule(None, 3, 1.0))
    assert all(s == CfgStep(True, 4.0) for s in parse_cfg_schedule(None, 3, 4.0))
    last = parse_cfg_schedule(None, 3, 4.0, skip_last_step=True)
    assert [s.apply_cfg for s in last] == [True, True, False]


def test_e_interval_larger_than_steps_selects_nothing():
    assert parse_cfg_schedule_map("e~20, 1", 10, 5.0) == {1: 5.0}


@pytest.mark.parametrize(
    "schedule,fragment",
    [
        ("e~x", "'e~x'"),
        ("e~0", "'e~0'"),
        ("e~1.5", "'e~1.5'"),
        ("1-2-3", "'1-2-3'"),
        ("-5", "'-5'"),
        ("a-3", "'a-3'"),
        ("0-3", "'0-3'"),
        ("5-3", "'5-3'"),
        ("3-11", "'3-11'"),
        ("0", "'0'"),
        ("11", "'11'"),
        ("2.5", "'2.5'"),
        ("1-3:big", "'1-3:big'"),
        (":4", "':4'"),
        ("  ,  ", "empty"),
    ],
)
def test_each_error_names_the_token(schedule, fragment):
    with pytest.raises(UserError) as e:
        parse_cfg_schedule_map(schedule, 10, 5.0)
    assert fragment in str(e.value) and "--cfg_schedule" in str(e.value)


def test_cfg_combine_formula():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(cfg_combine(c, u, 3.0), torch.tensor([4.0, -5.0]))


def _reference_cfgzero(cond, uncond, g, per_frame_dim=None):
    """Independent loop-based computation of CFG-Zero*: α per sample (or per sample and frame)."""
    out = torch.empty_like(cond)
    for b in range(cond.shape[0]):
        frames = range(cond.shape[per_frame_dim]) if per_frame_dim else [None]
        for f in frames:
            idx = (b,) if f is None else (b,) + (slice(None),) * (per_frame_dim - 1) + (f,)
            vc, vu = cond[idx].double(), uncond[idx].double()
            alpha = float((vc * vu).sum() / ((vu * vu).sum() + 1e-8))
            out[idx] = (alpha * vu + g * (vc - alpha * vu)).to(cond.dtype)
    return out


def test_cfg_zero_star_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 3, 5, 5, generator=g)
    uncond = torch.randn(2, 4, 3, 5, 5, generator=g) * 0.5 + 0.3 * cond
    got = cfg_zero_star_combine(cond, uncond, 5.0)
    assert torch.allclose(got, _reference_cfgzero(cond, uncond, 5.0), atol=1e-5)
    got_f = cfg_zero_star_combine(cond, uncond, 5.0, frame_dim=2)
    assert torch.allclose(got_f, _reference_cfgzero(cond, uncond, 5.0, per_frame_dim=2), atol=1e-5)
    assert not torch.allclose(got, got_f)
    # With v_u parallel to v_c (α = 1 exactly for v_u = v_c) CFG-Zero* equals plain CFG on v_c.
    assert torch.allclose(cfg_zero_star_combine(cond, cond, 7.0), cond, atol=1e-5)


def test_zero_init_applies_to_first_steps_regardless_of_cfg():
    plan = GuidancePlan.build(4, 5.0, cfg_schedule="2-4", cfgzerostar=True, zero_init_steps=2, zero_init_multiplier=0.0)
    cond, uncond = torch.ones(1, 3), torch.full((1, 3), 0.5)
    assert not plan.needs_uncond(0) and plan.needs_uncond(1)
    assert torch.all(plan.combine(0, cond) == 0)  # step 1: cond-only, zero-initialised
    assert torch.all(plan.combine(1, cond, uncond) == 0)  # step 2: CFG runs, still zero-initialised
    assert torch.allclose(plan.combine(2, cond, uncond), cfg_zero_star_combine(cond, uncond, 5.0))
    half = GuidancePlan.build(2, 5.0, zero_init_steps=1, zero_init_multiplier=0.5)
    assert torch.allclose(half.combine(0, cond, uncond), 0.5 * cfg_combine(cond, uncond, 5.0))


def test_perp_neg_matches_independent_computation_and_needs_three_passes():
    gen = torch.Generator().manual_seed(1)
    pos_, neg_, null = (torch.randn(2, 6, generator=gen) for _ in range(3))
    got = perp_neg_combine(pos_, neg_, null, 4.0, 1.5)
    for b in range(2):
        p, n = (pos_[b] - null[b]).double(), (neg_[b] - null[b]).double()
        n_perp = n - (n @ p) / (p @ p) * p
        assert abs(float(n_perp @ p)) < 1e-9
        ref = null[b].double() + 4.0 * (p - 1.5 * n_perp)
        assert torch.allclose(got[b].double(), ref, atol=1e-5)
    plan = GuidancePlan.build(2, 4.0, cfg_schedule="1", perp_neg=1.5)
    assert plan.needs_nocond(0) and not plan.needs_nocond(1) and not plan.needs_uncond(1)
    with pytest.raises(UserError, match="cannot be combined"):
        GuidancePlan.build(2, 4.0, cfgzerostar=True, perp_neg=1.0)
