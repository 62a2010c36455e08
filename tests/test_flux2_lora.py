"""FLUX.2 LoRA formats: our --lora_format diffusers file loads in diffusers' load_lora_adapter with every module
applied and gives the output of our merged model; the ComfyUI layout uses official names; LoHa is refused there."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file

from musubi_tuner.flux_2.configs import get_model_version
from musubi_tuner.flux_2.models.keys import official_to_diffusers
from musubi_tuner.flux_2.models.loading import load_dit
from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids
from musubi_tuner.networks import lora_flux_2
from musubi_tuner.networks.merge import build_lora_delta_hook
from musubi_tuner.training.saving import check_network_lora_format, save_network_atomic
from musubi_tuner.utils.errors import UserError


def _diffusers_model(dit) -> Flux2Transformer2DModel:
    c = dit.config
    model = Flux2Transformer2DModel(
        in_channels=c["in_channels"], num_layers=c["depth"], num_single_layers=c["depth_single_blocks"],
        attention_head_dim=c["hidden_size"] // c["num_heads"], num_attention_heads=c["num_heads"],
        joint_attention_dim=c["context_in_dim"], axes_dims_rope=tuple(c["axes_dim"]), guidance_embeds=c["guidance_embed"],
    )  # fmt: skip
    model.load_state_dict(official_to_diffusers(dit.state_dict()), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def lora_files(flux2_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("f2lora")
    dit = load_dit(get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32)
    net = lora_flux_2.create_arch_network(1.0, 4, 2, None, None, dit)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    md = {"ss_network_module": "networks.lora_flux_2", "ss_base_model_version": "flux_2"}
    paths = {}
    for fmt in ("kohya", "diffusers", "comfyui"):
        paths[fmt] = out / f"{fmt}.safetensors"
        save_network_atomic(net, paths[fmt], torch.float32, md, fmt, "flux_2")
    return dit, net, paths


def _inputs(dit, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 6 + 4, 128, generator=g)
    ids = build_img_ids((2, 3), [(2, 2)])
    txt = torch.randn(1, 7, dit.config["context_in_dim"], generator=g)
    return img, ids, txt, build_txt_ids(7), torch.tensor([0.6])


def test_diffusers_layout_loads_in_diffusers_with_every_module(flux2_bundle, lora_files, caplog):
    dit, net, paths = lora_files
    sd = load_file(str(paths["diffusers"]))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    ref = _diffusers_model(dit)
    with caplog.at_level(logging.WARNING):
        ref.load_lora_adapter(sd, prefix="transformer", adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    applied = {n for n, m in ref.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    # fused qkv counts as 3: per double block 3 + 3 + 6 others, per single block 2
    assert len(applied) == 12 * dit.config["depth"] + 2 * dit.config["depth_single_blocks"]
    assert len(net.unet_loras) == 8 * dit.config["depth"] + 2 * dit.config["depth_single_blocks"]

    merged = load_dit(
        get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32,
        lora_deltas=build_lora_delta_hook([paths["kohya"]], [1.0], dit.state_dict().keys()),
    )  # fmt: skip
    img, ids, txt, txt_ids, t = _inputs(dit)
    with torch.no_grad():
        ours = merged(img, ids, txt, txt_ids, t)
        theirs = ref(img, txt, t, ids, txt_ids, return_dict=False)[0]
        base = dit(img, ids, txt, txt_ids, t)
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the output
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_comfyui_layout_uses_official_names_and_applies_on_prefixed_checkpoint(flux2_bundle, lora_files, tmp_path):
    from safetensors.torch import save_file

    dit, net, paths = lora_files
    sd = load_file(str(paths["comfyui"]))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in sd and not any(k.endswith(".alpha") for k in sd)
    # a checkpoint with the ComfyUI prefix takes the same LoRA with every module applied
    prefixed = tmp_path / "prefixed.safetensors"
    meta = {"flux2_dit_config": json.dumps(dit.config), "flux2_model_version": "klein-4b"}
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(prefixed), meta)
    hook = build_lora_delta_hook([paths["comfyui"]], [1.0], dit.state_dict().keys())
    a = load_dit(get_model_version("klein-4b"), prefixed, dtype=torch.float32, lora_deltas=hook)
    kohya = load_dit(
        get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32,
        lora_deltas=build_lora_delta_hook([paths["kohya"]], [1.0], dit.state_dict().keys()),
    )  # fmt: skip
    for k, v in kohya.state_dict().items():
        assert torch.allclose(a.state_dict()[k], v, atol=1e-6), k


def test_loha_in_diffusers_layout_is_refused(lora_files):
    from musubi_tuner.networks import loha

    dit = lora_files[0]
    net = loha.create_arch_network(1.0, 4, 4, None, None, dit)
    with pytest.raises(UserError, match="are LoHa/LoKr, which diffusers/PEFT cannot load"):
        check_network_lora_format(net, "diffusers", "flux_2")


def test_convert_lora_cli_writes_the_same_diffusers_file(lora_files, tmp_path):
    from musubi_tuner.convert_lora import main as convert_main

    _, _, paths = lora_files
    out = tmp_path / "converted.safetensors"
    convert_main(
        ["--input", str(paths["kohya"]), "--output", str(out), "--target", "diffusers", "--diffusers_prefix", "transformer"]
    )
    a, b = load_file(str(out)), load_file(str(paths["diffusers"]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
