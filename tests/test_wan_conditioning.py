"""Wan condition layouts (specs/wan.md §8): the I2V / FLF2V pixel-frame mask folded into latent frames, the condition
video, TI2V per-token timesteps and first-frame replacement."""

from __future__ import annotations

import torch

from musubi_tuner.wan.conditioning import condition_video, i2v_mask, ti2v_replace_first, ti2v_token_timesteps


def test_i2v_mask_first_frame_only():
    m = i2v_mask(9, 2, 3)  # 9 pixel frames -> 3 latent frames
    assert m.shape == (4, 3, 2, 3)
    # pixel mask [1, 0 x 8] with its first entry repeated 4x = 12 entries -> rows of 4 per latent frame
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()


def test_flf2v_mask_sets_only_the_last_slot_of_the_last_latent_frame():
    m = i2v_mask(9, 1, 1, last=True)
    flat = [float(m[c, f, 0, 0]) for f in range(3) for c in range(4)]
    assert flat == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_condition_video_and_ti2v_helpers():
    first, last = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -0.5)
    v = condition_video(first, 5, last)
    assert v.shape == (1, 3, 5, 2, 2) and v[:, :, 0].eq(0.5).all() and v[:, :, -1].eq(-0.5).all() and v[:, :, 1:4].eq(0).all()
    t = ti2v_token_timesteps(torch.tensor([700.0, 300.0]), (3, 2, 2), first_frame_clean=True)
    assert t.shape == (2, 12) and t[:, :4].eq(0).all() and t[0, 4:].eq(700).all() and t[1, 4:].eq(300).all()
    x, img = torch.randn(1, 48, 3, 2, 2), torch.randn(1, 48, 1, 2, 2)
    out = ti2v_replace_first(x, img)
    assert torch.equal(out[:, :, :1], img) and torch.equal(out[:, :, 1:], x[:, :, 1:])
