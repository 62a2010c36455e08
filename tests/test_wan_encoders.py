"""Wan VAE / UMT5 / CLIP loading from the official files (tiny bundle) against the diffusers / transformers layouts."""

from __future__ import annotations

import pytest
import torch

from musubi_tuner.demo.wan_bundle import TINY_VAE_CONFIG, _seeded, write_tiny_clip
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.text_encoders import WanClipEncoder, WanT5Encoder, umt5_official_to_hf
from musubi_tuner.wan.vae import infer_official_config, load_wan_vae


def test_official_vae_pth_equals_diffusers_dir(wan_i2v_bundle):
    b = wan_i2v_bundle
    official = load_wan_vae(b.vae, dtype=torch.float32)
    ref = load_wan_vae(b.vae_diffusers, dtype=torch.float32)
    x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = official.encode(x)
    assert z.shape == (1, 16, 2, 4, 4)
    assert torch.equal(z, ref.encode(x))
    # normalisation: (mu − mean) / std with the spec's 16 values
    mu = ref.vae.encode(x).latent_dist.mode()
    assert torch.allclose(z[0, 7], (mu[0, 7] - 1.5508) / 2.0743, atol=1e-5)
    assert official.decode(z).shape == (1, 3, 5, 32, 32)
    with pytest.raises(UserError, match="4n\\+1"):
        official.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(UserError, match="needs the wan2.2 VAE"):
        load_wan_vae(b.vae, kind="wan2.2")


def test_vae_config_read_from_official_shapes(wan_i2v_bundle):
    from musubi_tuner.utils.safetensors_utils import open_weights

    r = open_weights(wan_i2v_bundle.vae)
    shapes = {k: tuple(r.get_shape(k)) for k in r.keys()}
    assert infer_official_config(shapes) == TINY_VAE_CONFIG


def test_umt5_official_pth_trims_to_prompt_length(wan_i2v_bundle):
    from transformers import UMT5EncoderModel

    enc = WanT5Encoder.load(wan_i2v_bundle.t5, dtype=torch.float32)
    out = enc.encode(["a red ball", "two   cats &amp; a dog"])
    ids = enc.tokenizer(["a red ball", "two cats & a dog"]).input_ids
    assert [o.shape for o in out] == [(len(ids[0]), 32), (len(ids[1]), 32)]
    assert ids[0][-1] == enc.tokenizer.eos_token_id
    # trimmed states equal the masked full-length encoder run of transformers' UMT5 on the converted weights
    model: UMT5EncoderModel = enc.model
    full = model(input_ids=torch.tensor([ids[0]])).last_hidden_state[0]
    assert torch.allclose(out[0], full, atol=1e-5)
    # the gated FFN: official gate (GELU branch) is HF wi_0, fc1 the linear branch wi_1
    assert umt5_official_to_hf("blocks.3.ffn.gate.0.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_0.weight"
    assert umt5_official_to_hf("blocks.3.ffn.fc1.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_1.weight"


def test_open_clip_pth_matches_transformers_penultimate_layer(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = write_tiny_clip(tmp_path, seed=5)
    enc = WanClipEncoder.load(path, dtype=torch.float32)
    import json

    with _seeded(5):
        ref = CLIPVisionModel(CLIPVisionConfig(**json.loads(path.with_suffix(".pth.json").read_text())))
    ref = ref.half().float().eval()  # the file is stored in fp16
    img = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = enc.encode(img)
    assert got.shape == (2, 257, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pixel_values=((img * 0.5 + 0.5) - mean) / std, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(got, want, atol=1e-4)


def test_missing_or_wrong_files_are_clear_errors(tmp_path, wan_i2v_bundle):
    with pytest.raises(UserError, match="T5 text encoder not found"):
        WanT5Encoder.load(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="not an official Wan UMT5"):
        WanT5Encoder.load(wan_i2v_bundle.vae)
    with pytest.raises(UserError, match="not an open-clip"):
        WanClipEncoder.load(wan_i2v_bundle.t5)
    with pytest.raises(UserError, match="not a Wan VAE"):
        load_wan_vae(wan_i2v_bundle.t5)
