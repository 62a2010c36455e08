"""Latent previews: the denoised estimate, the latent→RGB map and the preview file written and updated in place."""

from __future__ import annotations

import av
import torch
from PIL import Image

from blissful_tuner.latent_preview import (
    HUNYUAN_VIDEO_RGB,
    LatentPreviewer,
    LatentRGBTable,
    denoised_estimate,
    latent_to_rgb,
    to_cfhw,
)


def test_denoised_estimate_recovers_scaled_clean_latent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 2, 3, 4, generator=g), torch.randn(16, 2, 3, 4, generator=g)
    sigma = 0.3
    est = denoised_estimate((1 - sigma) * x0 + sigma * eps, eps, sigma)
    ref = (x0 - x0.mean()) / x0.std()  # (1−σ)·x0 normalised
    assert torch.allclose(est, ref, atol=1e-5)


def test_latent_to_rgb_is_the_linear_map_then_minmax_and_upscale():
    table = LatentRGBTable(factors=((1.0, 0.0, 0.0), (0.0, 2.0, 0.0)), bias=(0.0, 0.0, 1.0))
    z = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 0.0]]]])  # (C=2, F=1, H=1, W=2)
    rgb = latent_to_rgb(z, table, upscale=1)
    raw = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.0]], [[1.0, 1.0]]]])  # (F, 3, H, W) before normalisation
    assert torch.allclose(rgb, raw / 2.0)
    assert latent_to_rgb(torch.randn(16, 2, 3, 4), HUNYUAN_VIDEO_RGB).shape == (2, 3, 24, 32)


def test_channels_last_layout():
    x = torch.randn(2, 3, 4, 16)  # Kandinsky 5 (F, H, W, C)
    assert torch.equal(to_cfhw(x, channels_last=True), x.permute(3, 0, 1, 2))
    assert to_cfhw(torch.randn(1, 16, 2, 3, 4)).shape == (16, 2, 3, 4)


def test_preview_png_then_mp4_written_every_n_steps(tmp_path):
    noise = torch.randn(1, 16, 1, 4, 4)
    prev = LatentPreviewer(tmp_path, 2, noise)
    assert prev(0, noise, 1.0) is None  # step 1: not due
    path = prev(1, noise * 0.5, 0.5)
    assert path == tmp_path / "latent_preview.png" and Image.open(path).size == (32, 32)
    first = path.read_bytes()
    prev(3, torch.randn(1, 16, 1, 4, 4), 0.2)
    assert path.read_bytes() != first  # updated in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent_preview.png"]  # no temporary files left

    video_noise = torch.randn(3, 4, 4, 16)  # channels-last, 3 latent frames
    vprev = LatentPreviewer(tmp_path, 1, video_noise, channels_last=True, fps=24)
    vpath = vprev(0, torch.randn(3, 4, 4, 16), 0.5)
    assert vpath == tmp_path / "latent_preview.mp4"
    with av.open(str(vpath)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 3 and (frames[0].width, frames[0].height) == (32, 32)


def test_preview_failure_never_raises(tmp_path):
    prev = LatentPreviewer(tmp_path, 1, torch.randn(1, 8, 1, 2, 2))  # 8 channels vs a 16-channel table
    assert prev(0, torch.randn(1, 8, 1, 2, 2), 0.5) is None
    assert prev.disabled


def test_tiny_decoder_is_used_when_given(tmp_path):
    calls = []

    def decoder(latent):
        calls.append(tuple(latent.shape))
        return torch.full((latent.shape[2], 3, 8, 8), 0.5)

    prev = LatentPreviewer(tmp_path, 1, torch.randn(1, 4, 1, 2, 2), table=None, decoder=decoder)
    path = prev(0, torch.randn(1, 4, 1, 2, 2), 0.1)
    assert calls == [(1, 4, 1, 2, 2)] and Image.open(path).size == (8, 8)
