"""Qwen-Image checkpoints and adapters: ComfyUI prefixes and the 2511 marker key, diffusers directories, wrong-variant
errors, --num_layers, LoRA merged on load into a prefixed checkpoint, and our ``--lora_format diffusers`` file loaded
by diffusers' ``load_lora_adapter`` giving the output of our merged model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_tuner.networks.lora_qwen_image import create_arch_network
from musubi_tuner.networks.merge import build_lora_delta_hook
from musubi_tuner.qwen_image.configs import get_model_version
from musubi_tuner.qwen_image.models.loading import load_dit, model_keys
from musubi_tuner.qwen_image.vae import QwenImageVae
from musubi_tuner.training.saving import save_network_atomic
from musubi_tuner.utils.errors import UserError

ORIGINAL = get_model_version("original")


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, 3)]
    x = torch.randn(1, 6, 64, generator=g)
    txt = torch.randn(1, 4, 32, generator=g)
    return x, txt, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0.6]), shapes


def _run(dit, inputs):
    with torch.no_grad():
        return dit(*inputs)


@pytest.fixture(scope="module")
def lora_file(qwen_bundle, tmp_path_factory):
    """A LoRA for the tiny DiT with random (non-zero) factors, in our kohya layout."""
    dit = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32)
    net = create_arch_network(1.0, 4, 2, None, None, dit)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    path = tmp_path_factory.mktemp("qi_lora") / "lora.safetensors"
    net.save_weights(str(path), torch.float32, None)
    return path, net


def test_prefixed_checkpoint_with_marker_loads_and_takes_the_whole_lora(qwen_bundle, lora_file, tmp_path, caplog):
    sd = load_file(str(qwen_bundle.dit))
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    prefixed["model.diffusion_model.__index_timestep_zero__"] = torch.zeros(1)
    path = tmp_path / "comfy.safetensors"
    save_file(prefixed, str(path), metadata={})  # a released file carries no config: dims from the release table...
    with pytest.raises(UserError, match="shape"):  # ...which the tiny file does not fit: named, not a traceback
        load_dit(get_model_version("edit-2511"), path, dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(qwen_bundle.dit), "pt") as f:
        md = f.metadata()
    save_file(prefixed, str(path), metadata=md)
    plain = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32)
    comfy = load_dit(ORIGINAL, path, dtype=torch.float32)
    assert torch.equal(_run(plain, _inputs()), _run(comfy, _inputs()))
    lora, _ = lora_file
    merged_plain = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32,
                            lora_deltas=build_lora_delta_hook([lora], [1.0], model_keys(qwen_bundle.dit)))  # fmt: skip
    hook = build_lora_delta_hook([lora], [1.0], model_keys(path))
    merged_comfy = load_dit(ORIGINAL, path, dtype=torch.float32, lora_deltas=hook)
    out = _run(merged_comfy, _inputs())
    assert torch.equal(out, _run(merged_plain, _inputs()))
    assert not torch.allclose(out, _run(plain, _inputs()))


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_comfy_fp8_dit_files_compute_with_their_dequantised_weights(qwen_bundle, tmp_path, scaled):
    """ComfyUI's fp8 Qwen-Image files: ``qwen_image_fp8_e4m3fn.safetensors`` (block Linears cast to float8_e4m3fn,
    no scale) and the scaled-fp8 layout (per-tensor ``scale_weight`` + ``scaled_fp8`` marker), prefixed. With
    ``--fp8_base`` the weights stay as stored and the DiT computes what the dequantised model does."""
    from safetensors import safe_open

    with safe_open(str(qwen_bundle.dit), "pt") as f:
        md = f.metadata()
    stored, dequantised = {}, {}
    for k, v in load_file(str(qwen_bundle.dit)).items():
        if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.dim() == 2:
            scale = v.float().abs().max() / 448.0 if scaled else torch.tensor(1.0)
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            stored[k] = q
            if scaled:
                stored[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            dequantised[k] = q.float() * scale
        else:
            stored[k] = dequantised[k] = v
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    comfy, ref_path = tmp_path / "comfy_fp8.safetensors", tmp_path / "dequantised.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in stored.items()}, str(comfy), metadata=md)
    save_file({k: v.contiguous() for k, v in dequantised.items()}, str(ref_path), metadata=md)
    dit = load_dit(ORIGINAL, comfy, dtype=torch.float32, fp8_base=True)
    assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    ref = load_dit(ORIGINAL, ref_path, dtype=torch.float32)
    assert torch.allclose(_run(dit, _inputs()), _run(ref, _inputs()), rtol=1e-5, atol=1e-6)


def test_diffusers_directory_and_variant_errors(qwen_bundle):
    a = load_dit(ORIGINAL, qwen_bundle.dit_diffusers, dtype=torch.float32)
    b = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32)
    assert torch.equal(_run(a, _inputs()), _run(b, _inputs()))
    with pytest.raises(UserError, match="Layered checkpoint"):
        load_dit(ORIGINAL, qwen_bundle.dit_layered)
    with pytest.raises(UserError, match="not a Layered checkpoint"):
        load_dit(get_model_version("layered"), qwen_bundle.dit)
    with pytest.raises(UserError, match="not a Qwen-Image DiT"):
        load_dit(ORIGINAL, qwen_bundle.vae_file)
    one = load_dit(ORIGINAL, qwen_bundle.dit, num_layers=1)
    assert len(one.transformer_blocks) == 1
    with pytest.raises(UserError, match="transformer_blocks"):
        load_dit(ORIGINAL, qwen_bundle.dit, num_layers=3)


def test_vae_files_and_rgba_errors(qwen_bundle):
    with pytest.raises(UserError, match="RGBA Layered VAE"):
        QwenImageVae.load(qwen_bundle.vae_layered, layered=False)
    with pytest.raises(UserError, match="RGB VAE"):
        QwenImageVae.load(qwen_bundle.vae_file, layered=True)
    from safetensors import safe_open

    with safe_open(str(qwen_bundle.vae_file), "pt") as f:  # the ComfyUI file: original Wan key layout
        assert "encoder.conv1.weight" in f.keys() and "encoder.conv_in.weight" not in f.keys()
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    d = QwenImageVae.load(qwen_bundle.vae, dtype=torch.float32).encode(x)
    f = QwenImageVae.load(qwen_bundle.vae_file, dtype=torch.float32).encode(x)
    assert d.shape == (1, 16, 4, 6) and torch.equal(d, f)


def test_diffusers_lora_format_loads_in_diffusers_and_matches_our_merge(qwen_bundle, lora_file, tmp_path, caplog):
    from diffusers import QwenImageTransformer2DModel

    lora, net = lora_file
    out = tmp_path / "diffusers_lora.safetensors"
    save_network_atomic(net, out, torch.float32, None, "diffusers", "qwen_image")
    sd = load_file(str(out))
    assert all(k.startswith("transformer.transformer_blocks.") for k in sd)
    ref = QwenImageTransformer2DModel.from_pretrained(str(qwen_bundle.dit_diffusers), torch_dtype=torch.float32).eval()
    with caplog.at_level("WARNING"):
        ref.load_lora_adapter(sd, prefix="transformer", adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    x, txt, mask, t, shapes = _inputs()
    with torch.no_grad():
        want = ref(x, txt, mask, t, img_shapes=[shapes], return_dict=False)[0]
    # the same weights as a float32 single file, so that the merged weights are not rounded to the file's bf16
    from safetensors import safe_open

    with safe_open(str(qwen_bundle.dit), "pt") as f:
        md = f.metadata()
    fp32 = tmp_path / "dit_fp32.safetensors"
    save_file({k: v.float().contiguous() for k, v in load_file(str(qwen_bundle.dit)).items()}, str(fp32), metadata=md)
    ours = load_dit(ORIGINAL, fp32, dtype=torch.float32, lora_deltas=build_lora_delta_hook([lora], [1.0], model_keys(fp32)))
    got = _run(ours, (x, txt, mask, t, shapes))
    base = _run(load_dit(ORIGINAL, fp32, dtype=torch.float32), (x, txt, mask, t, shapes))
    assert (got - want).abs().max().item() < 1e-4
    assert (got - base).abs().max().item() > 1e-2
