"""Kandinsky 5 VAE wrappers on the tiny bundle: loading forms, normalisation, 4n+1 frames, I2V conditioning latents."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo
from safetensors.torch import load_file

from musubi_tuner.kandinsky5.vae import (
    FLUX_VAE_SCALING_FACTOR,
    HUNYUAN_VAE_SCALING_FACTOR,
    K5Vae,
    check_frame_count,
    latent_frame_count,
    load_k5_vae,
    pixel_frame_count,
)
from musubi_tuner.utils.errors import UserError


@pytest.fixture(scope="module")
def hv(k5_bundle) -> K5Vae:
    return load_k5_vae(k5_bundle.vae, "hunyuan_video", dtype=torch.float32)


@pytest.fixture(scope="module")
def hv_ref(k5_bundle) -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo.from_pretrained(k5_bundle.vae).eval()


def _pixels(frames: int, seed: int = 0, b: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 3, frames, size, size), generator=g) * 2 - 1


def test_constants_and_frame_arithmetic():
    assert HUNYUAN_VAE_SCALING_FACTOR == 0.476986 and FLUX_VAE_SCALING_FACTOR == 0.3611
    assert [latent_frame_count(f) for f in (1, 5, 17, 121)] == [1, 2, 5, 31]
    assert [pixel_frame_count(f) for f in (1, 2, 5, 31)] == [1, 5, 17, 121]
    for bad in (0, 2, 4, 16, 120):
        with pytest.raises(UserError, match="4n\\+1"):
            check_frame_count(bad)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_shapes(hv, frames):
    z = hv.encode_video(_pixels(frames), sample=False)
    assert z.shape == (1, 16, (frames - 1) // 4 + 1, 4, 4) and z.dtype == torch.float32
    x = hv.decode_video(z)
    assert x.shape == (1, 3, frames, 32, 32)
    assert x.min() >= -1 and x.max() <= 1


def test_non_4n_plus_1_frames_are_refused(hv):
    with pytest.raises(UserError, match="got 8"):
        hv.encode_video(_pixels(8))
    with pytest.raises(UserError, match="divisible by 8"):
        hv.encode_video(torch.zeros(1, 3, 1, 20, 32))


def test_hunyuan_normalisation_matches_diffusers(hv, hv_ref):
    x = _pixels(5)
    with torch.no_grad():
        mode = hv_ref.encode(x).latent_dist.mode()
    z = hv.encode_video(x, sample=False)
    torch.testing.assert_close(z, mode * 0.476986, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = hv_ref.decode(z / 0.476986).sample.clamp(-1, 1)
    torch.testing.assert_close(hv.decode_video(z), ref, rtol=1e-5, atol=1e-5)
    # sampling (the default) is reproducible with a generator and differs from the mode
    a = hv.encode_video(x, generator=torch.Generator().manual_seed(1))
    b = hv.encode_video(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, z)
    assert hv.cache_tensors()["vae_scaling_factor"].item() == pytest.approx(0.476986)
    assert hv.cache_metadata() == {"vae_kind": "hunyuan_video", "vae_scaling_factor": "0.476986"}


def test_flux_vae_scales_without_shift(k5_bundle):
    vae = load_k5_vae(k5_bundle.flux_vae, "flux1", dtype=torch.float32)
    ref = AutoencoderKL.from_pretrained(k5_bundle.flux_vae).eval()
    assert ref.config.shift_factor == pytest.approx(0.1159)  # present in the config, deliberately not applied
    x = _pixels(2)
    z = vae.encode_video(x, sample=False)
    assert z.shape == (1, 16, 2, 4, 4)
    with torch.no_grad():
        per_frame = [ref.encode(x[:, :, i]).latent_dist.mode() * 0.3611 for i in range(2)]
    torch.testing.assert_close(z, torch.stack(per_frame, dim=2), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        dec = ref.decode(z[:, :, 1] / 0.3611).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode_video(z)[:, :, 1], dec, rtol=1e-5, atol=1e-5)
    assert vae.temporal_compression == 1


def test_single_file_forms_load_the_same_weights(k5_bundle, hv, tmp_path):
    x = _pixels(5)
    ref = hv.encode_video(x, sample=False)
    single = load_k5_vae(k5_bundle.vae_file, dtype=torch.float32)
    torch.testing.assert_close(single.encode_video(x, sample=False), ref, rtol=0, atol=0)
    # original HunyuanVideo layout: a .pt with {"state_dict": {"vae.<key>": ...}} next to a config.json
    sd = load_file(str(k5_bundle.vae_file))
    pt_dir = tmp_path / "hv"
    pt_dir.mkdir()
    (pt_dir / "config.json").write_text((k5_bundle.vae / "config.json").read_text())
    torch.save({"state_dict": {f"vae.{k}": v for k, v in sd.items()}}, pt_dir / "pytorch_model.pt")
    from_pt = load_k5_vae(pt_dir / "pytorch_model.pt", dtype=torch.float32)
    torch.testing.assert_close(from_pt.encode_video(x, sample=False), ref, rtol=0, atol=0)
    # a pipeline directory with vae/
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "vae").symlink_to(k5_bundle.vae, target_is_directory=True)
    assert load_k5_vae(tmp_path / "pipe", dtype=torch.float32).latent_channels == 16


def test_wrong_inputs_are_user_errors(k5_bundle, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_k5_vae(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="AutoencoderKL, the hunyuan_video VAE"):
        load_k5_vae(k5_bundle.flux_vae, "hunyuan_video")
    with pytest.raises(UserError, match="unknown VAE kind"):
        load_k5_vae(k5_bundle.vae, "wan")
    with pytest.raises(UserError):  # the DiT file is not a VAE: strict key check names the file
        load_k5_vae(k5_bundle.dit, dtype=torch.float32)


def test_image_condition_latents(hv):
    clip = _pixels(9, seed=3, b=2)
    first, last = clip[:, :, 0], clip[:, :, -1]
    cond = hv.encode_image_condition(first, last, sample=False)
    assert cond.shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(cond[:, :, :1], hv.encode_video(clip[:, :, :1], sample=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond[:, :, 1:], hv.encode_video(clip[:, :, -1:], sample=False), rtol=1e-5, atol=1e-6)
    only_first = hv.encode_image_condition(first, sample=False)
    torch.testing.assert_close(only_first[:, :, 0], only_first[:, :, 1], rtol=0, atol=0)
    # training form: first and last pixel frames of the clip, each encoded alone
    torch.testing.assert_close(hv.encode_first_last_frames(clip, sample=False), cond, rtol=1e-5, atol=1e-6)


def test_tiling_keeps_shapes(k5_bundle):
    vae = load_k5_vae(k5_bundle.vae, dtype=torch.float32, tiling=True)
    vae.enable_tiling(tile_size=32, tile_stride=16, tile_frames=8, tile_frames_stride=4)
    z = vae.encode_video(_pixels(9, size=64), sample=False)
    assert z.shape == (1, 16, 3, 8, 8)
    assert vae.decode_video(z).shape == (1, 3, 9, 64, 64)
