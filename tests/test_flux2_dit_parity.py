"""FLUX.2 DiT: parity with diffusers' Flux2Transformer2DModel (tiny configs), key tables, RoPE ids, block-swap split."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from musubi_tuner.flux_2.configs import MODEL_VERSIONS, dit_params_for
from musubi_tuner.flux_2.models.dit import Flux2
from musubi_tuner.flux_2.models.keys import official_to_diffusers
from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids

# Tiny config of specs/flux2.md §3 (diffusers names) and its official equivalent.
TINY_DIFFUSERS = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=48,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
)
TINY_OFFICIAL = dict(
    in_channels=16, context_in_dim=48, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 4, 4, 4)
)


def random_official(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random; norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (1 + 0.1 * torch.randn(v.shape, generator=g)) if k.endswith(".scale") else 0.2 * torch.randn(v.shape, generator=g)
        for k, v in model.state_dict().items()
    }


def make_pair(guidance: bool, dtype=torch.float32, seed=0):
    ours = Flux2(**TINY_OFFICIAL, guidance_embed=guidance).eval()
    sd = random_official(ours, seed)
    ours.load_state_dict(sd, strict=True)
    ref = Flux2Transformer2DModel(**TINY_DIFFUSERS, guidance_embeds=guidance).eval()
    ref.load_state_dict(official_to_diffusers(sd), strict=True)
    return ours.to(dtype), ref.to(dtype)


def inputs(b=1, h=3, w=4, refs=(), length=6, seed=1):
    """Packed target tokens (h*w) + reference tokens, ids of the spec, text and timesteps."""
    g = torch.Generator().manual_seed(seed)
    n = h * w + sum(rh * rw for rh, rw in refs)
    img = torch.randn(b, n, 16, generator=g)
    img_ids = build_img_ids((h, w), list(refs)).expand(b, -1, -1)
    txt = torch.randn(b, length, 48, generator=g)
    txt_ids = build_txt_ids(length).expand(b, -1, -1)
    t = torch.rand(b, generator=g)
    return img, img_ids, txt, txt_ids, t


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("refs", [(), ((2, 3), (3, 2))])
def test_parity_fp32(guidance, refs):
    ours, ref = make_pair(guidance)
    img, img_ids, txt, txt_ids, t = inputs(b=2, refs=refs)
    g = torch.tensor([4.0, 2.5]) if guidance else None
    with torch.no_grad():
        a = ours(img, img_ids, txt, txt_ids, t, g)
        b = ref(img, txt, t, img_ids, txt_ids, guidance=g, return_dict=False)[0]
    assert a.shape == b.shape == img.shape
    assert (a - b).abs().max().item() < 1e-5


def test_parity_bf16():
    ours, ref = make_pair(True, torch.bfloat16)
    img, img_ids, txt, txt_ids, _ = inputs(b=1, refs=((2, 2),))
    # diffusers rounds t and guidance to the model dtype before the x1000 (we keep float32): pick values whose
    # x1000 is exact in bf16 so both see the same timestep
    t, g = torch.tensor([0.5]), torch.tensor([2.0])
    with torch.no_grad():
        a = ours(img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, t, g).float()
        b = ref(img.bfloat16(), txt.bfloat16(), t, img_ids, txt_ids, guidance=g, return_dict=False)[0].float()
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() < 0.03 * scale


def test_per_sample_ids_match_single_sample_runs():
    """Our DiT takes ids per item: a batch whose items have different reference layouts equals per-item calls."""
    ours, _ = make_pair(False)
    x1 = inputs(b=1, refs=((2, 3),), seed=3)
    x2 = inputs(b=1, refs=((3, 2),), seed=4)  # same token count, other shapes -> other ids
    batch = [torch.cat([a, b]) for a, b in zip(x1, x2)]
    with torch.no_grad():
        both = ours(*batch)
        one = ours(*x1)
        two = ours(*x2)
    assert torch.allclose(both[0], one[0], atol=1e-5) and torch.allclose(both[1], two[0], atol=1e-5)
    assert not torch.equal(x1[1], x2[1])


def test_ids_layout():
    ids = build_img_ids((2, 3), [(1, 2), (2, 1)])[0]
    assert ids.shape == (6 + 2 + 2, 4)
    assert ids[:6].tolist() == [[0, h, w, 0] for h in range(2) for w in range(3)]  # row-major target
    assert ids[6:8].tolist() == [[10, 0, 0, 0], [10, 0, 1, 0]]  # reference 0 at t = 10
    assert ids[8:].tolist() == [[20, 0, 0, 0], [20, 1, 0, 0]]  # reference 1 at t = 20
    assert build_txt_ids(3)[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]


def test_version_table_parameter_counts():
    """dev has 32,223,281,152 parameters (spec §3); klein dims give the known widths."""
    with torch.device("meta"):
        dev = Flux2(**dit_params_for("dev"))
    assert sum(p.numel() for p in dev.parameters()) == 32_223_281_152
    assert dev.double_blocks[0].img_mlp[0].weight.shape == (2 * 18432, 6144)
    assert MODEL_VERSIONS["klein-4b"].context_in_dim == 7680 and MODEL_VERSIONS["klein-9b"].context_in_dim == 12288
    assert not MODEL_VERSIONS["klein-9b"].guidance_embed and MODEL_VERSIONS["dev"].guidance_embed


def _spec_split(n, d, s):
    """musubi-tuner's FLUX.2 split, written out independently: one double block = two single blocks, each list the
    same share, the excess of the double list traded 1 : 2 into the single list; None when it does not fit.
    (Where the share rounds to no double block upstream swaps one single block; ours swaps n, never fewer than asked.)"""
    double = round(n / (1 + (s / d) / 2))
    single = round(double * s / d) if double else n
    while double > d - 2:
        double, single = double - 1, single + 2
    return (double, single) if single <= s - 2 else None


@pytest.mark.parametrize(("version", "documented_max"), [("dev", 29), ("klein-4b", 13), ("klein-9b", 16)])
def test_block_swap_split_matches_the_documented_maximum(version, documented_max):
    """specs/flux2.md §9: with fp8 the maximum --blocks_to_swap is dev 29, klein-4b 13, klein-9b 16."""
    from musubi_tuner.flux_2.models.dit import max_blocks_to_swap
    from musubi_tuner.memory import formulas as memory_formulas

    with torch.device("meta"):
        dit = Flux2(**dit_params_for(version))
    d, s = len(dit.double_blocks), len(dit.single_blocks)
    assert max_blocks_to_swap(d, s, keep=2) == documented_max
    # the memory estimator suggests the same maximum the trainer's clamp names
    assert memory_formulas.max_blocks_to_swap(dit, training=True) == documented_max
    assert _spec_split(documented_max, d, s) is not None and _spec_split(documented_max + 1, d, s) is None
    for n in range(1, documented_max + 1):
        assert tuple(dit._split_blocks_to_swap(n, training=True)) == _spec_split(n, d, s), n
    # more than the maximum swaps the maximum's blocks
    assert dit._split_blocks_to_swap(documented_max + 5, training=True) == dit._split_blocks_to_swap(documented_max, training=True)
    assert dit._split_blocks_to_swap(0) == [0, 0]


# -- loading -------------------------------------------------------------------------------------------------------


def _save_official(path, sd, *, guidance, prefix="", version=None):
    import json

    from safetensors.torch import save_file

    from musubi_tuner.flux_2.models.loading import DIT_CONFIG_METADATA_KEY, MODEL_VERSION_METADATA_KEY

    md = {DIT_CONFIG_METADATA_KEY: json.dumps({**TINY_OFFICIAL, "axes_dim": [4, 4, 4, 4], "guidance_embed": guidance})}
    if version:
        md[MODEL_VERSION_METADATA_KEY] = version
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=md)


def test_load_official_prefixed_and_diffusers_dir(tmp_path):
    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.models.loading import load_dit

    ours, ref = make_pair(True)
    sd = ours.state_dict()
    _save_official(tmp_path / "plain.safetensors", sd, guidance=True)
    _save_official(tmp_path / "comfy.safetensors", sd, guidance=True, prefix="model.diffusion_model.")
    ref.save_pretrained(tmp_path / "diffusers")
    x = inputs(b=1, refs=((2, 2),))
    g = torch.tensor([4.0])
    with torch.no_grad():
        want = ours(*x, g)
        for src in ("plain.safetensors", "comfy.safetensors", "diffusers"):
            m = load_dit(get_model_version("dev"), tmp_path / src, dtype=torch.float32)
            assert torch.allclose(m(*x, g), want, atol=1e-6), src


def test_comfy_scaled_fp8_dit_file_computes_with_its_dequantised_weights(tmp_path):
    """ComfyUI's FLUX.2 fp8 files (e.g. ``flux2_dev_fp8mixed``): ``model.diffusion_model.`` prefix, some block Linears in
    float8_e4m3fn with a per-tensor scale in the newer spelling (``weight_scale``, ``input_scale``, ``comfy_quant``),
    others left in bf16. With ``--fp8_base`` they stay as stored and the DiT computes what the dequantised model does."""
    import json

    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.models.loading import load_dit

    ours, _ = make_pair(True)
    stored, dequantised = {}, {}
    for i, (k, v) in enumerate(ours.state_dict().items()):
        if "_blocks." in k and k.endswith(".weight") and v.dim() == 2 and i % 2 == 0:  # "mixed": every other Linear
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            module = k.removesuffix(".weight")
            stored[k], stored[module + ".weight_scale"] = q, scale.reshape(())
            stored[module + ".input_scale"] = torch.tensor(1.0)
            stored[module + ".comfy_quant"] = torch.tensor(
                list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8
            )
            dequantised[k] = q.float() * scale
        else:
            stored[k] = dequantised[k] = v
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())
    _save_official(tmp_path / "fp8mixed.safetensors", stored, guidance=True, prefix="model.diffusion_model.")
    _save_official(tmp_path / "dequantised.safetensors", dequantised, guidance=True)
    x = inputs(b=1, refs=((2, 2),))
    g = torch.tensor([4.0])
    with torch.no_grad():
        m = load_dit(get_model_version("dev"), tmp_path / "fp8mixed.safetensors", dtype=torch.float32, fp8_base=True)
        ref = load_dit(get_model_version("dev"), tmp_path / "dequantised.safetensors", dtype=torch.float32)
        assert sum(p.dtype == torch.float8_e4m3fn for p in m.state_dict().values()) > 0
        assert torch.allclose(m(*x, g), ref(*x, g), rtol=1e-5, atol=1e-6)


def test_variant_mismatch_is_one_clear_error(tmp_path):
    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.models.loading import load_dit
    from musubi_tuner.utils.errors import UserError

    klein, _ = make_pair(False)
    _save_official(tmp_path / "klein.safetensors", klein.state_dict(), guidance=False, version="klein-4b")
    with pytest.raises(UserError, match=r"klein\.safetensors.*klein-4b.*--model_version is dev"):
        load_dit(get_model_version("dev"), tmp_path / "klein.safetensors")
    with pytest.raises(UserError, match=r"klein\.safetensors.*FLUX\.2 klein-4b.*klein-9b"):
        load_dit(get_model_version("klein-9b"), tmp_path / "klein.safetensors")
    # no metadata: the real-size dims of the version are compared with the file
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in klein.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(
        UserError, match=r"bare\.safetensors: checkpoint does not fit --model_version klein-4b: it has 1 double / 2 single"
    ):
        load_dit(get_model_version("klein-4b"), tmp_path / "bare.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UserError, match="not a FLUX.2 transformer"):
        load_dit(get_model_version("klein-4b"), tmp_path / "vae.safetensors")


def test_block_swap_and_checkpointing_keep_outputs_and_grads():
    """Swapping double and single blocks and checkpointing (with CPU offload) change neither output nor gradients."""
    from musubi_tuner.modules.offloading import BlockSwapConfig

    cfg = {**TINY_OFFICIAL, "depth": 4, "depth_single_blocks": 6}
    ref = Flux2(**cfg, guidance_embed=True)
    ref.load_state_dict(random_official(ref, 3))
    other = Flux2(**cfg, guidance_embed=True)
    other.load_state_dict(ref.state_dict())
    assert other._split_blocks_to_swap(4, training=True) == [2, 3]
    other.enable_block_swap(4, BlockSwapConfig(torch.device("cpu"), supports_backward=True))
    other.enable_gradient_checkpointing(activation_cpu_offloading=True)
    x = inputs(b=2, refs=((2, 2),))
    g = torch.tensor([3.0, 1.0])
    outs, grads = [], []
    for model in (ref, other):
        model.requires_grad_(False)
        w = model.single_blocks[5].linear2.weight
        w.requires_grad_(True)
        model.train()
        out = model(*x, g)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(w.grad.clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_distilled_and_base_klein_cannot_be_told_apart_but_the_file_name_warns(flux2_bundle, tmp_path, project_log):
    """Same keys and shapes, no variant in real files: a base-named file loads as klein-4b with a warning naming both
    variants' defaults; a matching name or a file that declares its variant gives no warning."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.models.loading import DIT_CONFIG_METADATA_KEY, load_dit, warn_if_name_suggests_twin

    with safe_open(str(flux2_bundle.dit_klein), "pt") as f:
        config_only = {DIT_CONFIG_METADATA_KEY: f.metadata()[DIT_CONFIG_METADATA_KEY]}  # like a real file: no variant
    base_named = tmp_path / "flux2-klein-base-4b.safetensors"
    save_file(load_file(str(flux2_bundle.dit_klein)), str(base_named), config_only)
    load_dit(get_model_version("klein-4b"), base_named, dtype=torch.float32)
    (msg,) = [r.getMessage() for r in project_log.records if "file name suggests" in r.getMessage()]
    assert "suggests FLUX.2 klein-base-4b, but --model_version is klein-4b (4 steps, guidance 1.0, no CFG" in msg
    assert "klein-base-4b: 50 steps, guidance 4.0, true CFG" in msg
    project_log.clear()
    load_dit(get_model_version("klein-base-4b"), base_named, dtype=torch.float32)
    load_dit(get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32)  # declares klein-4b
    assert not [r for r in project_log.records if "file name suggests" in r.getMessage()]
    from pathlib import Path

    assert warn_if_name_suggests_twin(Path("flux2-klein-9b.safetensors"), get_model_version("klein-base-9b"))
    assert not warn_if_name_suggests_twin(Path("flux2-klein-9b.safetensors"), get_model_version("klein-9b"))
    assert not warn_if_name_suggests_twin(Path("my_finetune.safetensors"), get_model_version("klein-base-9b"))
    assert not warn_if_name_suggests_twin(Path("flux2-dev-base.safetensors"), get_model_version("dev"))
