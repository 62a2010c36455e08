"""FLUX.2 VAE: BFL ae.safetensors key conversion, diffusers directory, batch-norm normalisation, 2x2 patchify."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline

from musubi_tuner.demo.flux2_bundles import TINY_VAE
from musubi_tuner.demo.snapshot_io import seeded
from musubi_tuner.flux_2.vae import bfl_to_diffusers_key, diffusers_to_bfl_key, load_flux2_vae, patchify, unpatchify
from musubi_tuner.utils.errors import UserError


def _reference_vae(seed: int) -> AutoencoderKLFlux2:
    """The model the bundle wrote (same construction and seed)."""
    with seeded(seed):
        vae = AutoencoderKLFlux2(**TINY_VAE)
        vae.bn.running_mean.copy_(0.1 * torch.randn(128))
        vae.bn.running_var.copy_(0.5 + torch.rand(128))
    return vae.eval()


def _pipeline_encode(vae: AutoencoderKLFlux2, x: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux2Pipeline image-latent path: mode, patchify, batch-norm statistics."""
    z = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (z - mean) / std


def test_bfl_key_names():
    assert bfl_to_diffusers_key("decoder.up.3.block.0.conv1.weight", 4) == "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert bfl_to_diffusers_key("decoder.up.1.upsample.conv.bias", 4) == "decoder.up_blocks.2.upsamplers.0.conv.bias"
    assert (
        bfl_to_diffusers_key("encoder.down.1.block.0.nin_shortcut.weight", 4)
        == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    )
    assert bfl_to_diffusers_key("encoder.mid.attn_1.proj_out.weight", 4) == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert bfl_to_diffusers_key("decoder.mid.block_2.norm1.bias", 4) == "decoder.mid_block.resnets.1.norm1.bias"
    assert bfl_to_diffusers_key("encoder.quant_conv.weight", 4) == "quant_conv.weight"
    assert bfl_to_diffusers_key("encoder.norm_out.weight", 4) == "encoder.conv_norm_out.weight"
    for k in AutoencoderKLFlux2(**TINY_VAE).state_dict():
        assert bfl_to_diffusers_key(diffusers_to_bfl_key(k, 4), 4) == k


def test_bfl_file_loads_exactly_and_matches_pipeline_math(flux2_bundle, tmp_path):
    ref = _reference_vae(flux2_bundle.seed + 2)
    ours = load_flux2_vae(flux2_bundle.vae)
    got = ours.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k].to(v.dtype), v), k
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = ours.encode(x)
    assert z.shape == (2, 128, 2, 3)
    with torch.no_grad():
        assert torch.allclose(z, _pipeline_encode(ref, x), atol=1e-5)
        # decode: inverse normalisation, unpatchify, vae.decode (diffusers' pipeline order)
        mean = ref.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        want = ref.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample.clamp(-1, 1)
    assert torch.allclose(ours.decode(z), want, atol=1e-5)
    # the same weights as a diffusers directory
    ref.save_pretrained(tmp_path / "vae")
    assert torch.allclose(load_flux2_vae(tmp_path / "vae").encode(x), z, atol=1e-6)


def test_patchify_channel_order_and_roundtrip():
    z = torch.randn(2, 3, 4, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 2, 3)
    # channel c*4 + pi*2 + pj at (i, j) is z[c, 2i + pi, 2j + pj]
    assert p[1, 2 * 4 + 1 * 2 + 0, 1, 2] == z[1, 2, 3, 4]
    assert torch.equal(p, Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(p), z)


def test_bad_vae_inputs(flux2_bundle):
    with pytest.raises(UserError, match="not a FLUX.2 VAE"):
        load_flux2_vae(flux2_bundle.dit_klein)
    vae = load_flux2_vae(flux2_bundle.vae)
    with pytest.raises(UserError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 40, 32))
