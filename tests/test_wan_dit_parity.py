"""Wan DiT: parity with diffusers' WanTransformer3DModel (T2V, 2.1 I2V, FLF2V, 2.2 I2V, TI2V per-token timesteps),
the diffusers → official key table, the task table and checkpoint loading errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.safetensors_utils import open_weights
from musubi_tuner.wan.configs import DIMS, TASKS, dit_params_for, get_task_config, parse_timestep_boundary
from musubi_tuner.wan.models.dit import WanModel
from musubi_tuner.wan.models.loading import DIFFUSERS_KEY_MAP, load_dit, official_to_diffusers

HEADS, HEAD_DIM, TEXT_DIM, FFN = 4, 16, 32, 128


def diffusers_cfg(in_ch=16, out_ch=16, image=False, flf=False) -> dict:
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=in_ch,
        out_channels=out_ch,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    if image:
        cfg.update(image_dim=1280, added_kv_proj_dim=HEADS * HEAD_DIM)
    if flf:
        cfg.update(pos_embed_seq_len=514)
    return cfg


def ours_params(in_ch=16, out_ch=16, image=False, flf=False, version="2.1") -> dict:
    return dict(
        model_version=version,
        in_dim=in_ch,
        out_dim=out_ch,
        dim=HEADS * HEAD_DIM,
        ffn_dim=FFN,
        num_heads=HEADS,
        num_layers=2,
        text_dim=TEXT_DIM,
        image_dim=1280 if image else None,
        flf_pos_emb=flf,
    )


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (the zero-initialised emb_pos too); norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        sd[k] = 1 + 0.1 * r if ("norm" in k and "weight" in k) else 0.2 * r
    return sd


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped = DIFFUSERS_KEY_MAP.map_keys(sd.keys())
    return {mapped[k]: v for k, v in sd.items() if k in mapped}


def make_pair(cfg: dict, params: dict, seed: int = 0):
    ref = WanTransformer3DModel(**cfg).eval()
    sd = random_state_dict(ref, seed)
    ref.load_state_dict(sd, strict=True)
    ours = WanModel(**params).eval()
    ours.load_state_dict(to_official(sd), strict=True)
    return ref, ours, sd


def text(b=2, seed=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, 512, TEXT_DIM, generator=g)
    t[0, 7:] = 0  # zero pads, as the product feeds them
    t[1, 11:] = 0
    return t


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|. Our sinusoid is float64 like the official code, diffusers' float32: at t = 999
    that alone gives ~1e-5 relative (0 when both use float32), hence a 3e-5 tolerance in fp32."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def latents(b=2, c=16, f=3, h=4, w=6, seed=1) -> torch.Tensor:
    return torch.randn(b, c, f, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_t2v_parity_fp32_and_bf16():
    ref, ours, _ = make_pair(diffusers_cfg(), ours_params())
    x, ctx, t = latents(), text(), torch.tensor([999.0, 137.5])
    want = ref(x, t, ctx, return_dict=False)[0]
    got = ours(x, t, ctx)
    assert got.shape == (2, 16, 3, 4, 6)
    assert rel(got, want) < 3e-5
    # unpadded prompts are zero-padded to 512 inside the model: same result
    got_list = ours(x, t, [ctx[0, :7], ctx[1, :11]])
    assert (got_list - got).abs().max() < 1e-6
    ref_bf, ours_bf = ref.to(torch.bfloat16), ours.to_dtype(torch.bfloat16)
    want_bf = ref_bf(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
    got_bf = ours_bf(x.bfloat16(), t, ctx.bfloat16()).float()
    assert rel(got_bf, want_bf) < 0.05
    assert rel(got_bf, want) < 0.05


@torch.no_grad()
def test_i2v_21_parity_with_clip_tokens():
    ref, ours, _ = make_pair(diffusers_cfg(in_ch=36, image=True), ours_params(in_ch=36, image=True))
    x, ctx, t = latents(c=16), text(), torch.tensor([500.0, 20.0])
    y = latents(c=20, seed=5)
    clip = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(7))
    want = ref(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
    got = ours(x, t, ctx, clip_fea=clip, y=y)
    assert rel(got, want) < 3e-5
    # the image tokens matter
    assert (ours(x, t, ctx, clip_fea=torch.randn_like(clip), y=y) - got).abs().max() > 1e-3


@torch.no_grad()
def test_flf2v_parity_and_emb_pos_loaded():
    ref, ours, sd = make_pair(diffusers_cfg(in_ch=36, image=True, flf=True), ours_params(in_ch=36, image=True, flf=True))
    assert sd["condition_embedder.image_embedder.pos_embed"].abs().sum() > 0
    assert torch.equal(ours.img_emb.emb_pos, sd["condition_embedder.image_embedder.pos_embed"])
    x, ctx, t = latents(), text(), torch.tensor([700.0, 300.0])
    y = latents(c=20, seed=5)
    clip = torch.randn(4, 257, 1280, generator=torch.Generator().manual_seed(7))  # (first, last) per sample
    want = ref(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
    got = ours(x, t, ctx, clip_fea=clip, y=y)
    assert rel(got, want) < 3e-5


@torch.no_grad()
def test_i2v_22_parity_no_clip():
    ref, ours, _ = make_pair(diffusers_cfg(in_ch=36), ours_params(in_ch=36, version="2.2"))
    x, ctx, t, y = latents(), text(), torch.tensor([900.0, 875.0]), latents(c=20, seed=5)
    want = ref(torch.cat([x, y], 1), t, ctx, return_dict=False)[0]
    assert rel(ours(x, t, ctx, y=y), want) < 3e-5


@torch.no_grad()
def test_ti2v_per_token_timesteps_parity():
    ref, ours, _ = make_pair(diffusers_cfg(in_ch=48, out_ch=48), ours_params(in_ch=48, out_ch=48, version="2.2"))
    x, ctx = latents(c=48), text()
    seq = 3 * 2 * 3
    t = torch.full((2, seq), 640.0)
    t[:, : 2 * 3] = 0.0  # first latent frame clean
    want = ref(x, t, ctx, return_dict=False)[0]
    got = ours(x, t, ctx)
    assert rel(got, want) < 3e-5
    # one timestep per sample is a different computation
    assert (ours(x, torch.tensor([640.0, 640.0]), ctx) - got).abs().max() > 1e-3


def test_key_table_roundtrip_and_module_names():
    ref = WanTransformer3DModel(**diffusers_cfg(in_ch=36, image=True, flf=True))
    ours = WanModel(**ours_params(in_ch=36, image=True, flf=True))
    mapped = DIFFUSERS_KEY_MAP.map_keys(ref.state_dict().keys())
    assert set(mapped.values()) == set(ours.state_dict().keys())
    for theirs, official in mapped.items():
        assert DIFFUSERS_KEY_MAP.inverse(official) == theirs
        assert official_to_diffusers(official) == theirs
    assert mapped["blocks.1.norm2.weight"] == "blocks.1.norm3.weight"
    assert official_to_diffusers("blocks.3.cross_attn.k_img") == "blocks.3.attn2.add_k_proj"
    assert official_to_diffusers("blocks.0.ffn.0") == "blocks.0.ffn.net.0.proj"


def test_rope_and_time_embedding_formulas():
    from musubi_tuner.wan.models.dit import rope_axis_dims, rope_cos_sin, sinusoidal_embedding

    assert rope_axis_dims(128) == (44, 42, 42)
    cos, sin = rope_cos_sin((2, 3, 4), 128, torch.device("cpu"))
    # token (f=1, h=2, w=3): index 1*12 + 2*4 + 3 = 23; h component j=5 → angle 2 * 10000^(-10/42)
    angle = 2 * 10000 ** (-10 / 42)
    assert math.isclose(float(cos[0, 23, 0, 22 + 5]), math.cos(angle), rel_tol=1e-6)
    assert math.isclose(float(sin[0, 23, 0, 1]), math.sin(1 * 10000 ** (-2 / 44)), rel_tol=1e-6)
    e = sinusoidal_embedding(torch.tensor([999.0]), 256)
    assert math.isclose(float(e[0, 3]), math.cos(999 * 10000 ** (-3 / 128)), abs_tol=1e-6)
    assert math.isclose(float(e[0, 128 + 3]), math.sin(999 * 10000 ** (-3 / 128)), abs_tol=1e-6)


def test_task_table():
    assert set(TASKS) >= {"t2v-14B", "t2v-1.3B", "i2v-14B", "t2i-14B", "flf2v-14B", "t2v-1.3B-FC", "t2v-14B-FC", "i2v-14B-FC"}
    assert {"t2v-A14B", "i2v-A14B", "ti2v-5B"} <= set(TASKS)
    assert get_task_config("t2v-A14B").boundary == 0.875 and get_task_config("i2v-A14B").boundary == 0.9
    ti2v = get_task_config("ti2v-5B")
    assert (ti2v.vae, ti2v.latent_channels, ti2v.in_channels, ti2v.resolution_step) == ("wan2.2", 48, 48, 32)
    assert get_task_config("i2v-14B").in_channels == 36 and get_task_config("i2v-14B").clip
    assert not get_task_config("i2v-A14B").clip
    with pytest.raises(UserError, match="unknown --task"):
        get_task_config("t2v-15B")
    # parameter counts of the released models (spec §2) from our module tree, built on meta
    for task, n in (("t2v-1.3B", DIMS["1.3B"].num_params), ("t2v-14B", DIMS["14B"].num_params), ("ti2v-5B", DIMS["5B"].num_params)):
        with torch.device("meta"):
            m = WanModel(**dit_params_for(get_task_config(task)))
        assert sum(p.numel() for p in m.parameters()) == n, task
    with torch.device("meta"):
        m = WanModel(**dit_params_for(get_task_config("i2v-14B")))
    assert sum(p.numel() for p in m.parameters()) == 16_394_878_784


@pytest.mark.parametrize("value, want", [(0.875, 0.875), ("875", 0.875), (900, 0.9), (1, 1.0), (0, 0.0)])
def test_timestep_boundary_both_scales(value, want):
    assert parse_timestep_boundary(value) == pytest.approx(want)


@pytest.mark.parametrize("value", [-0.1, 1000.5, "abc"])
def test_timestep_boundary_refused(value):
    with pytest.raises(UserError, match="--timestep_boundary"):
        parse_timestep_boundary(value)


def _tiny_file(tmp_path, sd, name="dit.safetensors", prefix="", params=None):
    import json

    md = {"wan_dit_config": json.dumps(params)} if params else None
    path = tmp_path / name
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=md)
    return path


@torch.no_grad()
def test_load_official_comfy_and_diffusers_layouts(tmp_path):
    ref, ours, sd = make_pair(diffusers_cfg(), ours_params())
    params = ours_params()
    task = get_task_config("t2v-1.3B")
    x, ctx, t = latents(), text(), torch.tensor([400.0, 100.0])
    want = ours(x, t, ctx)
    official = to_official(sd)
    for path in (
        _tiny_file(tmp_path, official, "official.safetensors", params=params),
        _tiny_file(tmp_path, official, "comfy.safetensors", prefix="model.diffusion_model.", params=params),
        _tiny_file(tmp_path, sd, "diffusers_named.safetensors", params=params),
    ):
        m = load_dit(task, path, dtype=torch.float32)
        assert (m(x, t, ctx) - want).abs().max() < 1e-6, path.name
    ref.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True)
    m = load_dit(task, tmp_path / "pipe", dtype=torch.float32)
    assert (m(x, t, ctx) - want).abs().max() < 1e-6


def test_checkpoint_of_another_variant_is_one_clear_error(tmp_path):
    _, _, sd = make_pair(diffusers_cfg(), ours_params())
    path = _tiny_file(tmp_path, to_official(sd), params=ours_params())
    # the file's metadata describes a T2V model; the I2V task expects 36 channels + CLIP input
    with pytest.raises(UserError, match="does not fit task 'i2v-14B'"):
        load_dit(get_task_config("i2v-14B"), path, dtype=torch.float32)
    bare = _tiny_file(tmp_path, to_official(sd), "bare.safetensors")  # no metadata: the task's 14B dims
    with pytest.raises(UserError, match=r"bare.safetensors: checkpoint does not fit task 't2v-14B': it has 2 blocks"):
        load_dit(get_task_config("t2v-14B"), bare, dtype=torch.float32)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not a Wan DiT"):
        load_dit(get_task_config("t2v-14B"), other)
    with pytest.raises(UserError, match="not found"):
        load_dit(get_task_config("t2v-14B"), tmp_path / "missing.safetensors")
    assert open_weights(path).keys()


def test_nag_formula_and_alpha():
    from musubi_tuner.wan.models.dit import nag_combine

    zp = torch.tensor([[[1.0, -2.0, 0.5]]])
    zn = torch.tensor([[[0.0, 1.0, 1.0]]])
    s, tau, alpha = 4.0, 1.5, 0.25
    zt = [4 * 1.0 - 3 * 0.0, 4 * -2.0 - 3 * 1.0, 4 * 0.5 - 3 * 1.0]  # [4, -11, -1]
    r = sum(abs(v) for v in zt) / 3.5  # 16 / 3.5 > tau
    want = [alpha * v * tau / r + (1 - alpha) * p for v, p in zip(zt, [1.0, -2.0, 0.5])]
    assert nag_combine(zp, zn, s, tau, alpha)[0, 0].tolist() == pytest.approx(want)
    assert torch.equal(nag_combine(zp, zn, 1.0, tau, 0.7), zp)  # scale 1: no guidance
    assert not torch.allclose(nag_combine(zp, zn, s, tau, 0.5), nag_combine(zp, zn, s, tau, 0.9))  # --nag_alpha matters


@torch.no_grad()
def test_nag_in_the_model_changes_only_with_a_negative():
    _, ours, _ = make_pair(diffusers_cfg(), ours_params())
    x, ctx, t = latents(b=1), text()[:1], torch.tensor([500.0])
    plain = ours(x, t, ctx)
    same = ours(x, t, ctx, nag=(ctx, 5.0, 3.5, 0.5))  # negative == prompt: z− = z+, so z̃ = z+
    assert (same - plain).abs().max() < 1e-5
    neg = torch.randn_like(ctx)
    assert (ours(x, t, ctx, nag=(neg, 5.0, 3.5, 0.5)) - plain).abs().max() > 1e-3
