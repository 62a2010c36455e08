"""Kandinsky 5 image conditioning: the official channel layout, shared by training and inference."""

import pytest
import torch

from musubi_tuner.kandinsky5.conditioning import (
    build_dit_input,
    conditioned_frame_indices,
    loss_frame_weights,
    normalize_first_frame,
)


def test_frame_indices_per_mode():
    assert conditioned_frame_indices(7, "none") == []
    assert conditioned_frame_indices(7, "first") == [0]
    assert conditioned_frame_indices(7, "first_last") == [0, 6]
    assert conditioned_frame_indices(1, "first_last") == [0]


def test_i2v_input_layout_matches_official_contract():
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 5, 3, 4, 16, generator=g)
    clean = torch.randn(2, 2, 3, 4, 16, generator=g)
    x = build_dit_input(noisy, clean, [0, 4], visual_cond=True)
    assert x.shape == (2, 5, 3, 4, 33)
    # frames 0 and F-1 of the noisy stream are the clean latents; the middle frames are untouched
    assert torch.equal(x[:, 0, ..., :16], clean[:, 0])
    assert torch.equal(x[:, 4, ..., :16], clean[:, 1])
    assert torch.equal(x[:, 1:4, ..., :16], noisy[:, 1:4])
    # visual_cond channels stay zero (musubi wrote the image there: defect #2)
    assert torch.count_nonzero(x[..., 16:32]) == 0
    expected_mask = torch.tensor([1.0, 0, 0, 0, 1.0]).view(1, 5, 1, 1).expand(2, 5, 3, 4)
    assert torch.equal(x[..., 32], expected_mask)
    # the caller's tensor is not modified
    assert not torch.equal(noisy[:, 0], clean[:, 0])


def test_t2v_on_visual_cond_model_has_zero_extra_channels():
    noisy = torch.randn(1, 3, 2, 2, 16)
    x = build_dit_input(noisy, None, [], visual_cond=True)
    assert torch.equal(x[..., :16], noisy)
    assert torch.count_nonzero(x[..., 16:]) == 0


def test_t2i_model_takes_plain_latents_and_rejects_conditioning():
    noisy = torch.randn(1, 1, 2, 2, 16)
    assert build_dit_input(noisy, None, [], visual_cond=False) is noisy
    with pytest.raises(ValueError):
        build_dit_input(noisy, noisy, [0], visual_cond=False)
    with pytest.raises(ValueError, match="expected 2 clean"):
        build_dit_input(torch.randn(1, 4, 2, 2, 16), noisy, [0, 3], visual_cond=True)


def test_loss_weights_exclude_conditioned_frames():
    assert loss_frame_weights(4, [0, 3]).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert loss_frame_weights(4, [0], exclude_conditioned=False).tolist() == [1.0] * 4
    # a single-frame clip conditioned on itself keeps its loss (nothing else to learn from)
    assert loss_frame_weights(1, [0]).tolist() == [1.0]


def test_normalize_first_frame_against_independent_computation():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(9, 3, 3, 4, generator=g)
    lat[:4] = lat[:4] * 3.0 + 1.0  # first frames far off the reference statistics
    out = normalize_first_frame(lat)
    ref = lat[4:9].flatten()
    n = ref.numel()
    ref_mean = ref.sum() / n
    ref_std = (((ref - ref_mean) ** 2).sum() / (n - 1)).sqrt()
    for i in range(4):
        src = lat[i].flatten()
        m = src.sum() / src.numel()
        s = (((src - m) ** 2).sum() / (src.numel() - 1)).sqrt()
        mean = min(max(ref_mean.item(), m.item() - 0.05), m.item() + 0.1)
        std = min(max(ref_std.item(), s.item() - 0.1), s.item() + 0.25)
        expected = (lat[i] - m) / s * std + mean
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[4:], lat[4:])


def test_normalize_first_frame_skips_short_clips_and_handles_batches():
    short = torch.randn(4, 2, 2, 3)
    assert torch.equal(normalize_first_frame(short), short)
    batch = torch.randn(2, 6, 2, 2, 3)
    out = normalize_first_frame(batch)
    assert torch.equal(out[1], normalize_first_frame(batch[1]))
    assert torch.isfinite(out).all()
