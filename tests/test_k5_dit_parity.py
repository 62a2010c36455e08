"""Kandinsky 5 DiT: parity with diffusers' Kandinsky5Transformer3DModel, text masks, task table, checkpoint loading."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel
from diffusers.models.transformers import transformer_kandinsky as dk
from safetensors.torch import save_file

from musubi_tuner.kandinsky5.configs import FAMILIES, TASK_CONFIGS, dit_params_for, get_task_config
from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D
from musubi_tuner.kandinsky5.models.loading import load_dit
from musubi_tuner.kandinsky5.models.nabla import build_sparse_params
from musubi_tuner.utils.errors import UserError

# Tiny config of specs/kandinsky5.md §3.9 with real channel counts (33-channel T2V input), head dim 16.
TINY = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=48,
    in_text_dim2=24,
    time_dim=32,
    model_dim=64,
    ff_dim=128,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=(4, 6, 6),
    visual_cond=True,
)
_DIFFUSERS_NABLA = dk.nablaT_v2
NABLA = dict(attention_type="nabla", attention_P=0.5, attention_wT=11, attention_wH=3, attention_wW=3)


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (also the zero-initialised modulations); norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        sd[k] = 1 + 0.1 * r if "norm" in k else 0.2 * r
    return sd


def make_pair(cfg: dict, seed: int = 0):
    ref = Kandinsky5Transformer3DModel(**cfg).eval()
    sd = random_state_dict(ref, seed)
    ref.load_state_dict(sd, strict=True)
    ours = DiffusionTransformer3D(**cfg).eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours, sd


def inputs(b=2, f=3, h=4, w=6, length=5, channels=33, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, f, h, w, channels, generator=g),
        torch.randn(b, length, TINY["in_text_dim"], generator=g),
        torch.randn(b, TINY["in_text_dim2"], generator=g),
        torch.tensor([300.0, 850.0][:b]),
    )


def run_ref(ref, x, text, pooled, t, scale=(1.0, 2.0, 2.0), sparse=None):
    _, f, h, w, _ = x.shape
    pos = [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)]
    with torch.no_grad():
        return ref(x, text, t, pooled, pos, torch.arange(text.shape[1]), scale, sparse, return_dict=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    return make_pair(TINY)


def test_state_dict_keys_equal_diffusers(pair):
    ref, ours, _ = pair
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize(
    "family, task", [("video_lite", "k5-lite-t2v-5s-sd"), ("image_lite", "k5-lite-t2i-hd"), ("video_pro", "k5-pro-t2v-5s-sd")]
)
def test_family_key_and_parameter_counts(family, task):
    with torch.device("meta"):
        model = DiffusionTransformer3D(**dit_params_for(task))
    fam = FAMILIES[family]
    assert len(model.state_dict()) == fam.num_keys
    assert sum(p.numel() for p in model.parameters()) == fam.num_params
    assert model.head_dim * model.visual_transformer_blocks[0].self_attention.num_heads == fam.model_dim


def test_input_width_per_task():
    def width(task):
        with torch.device("meta"):
            return DiffusionTransformer3D(**dit_params_for(task)).visual_embeddings.in_layer.weight.shape

    assert width("k5-lite-t2i-hd") == (2560, 64)
    assert width("k5-lite-i2i-hd") == (2560, 132)
    assert width("k5-lite-t2v-5s-sd") == (1792, 132)


def test_task_table_and_unknown_task():
    assert len(TASK_CONFIGS) == 17
    hd = get_task_config("k5-pro-t2v-10s-hd")
    assert (hd.nabla_p, hd.rope_scale, hd.vae, hd.qwen_max_length) == (0.7, (1.0, 3.16, 3.16), "hunyuan_video", 256)
    img = get_task_config("k5-lite-t2i-hd")
    assert (img.vae, img.qwen_max_length, img.scheduler_scale, img.visual_cond) == ("flux1", 512, 3.0, False)
    assert get_task_config("k5-lite-t2v-5s-distil-sd").steps == 16
    with pytest.raises(UserError, match="k5-lite-t2v-5s-sd") as e:
        get_task_config("k5-lite-t2v-7s")
    assert "k5-lite-t2v-7s" in str(e.value)


def test_fp32_parity_dense(pair):
    ref, ours, _ = pair
    x, text, pooled, t = inputs()
    expected = run_ref(ref, x, text, pooled, t)
    with torch.no_grad():
        got = ours(x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0))
    assert got.shape == (2, 3, 4, 6, 16)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # diffusers' fp32 RMSNorm on bf16 weights
def test_bf16_parity_dense(pair, tmp_path):
    ref, _, sd = pair
    ref.save_pretrained(tmp_path)  # diffusers' own loader keeps its fp32 modules (a plain .to(bf16) would not)
    ref_bf16 = Kandinsky5Transformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours = DiffusionTransformer3D(**TINY).eval()
    ours.load_state_dict(sd)
    ours.to_dtype(torch.bfloat16)
    assert ours.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    assert ours.time_embeddings.in_layer.weight.dtype == torch.float32
    x, text, pooled, t = inputs()
    expected = run_ref(ref_bf16, x.bfloat16(), text.bfloat16(), pooled.bfloat16(), t)
    with torch.no_grad():
        got = ours(x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0))
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) <= 1e-2


def test_text_mask_matches_unpadded_diffusers(pair):
    """B=2 prompts of lengths 5 and 3, right-padded + masked, equal diffusers run per prompt without padding."""
    ref, ours, _ = pair
    x, text, pooled, t = inputs(length=5)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    padded = text.clone()
    padded[1, 3:] = 100.0  # garbage in pad positions must not matter
    with torch.no_grad():
        got = ours(x, padded, pooled, t, scale_factor=(1.0, 2.0, 2.0), text_mask=mask)
    for i, n in enumerate((5, 3)):
        expected = run_ref(ref, x[i : i + 1], text[i : i + 1, :n], pooled[i : i + 1], t[i : i + 1])
        assert rel_err(got[i : i + 1], expected) <= 1e-5


def test_padding_does_not_change_valid_outputs(pair):
    _, ours, _ = pair
    x, text, pooled, t = inputs(b=1, length=4)
    with torch.no_grad():
        plain = ours(x, text, pooled, t[:1])
        pad = torch.cat([text, torch.randn(1, 6, text.shape[-1])], dim=1)
        mask = torch.tensor([[True] * 4 + [False] * 6])
        padded = ours(x, pad, pooled, t[:1], text_mask=mask)
        unmasked = ours(x, pad, pooled, t[:1])
    assert torch.allclose(padded, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked, plain, atol=1e-3)  # the mask is what makes the difference


def test_t2i_sixteen_channels_parity():
    cfg = {**TINY, "visual_cond": False}
    ref, ours, _ = make_pair(cfg, seed=3)
    x, text, pooled, t = inputs(b=1, f=1, channels=16)
    expected = run_ref(ref, x, text, pooled, t[:1], scale=(1.0, 1.0, 1.0))
    with torch.no_grad():
        got = ours(x, text, pooled, t[:1])
    assert rel_err(got, expected) <= 1e-5


def _dense_block_mask_nabla(q, k, sta, thr):
    """diffusers' own block map, made effective on CPU: eager flex attention ignores the block structure of a
    BlockMask and only applies mask_mod, so give the same block selection a mask_mod as well."""
    bm = _DIFFUSERS_NABLA(q, k, sta, thr)
    from torch.nn.attention.flex_attention import BlockMask

    n = bm.full_kv_indices.shape[-1]
    slots = torch.arange(n)
    dense = torch.zeros(*bm.full_kv_indices.shape[:-1], n, dtype=torch.bool)
    dense.scatter_(-1, bm.full_kv_indices.long(), slots < bm.full_kv_num_blocks[..., None])
    bs = bm.BLOCK_SIZE[0]

    def mask_mod(b, h, qi, ki):
        return dense[b, h, qi // bs, ki // bs]

    return BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=bs, mask_mod=mask_mod
    )


def test_nabla_parity(monkeypatch):
    cfg = {**TINY, **NABLA}
    ref, ours, _ = make_pair(cfg, seed=5)
    ref.set_attention_backend("flex")
    monkeypatch.setattr(dk, "nablaT_v2", _dense_block_mask_nabla)
    task = get_task_config("k5-lite-t2v-10s-sd")
    # 1x4 tiles per frame: the STA prior (+-1 tile) leaves blocks two and three tiles apart to the block map.
    x, text, pooled, t = inputs(f=2, h=16, w=64)
    sp = build_sparse_params(task, (2, 16, 64), nabla_p=0.5)
    assert not bool(sp.sta_mask.all())
    ref_sparse = {"sta_mask": sp.sta_mask, "to_fractal": True, "P": sp.P}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = run_ref(ref, x, text, pooled, t, sparse=ref_sparse)
    with torch.no_grad():
        got = ours(x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0), sparse_params=sp)
        dense = ours(x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0))
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(dense, expected) > 1e-3  # the sparsity really changed the result


def test_nabla_p1_equals_dense(pair):
    _, ours, _ = pair
    x, text, pooled, t = inputs(b=1, f=2, h=16, w=32)
    sp = build_sparse_params(get_task_config("k5-lite-t2v-10s-sd"), (2, 16, 32), nabla_p=1.0)
    with torch.no_grad():
        sparse = ours(x, text, pooled, t[:1], sparse_params=sp)
        dense = ours(x, text, pooled, t[:1])
    assert rel_err(sparse, dense) <= 1e-5


def test_backward_with_gradient_checkpointing(pair):
    _, ours, sd = pair
    model = DiffusionTransformer3D(**TINY)
    model.load_state_dict(sd)
    x, text, pooled, t = inputs(b=1)
    model(x, text, pooled, t[:1]).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, text, pooled, t[:1]).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


def test_block_swap_split_rule():
    with torch.device("meta"):
        lite = DiffusionTransformer3D(**dit_params_for("k5-lite-t2v-5s-sd"))
        pro = DiffusionTransformer3D(**dit_params_for("k5-pro-t2v-5s-sd"))
    assert lite._split_blocks_to_swap(0) == [0, 0]
    assert lite._split_blocks_to_swap(3) == [0, 3]
    assert lite._split_blocks_to_swap(8) == [1, 7]
    assert lite._split_blocks_to_swap(40) == [1, 30]  # visual capped at 32 - 2
    assert pro._split_blocks_to_swap(20) == [2, 18]
    # training: an offloader swaps at most N - 2 blocks of a list, so Lite keeps both text blocks resident
    assert lite._split_blocks_to_swap(8, training=True) == [0, 8]
    assert pro._split_blocks_to_swap(20, training=True) == [2, 18]


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _write_checkpoint(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def test_load_single_file_and_diffusers_dir(pair, tmp_path):
    ref, _, sd = pair
    task = get_task_config("k5-lite-t2v-5s-sd")
    file = tmp_path / "tiny.safetensors"
    _write_checkpoint(file, {k: v.bfloat16() for k, v in sd.items()})
    model = load_dit(task, file, dtype=torch.bfloat16, params=TINY)
    assert model.text_transformer_blocks[0].self_attention.to_query.weight.dtype == torch.bfloat16
    assert model.out_layer.modulation.out_layer.weight.dtype == torch.float32
    ref.save_pretrained(tmp_path / "pipe" / "transformer")  # pipeline layout: <dir>/transformer/config.json
    model32 = load_dit(task, tmp_path / "pipe", dtype=torch.float32)
    x, text, pooled, t = inputs()
    with torch.no_grad():
        assert rel_err(model32(x, text, pooled, t), run_ref(ref, x, text, pooled, t, scale=(1, 1, 1))) <= 1e-6


def test_load_fp8_scaled(pair, tmp_path):
    _, ours, sd = pair
    file = tmp_path / "tiny.safetensors"
    _write_checkpoint(file, sd)
    model = load_dit(get_task_config("k5-lite-t2v-5s-sd"), file, dtype=torch.float32, fp8_scaled=True, params=TINY)
    q = model.visual_transformer_blocks[0].self_attention.to_query
    assert q.weight.dtype == torch.float8_e4m3fn and hasattr(q, "scale_weight")
    assert model.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    assert model.text_embeddings.in_layer.weight.dtype == torch.float32
    x, text, pooled, t = inputs()
    with torch.no_grad():
        assert rel_err(model(x, text, pooled, t), ours(x, text, pooled, t)) <= 0.1


def test_wrong_checkpoint_for_task_is_user_error(tmp_path):
    t2i = DiffusionTransformer3D(**{**TINY, "visual_cond": False})
    file = tmp_path / "t2i.safetensors"
    _write_checkpoint(file, t2i.state_dict())
    with pytest.raises(UserError) as e:
        load_dit(get_task_config("k5-lite-i2v-5s-sd"), file, params=TINY)
    msg = str(e.value)
    assert "t2i.safetensors" in msg and "k5-lite-i2v-5s-sd" in msg and "visual_embeddings.in_layer.weight" in msg
    more_blocks = DiffusionTransformer3D(**{**TINY, "num_visual_blocks": 3})
    _write_checkpoint(file, more_blocks.state_dict())
    with pytest.raises(UserError, match="3 visual_transformer_blocks"):
        load_dit(get_task_config("k5-lite-t2v-5s-sd"), file, params=TINY)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**TINY, "no_such_field": 1}))
    _write_checkpoint(tmp_path / "bad" / "m.safetensors", more_blocks.state_dict())
    with pytest.raises(UserError, match="config"):
        load_dit(get_task_config("k5-lite-t2v-5s-sd"), tmp_path / "bad")


def test_block_swap_forward_and_backward_match(pair):
    from musubi_tuner.modules.offloading import BlockSwapConfig

    _, _, sd = pair
    cfg = {**TINY, "num_text_blocks": 4, "num_visual_blocks": 4}
    plain = DiffusionTransformer3D(**cfg)
    sd2 = random_state_dict(plain, seed=7)
    plain.load_state_dict(sd2)
    swapped = DiffusionTransformer3D(**cfg)
    swapped.load_state_dict(sd2)
    swapped.enable_block_swap(5, BlockSwapConfig(device="cpu", supports_backward=True, debug=True))
    assert [o is not None for o in swapped.offloaders] == [True, True]  # 5 -> text 1, visual 4 capped at 4 - 2
    swapped.move_to_device_except_swap_blocks("cpu")
    swapped.switch_block_swap_for_training()
    x, text, pooled, t = inputs(b=1)
    expected = plain(x, text, pooled, t[:1])
    got = swapped(x, text, pooled, t[:1])
    assert torch.equal(got, expected)
    got.square().mean().backward()
    expected.square().mean().backward()
    for (n, p), q in zip(swapped.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
