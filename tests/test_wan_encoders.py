"""Wan VAE / UMT5 / CLIP loading from the official files (tiny bundle) against the diffusers / transformers layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from scaled_fp8_files import write_scaled_fp8_pair

from musubi_tuner.demo.snapshot_io import seeded
from musubi_tuner.demo.wan_bundle import TINY_VAE_CONFIG, write_tiny_clip
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


def _reference_umt5(path, dtype, fp8):
    """transformers' UMT5 with the whole converted state dict; ``fp8``: every block Linear weight rounded through
    float8_e4m3fn (what an fp8 weight upcast at compute time multiplies with)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from musubi_tuner.modules.fp8_optimization import cast_to_fp8
    from musubi_tuner.wan.text_encoders import umt5_config_from_hf_shapes

    sd = {umt5_official_to_hf(k): v.to(dtype) for k, v in torch.load(path, weights_only=True).items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model = UMT5EncoderModel(UMT5Config(**umt5_config_from_hf_shapes({k: tuple(v.shape) for k, v in sd.items()})))
    model.load_state_dict(sd, strict=True)
    model = model.to(dtype).eval()
    if fp8:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = cast_to_fp8(m.weight.data).to(dtype)
    return model


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8_t5"])
def test_umt5_streamed_from_pth_hf_dir_and_safetensors_equals_full_load(tmp_path, wan_i2v_bundle, fp8):
    from safetensors.torch import save_file

    ref = _reference_umt5(wan_i2v_bundle.t5, torch.bfloat16, fp8)
    tok_dir = wan_i2v_bundle.t5.parent / "google" / "umt5-xxl"
    # the same weights as an HF snapshot directory and as one HF-named safetensors file (ComfyUI's umt5_xxl layout)
    hf_dir, single = tmp_path / "umt5", tmp_path / "umt5_xxl_bf16.safetensors"
    if not fp8:
        ref.save_pretrained(hf_dir)
        save_file({k: v.clone() for k, v in ref.state_dict().items()}, str(single))  # both tied names
        only_embed = {k: v.clone() for k, v in ref.state_dict().items() if k != "shared.weight"}
        save_file(only_embed, str(tmp_path / "embed_tokens_only.safetensors"))
    prompts = ["a red ball", "two cats and a dog on a long sofa"]
    sources = (wan_i2v_bundle.t5, hf_dir, single, tmp_path / "embed_tokens_only.safetensors")
    for src in sources[:1] if fp8 else sources:  # the source only changes key names
        enc = WanT5Encoder.load(src, tokenizer=tok_dir, dtype=torch.bfloat16, fp8=fp8)
        assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
        fp8_weights = [n for n, p in enc.model.named_parameters() if p.dtype == torch.float8_e4m3fn]
        assert len(fp8_weights) == (2 * 7 if fp8 else 0), src  # q, k, v, o, wi_0, wi_1, wo of both blocks
        got = enc.encode(prompts)
        tokens = enc.tokenizer(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        with torch.no_grad():
            want = ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state.float()
        for i, g in enumerate(got):
            assert torch.equal(g, want[i, : g.shape[0]]), (src, i)


def test_umt5_scaled_fp8_single_file_loads_as_its_dequantised_weights(tmp_path, wan_i2v_bundle):
    """ComfyUI's ``umt5_xxl_fp8_e4m3fn_scaled`` layout (HF names, the 7 Linears of every block per-tensor scaled fp8,
    embedding / relative bias / norms bf16): equal to the bf16 file of ``q · scale``, dequantised or kept in fp8."""
    from musubi_tuner.wan.memory import _t5_bf16_bytes, _t5_fp8_bytes

    tok = wan_i2v_bundle.t5.parent / "google" / "umt5-xxl"
    bf16 = WanT5Encoder.load(wan_i2v_bundle.t5, tokenizer=tok, dtype=torch.bfloat16).model.state_dict()
    sd = {k: v for k, v in bf16.items() if k != "encoder.embed_tokens.weight"}  # tied: ComfyUI stores shared.weight
    scaled, reference = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tmp_path / "dequantised.safetensors"
    done = write_scaled_fp8_pair(
        sd, lambda k: k.startswith("encoder.block.") and "relative_attention_bias" not in k, scaled, reference
    )
    assert len(done) == 2 * 7
    prompts = ["a red ball", "two cats and a dog on a long sofa"]
    want = WanT5Encoder.load(reference, tokenizer=tok, dtype=torch.bfloat16).encode(prompts)
    for fp8 in (False, True):  # without / with --fp8_t5
        enc = WanT5Encoder.load(scaled, tokenizer=tok, dtype=torch.bfloat16, fp8=fp8)
        fp8_weights = [n for n, p in enc.model.named_parameters() if p.dtype == torch.float8_e4m3fn]
        assert len(fp8_weights) == (14 if fp8 else 0)
        if fp8:
            assert enc.model.encoder.block[1].layer[1].DenseReluDense.wo.scale_weight.shape == (1,)
        for g, w in zip(enc.encode(prompts), want, strict=True):
            assert torch.equal(g, w), fp8
        # the memory estimator's size of this load (headers only; the file's scalar scales aside)
        loaded = sum(p.numel() * p.element_size() for p in enc.model.parameters())
        estimate = _t5_fp8_bytes(str(scaled)) if fp8 else _t5_bf16_bytes(str(scaled), [])
        assert 0 <= estimate - loaded <= 8 * len(done), fp8
    cut = {k: v for k, v in load_file(scaled).items() if k != "encoder.block.1.layer.0.SelfAttention.k.weight"}
    save_file(cut, str(scaled))
    with pytest.raises(UserError, match=r"fp8 scale 'encoder.block.1.layer.0.SelfAttention.k.scale_weight' has no weight"):
        WanT5Encoder.load(scaled, tokenizer=tok)


def test_fp8_t5_estimate_is_the_loaded_encoder_size(wan_i2v_bundle):
    """``--estimate_memory --fp8_t5`` sizes UMT5 from the checkpoint headers as the loader stores it (fp8 block
    matrices, bf16 embedding, norms and relative-position tables), without loading it."""
    from musubi_tuner.wan.memory import _t5_fp8_bytes

    enc = WanT5Encoder.load(
        wan_i2v_bundle.t5, tokenizer=wan_i2v_bundle.t5.parent / "google" / "umt5-xxl", dtype=torch.bfloat16, fp8=True
    )
    loaded = {p.data_ptr(): p.numel() * p.element_size() for p in enc.model.parameters()}
    assert _t5_fp8_bytes(str(wan_i2v_bundle.t5)) == sum(loaded.values())


def test_open_clip_pth_matches_transformers_penultimate_layer(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = write_tiny_clip(tmp_path, seed=5)
    enc = WanClipEncoder.load(path, dtype=torch.float32)
    import json

    with seeded(5):
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
    bad = tmp_path / "t5_cut.pth"
    sd = torch.load(wan_i2v_bundle.t5, weights_only=True)
    del sd["blocks.1.ffn.fc2.weight"]
    torch.save(sd, bad)
    (tmp_path / "google").symlink_to(wan_i2v_bundle.t5.parent / "google")
    with pytest.raises(UserError, match=r"t5_cut\.pth: not a UMT5 encoder checkpoint.*1 tensors missing.*wo\.weight"):
        WanT5Encoder.load(bad)
    with pytest.raises(UserError, match="not an open-clip"):
        WanClipEncoder.load(wan_i2v_bundle.t5)
    with pytest.raises(UserError, match="not a Wan VAE"):
        load_wan_vae(wan_i2v_bundle.t5)


def _diffusers_vae22_to_official(sd: dict[str, torch.Tensor], num_res: int) -> dict[str, torch.Tensor]:
    """Inverse of the loader's mapping, written independently: diffusers 2.2 names → official ``Wan2.2_VAE.pth``."""
    import re

    from musubi_tuner.demo.wan_bundle import diffusers_vae_to_official

    parts = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6."}
    parts["conv_shortcut."] = "shortcut."
    nested, common = {}, {}
    for k, v in sd.items():
        if m := re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            side = "encoder.downsamples" if m[1].startswith("encoder") else "decoder.upsamples"
            inner = side.split(".")[1]
            rest = next(new + m[4][len(old) :] for old, new in parts.items() if m[4].startswith(old))
            nested[f"{side}.{m[2]}.{inner}.{m[3]}.{rest}"] = v
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$", k):
            nested[f"encoder.downsamples.{m[1]}.downsamples.{num_res}.{m[2]}"] = v  # after its residual blocks
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsampler\.(.+)$", k):
            nested[f"decoder.upsamples.{m[1]}.upsamples.{num_res + 1}.{m[2]}"] = v  # the decoder has num_res + 1
        else:
            common[k] = v
    return {**diffusers_vae_to_official(common), **nested}


def test_official_wan22_vae_pth_and_safetensors_equal_diffusers(tmp_path):
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    from musubi_tuner.demo.wan_bundle import TINY_VAE22_CONFIG
    from musubi_tuner.wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVae, infer_official_wan22_config

    cfg = {**TINY_VAE22_CONFIG, "decoder_base_dim": 12, "latents_mean": WAN22_LATENTS_MEAN, "latents_std": WAN22_LATENTS_STD}
    with seeded(3):
        ref = AutoencoderKLWan(**cfg).eval()
    official = _diffusers_vae22_to_official({k: v.detach().clone() for k, v in ref.state_dict().items()}, num_res=2)
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in official  # the official nesting
    assert "decoder.upsamples.0.upsamples.3.resample.1.weight" in official
    inferred = infer_official_wan22_config({k: tuple(v.shape) for k, v in official.items()})
    assert {k: inferred[k] for k in cfg} == cfg
    torch.save(official, tmp_path / "Wan2.2_VAE.pth")
    save_file(official, str(tmp_path / "wan2.2_vae.safetensors"))  # ComfyUI's repackaged file: same keys
    want = WanVae(ref, "wan2.2")
    x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z_ref = want.encode(x)
    assert z_ref.shape == (1, 48, 2, 2, 2)
    for name in ("Wan2.2_VAE.pth", "wan2.2_vae.safetensors"):
        vae = load_wan_vae(tmp_path / name, kind="wan2.2", dtype=torch.float32)
        assert torch.equal(vae.encode(x), z_ref), name
        assert torch.equal(vae.decode(z_ref), want.decode(z_ref)), name
    with pytest.raises(UserError, match="needs the wan2.1 VAE"):
        load_wan_vae(tmp_path / "Wan2.2_VAE.pth", kind="wan2.1")


def test_vae_cache_cpu_keeps_the_causal_cache_off_the_device_with_equal_results(wan_i2v_bundle):
    from musubi_tuner.wan.vae import OffDeviceFeatureCache

    plain = load_wan_vae(wan_i2v_bundle.vae, dtype=torch.float32)
    cached = load_wan_vae(wan_i2v_bundle.vae, dtype=torch.float32, cache_on_cpu=True)
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = cached.encode(x)
    assert torch.equal(z, plain.encode(x))
    assert torch.equal(cached.decode(z), plain.decode(z))
    assert isinstance(cached.vae._feat_map, OffDeviceFeatureCache) and not isinstance(plain.vae._feat_map, OffDeviceFeatureCache)
    # every causal conv kept its last frames there: the decoder's output conv alone holds 2 frames of 32x32x(base width)
    assert cached.vae.cpu_cache_peak_bytes >= 2 * 8 * 32 * 32 * 4
    cache = OffDeviceFeatureCache([None, None], torch.device("cpu"))
    cache[0], cache[1] = torch.ones(2, 3), "Rep"
    assert cache.held_bytes == 24 and cache[1] == "Rep" and torch.equal(cache[0], torch.ones(2, 3))
