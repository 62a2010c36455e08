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


def test_generator_reads_our_diffusers_layout_like_our_own(flux2_bundle, lora_files, tmp_path):
    """``--lora_weight`` with the diffusers-layout file (split q/k/v) gives the image of the kohya-layout file."""
    from PIL import Image

    from musubi_tuner.flux_2_generate_image import main as generate

    _, _, paths = lora_files
    images = {}
    for fmt in ("kohya", "diffusers"):
        generate(["--model_version", "klein-4b", "--dit", str(flux2_bundle.dit_klein), "--vae", str(flux2_bundle.vae),
                  "--text_encoder", str(flux2_bundle.text_encoder_qwen3), "--image_size", "32", "32", "--save_path",
                  str(tmp_path / fmt), "--seed", "3", "--device", "cpu", "--prompt", "a cube", "--infer_steps", "2",
                  "--lora_weight", str(paths[fmt]), "--lora_multiplier", "0.7"])  # fmt: skip
        (png,) = (tmp_path / fmt).glob("*.png")
        images[fmt] = torch.tensor(list(Image.open(png).tobytes()), dtype=torch.int16)
    # same ΔW up to float rounding (alpha folded into both factors): at most one 8-bit level apart
    assert (images["kohya"] - images["diffusers"]).abs().max() <= 1


def test_convert_diffusers_layout_back_to_kohya_is_exact(lora_files, tmp_path):
    """Our diffusers file (shared lora_A over to_q/to_k/to_v) converts back to the kohya file: rank kept, same ΔW."""
    from musubi_tuner.convert_lora import main as convert_main

    _, _, paths = lora_files
    out = tmp_path / "back.safetensors"
    convert_main(["--input", str(paths["diffusers"]), "--output", str(out), "--target", "default"])
    back, orig = load_file(str(out)), load_file(str(paths["kohya"]))
    assert back.keys() == orig.keys()

    def delta(sd, m):
        return sd[m + "lora_up.weight"] @ sd[m + "lora_down.weight"] * sd[m + "alpha"] / sd[m + "lora_down.weight"].shape[0]

    for m in {k[: -len("lora_down.weight")] for k in orig if k.endswith("lora_down.weight")}:
        assert back[m + "lora_down.weight"].shape == orig[m + "lora_down.weight"].shape, m
        assert torch.allclose(delta(back, m), delta(orig, m), atol=1e-6), m


def _peft_lora_file(dit, path, r=2, alpha=6.0):
    """A LoRA written by diffusers/PEFT itself on the tiny ``Flux2Transformer2DModel`` (its own names, no .alpha keys,
    q/k/v with their own lora_A, a subset of the splits adapted), plus that model with the adapter active."""
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = _diffusers_model(dit)
    targets = ["attn.to_q", "attn.to_v", "add_k_proj", "to_qkv_mlp_proj", "ff.linear_in", "ff_context.linear_out",
               "x_embedder", "context_embedder", "timestep_embedder.linear_1", "single_stream_modulation.linear",
               "proj_out", "norm_out.linear"]  # fmt: skip
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, alpha_pattern={"add_k_proj": 1.0})
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    sd = get_peft_model_state_dict(ref)
    Flux2Pipeline.save_lora_weights(
        path.parent, sd, weight_name=path.name, transformer_lora_adapter_metadata=config.to_dict()
    )  # fmt: skip
    return ref


def test_file_written_by_diffusers_peft_gives_diffusers_output(flux2_bundle, lora_files, tmp_path):
    dit = lora_files[0]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ref = _peft_lora_file(dit, path)
    sd = load_file(str(path))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd and not any(k.endswith(".alpha") for k in sd)
    merged = load_dit(
        get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32,
        lora_deltas=build_lora_delta_hook([path], [1.0], dit.state_dict().keys()),
    )  # fmt: skip
    img, ids, txt, txt_ids, t = _inputs(dit, seed=1)
    with torch.no_grad():
        ours = merged(img, ids, txt, txt_ids, t)
        theirs = ref(img, txt, t, ids, txt_ids, return_dict=False)[0]
        base = dit(img, ids, txt, txt_ids, t)
    assert (ours - base).abs().max() > 1e-2
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # converted to our kohya layout (fused qkv: stacked lora_A, block-diagonal lora_B) it gives the same weights
    from musubi_tuner.convert_lora import main as convert_main

    kohya = tmp_path / "kohya.safetensors"
    convert_main(["--input", str(path), "--output", str(kohya), "--target", "default"])
    ksd = load_file(str(kohya))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv."
    assert ksd[qkv + "lora_down.weight"].shape[0] == 4 and float(ksd[qkv + "alpha"]) == 4.0  # q and v: rank 2 + 2
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in ksd and "lora_unet_img_in.alpha" in ksd
    again = load_dit(
        get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32,
        lora_deltas=build_lora_delta_hook([kohya], [1.0], dit.state_dict().keys()),
    )  # fmt: skip
    for k, v in merged.state_dict().items():
        assert torch.allclose(again.state_dict()[k], v, atol=1e-6), k


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_bare_peft_names_without_prefix_or_alpha_are_read(flux2_bundle, lora_files, tmp_path, prefix):
    """``lora_A/lora_B`` only, no ``transformer.`` prefix (or ``diffusion_model.``), no metadata: scale 1, k alone."""
    from safetensors.torch import save_file

    dit = lora_files[0]
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)
    path = tmp_path / "bare.safetensors"
    save_file({f"{prefix}single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_A.weight": a,
               f"{prefix}single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight": torch.randn(dit.single_blocks[1].linear1.weight.shape[0], 3, generator=g),
               f"{prefix}transformer_blocks.0.attn.add_k_proj.lora_A.weight": a.clone(),
               f"{prefix}transformer_blocks.0.attn.add_k_proj.lora_B.weight": b}, str(path))  # fmt: skip
    hook = build_lora_delta_hook([path], [1.0], dit.state_dict().keys())
    assert set(hook.keys()) == {"single_blocks.1.linear1.weight", "double_blocks.0.txt_attn.qkv.weight"}
    delta = hook.delta("double_blocks.0.txt_attn.qkv.weight")
    assert torch.equal(delta[64:128], b @ a) and not delta[:64].any() and not delta[128:].any()  # k rows only


def test_merge_lora_takes_the_diffusers_layout(flux2_bundle, lora_files, tmp_path):
    from musubi_tuner.merge_lora import main as merge_main

    _, _, paths = lora_files
    for fmt in ("kohya", "diffusers"):
        merge_main(
            [
                "--dit",
                str(flux2_bundle.dit_klein),
                "--lora_weight",
                str(paths[fmt]),
                "--save_merged_model",
                str(tmp_path / f"{fmt}.safetensors"),
            ]
        )
    a, b = (load_file(str(tmp_path / f"{f}.safetensors")) for f in ("kohya", "diffusers"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
