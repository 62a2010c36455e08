"""Attention dispatcher: every available backend against a naive softmax reference, masks, split, flags."""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch

from musubi_tuner.modules import attention as attn_mod
from musubi_tuner.modules.attention import (
    attention,
    attention_mode_from_args,
    available_backends,
    block_mask_to_dense,
    is_backend_available,
    key_mask_block_mask,
)
from musubi_tuner.utils.errors import UserError

BACKENDS = available_backends()


def naive_attention(q, k, v, allowed=None, scale=None):
    """Reference in float64: softmax(q k^T * scale) v over allowed keys; rows without keys give zeros."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    return (probs @ v).transpose(1, 2)


def _qkv(b=3, lq=10, lk=12, h=2, d=8, hk=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, hk or h, d, generator=g)
    v = torch.randn(b, lk, hk or h, d, generator=g)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _key_mask(lengths, lk):
    return torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]


def test_sdpa_and_flex_are_available_on_cpu():
    assert "sdpa" in BACKENDS
    assert "flex" in BACKENDS  # torch >= 2.5 ships flex attention; the NABLA path depends on it


@pytest.mark.parametrize("mode", BACKENDS)
def test_backend_matches_reference_without_mask(mode):
    q, k, v = _qkv(hk=1, h=2)  # also exercises GQA head repetition
    out = attention(q, k, v, mode=mode)
    ref = naive_attention(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", BACKENDS)
@pytest.mark.parametrize("split", [False, True])
def test_backend_key_mask_varying_lengths_with_empty_row(mode, split):
    q, k, v = _qkv(b=4, lk=12)
    lengths = [12, 5, 1, 0]  # full, partial, single key, fully masked (policy: zeros)
    km = _key_mask(lengths, 12)
    out = attention(q, k, v, mode=mode, key_mask=km, split_attn=split, scale=0.3)
    ref = naive_attention(q, k, v, km[:, None, None, :], scale=0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert out[3].abs().max() == 0


@pytest.mark.parametrize("mode", [m for m in BACKENDS if m != "sage"])  # SageAttention is inference-only
def test_key_mask_gradients_are_finite_and_match(mode):
    q, k, v = _qkv(b=3, grad=True)
    km = _key_mask([12, 4, 0], 12)
    out = attention(q, k, v, mode=mode, key_mask=km)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = naive_attention(q2, k2, v2, km[:, None, None, :])
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


def test_sdpa_dense_attn_mask_bool_and_additive_with_fully_masked_row():
    q, k, v = _qkv(b=2, lq=6, lk=7)
    allowed = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.4
    allowed[0, 0, 2] = False  # one query row with nothing to attend to
    out = attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, allowed), atol=2e-5, rtol=1e-4)
    assert out[0, 2].abs().max() == 0
    additive = torch.zeros(2, 1, 6, 7).masked_fill(~allowed, float("-inf"))
    out2 = attention(q, k, v, attn_mask=additive, key_mask=_key_mask([7, 3], 7))
    ref2 = naive_attention(q, k, v, allowed & _key_mask([7, 3], 7)[:, None, None, :])
    torch.testing.assert_close(out2.double(), ref2, atol=2e-5, rtol=1e-4)


def test_split_attn_equals_batched_for_dense_mask():
    q, k, v = _qkv(b=3, lq=5, lk=9)
    allowed = torch.rand(3, 2, 5, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    km = _key_mask([9, 6, 2], 9)
    a = attention(q, k, v, attn_mask=allowed, key_mask=km)
    b = attention(q, k, v, attn_mask=allowed, key_mask=km, split_attn=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _random_block_mask(b, h, lq, lk, bs, seed):
    """A NABLA-style BlockMask: only full blocks, random per head, every query block keeps its diagonal block."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-lq // bs), -(-lk // bs)
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, h, nq, nk, generator=g) > 0.5
    dense[..., torch.arange(min(nq, nk)), torch.arange(min(nq, nk))] = True
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    num = dense.sum(-1, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=bs, mask_mod=None, seq_lengths=(lq, lk))
    token = dense.repeat_interleave(bs, -2)[..., :lq, :].repeat_interleave(bs, -1)[..., :lk]
    return bm, token


def test_flex_block_mask_matches_dense_reference_forward_and_backward():
    b, h, lq, lk, bs = 2, 2, 48, 40, 16
    q, k, v = _qkv(b=b, lq=lq, lk=lk, h=h, seed=5)
    bm, token = _random_block_mask(b, h, lq, lk, bs, seed=7)
    torch.testing.assert_close(block_mask_to_dense(bm, lq, lk), token)
    out = attention(q, k, v, mode="flex", block_mask=bm)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, token), atol=2e-5, rtol=1e-4)
    # with a key mask on top of the block mask, forward and backward
    km = _key_mask([33, 20], lk)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out_km = attention(qg, kg, vg, mode="flex", block_mask=bm, key_mask=km)
    allowed = token & km[:, None, None, :]
    torch.testing.assert_close(out_km.double(), naive_attention(q, k, v, allowed), atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(out_km.sum(), (qg, kg, vg))
    q2, k2, v2 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_grads = torch.autograd.grad(naive_attention(q2, k2, v2, allowed).sum(), (q2, k2, v2))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


def test_key_mask_composed_into_block_mask():
    """The BlockMask used by the compiled flex kernel: full/partial blocks + mask_mod equal block mask AND key mask."""
    b, h, lq, lk, bs = 2, 2, 48, 40, 16
    bm, token = _random_block_mask(b, h, lq, lk, bs, seed=11)
    km = torch.rand(b, lk, generator=torch.Generator().manual_seed(2)) > 0.3
    km[1, 16:32] = False  # a key block without any valid key is dropped
    km[0, :] = True
    km[0, 35] = False  # the last (short) key block becomes partial
    composed = key_mask_block_mask(km, lq, bm)
    torch.testing.assert_close(block_mask_to_dense(composed, lq, lk), token & km[:, None, None, :])
    only_keys = key_mask_block_mask(km, lq, None, block_size=16)
    torch.testing.assert_close(block_mask_to_dense(only_keys, lq, lk), km[:, None, None, :].expand(b, 1, lq, lk))


def test_eager_flex_would_ignore_block_sparsity_so_cpu_uses_dense_mask():
    """Documents why the CPU path never calls eager flex attention with a BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _qkv(b=1, lq=32, lk=32, h=1, seed=9)
    bm, token = _random_block_mask(1, 1, 32, 32, 16, seed=4)
    assert not bool(token.all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=bm).transpose(1, 2)
    dense = naive_attention(q, k, v)
    torch.testing.assert_close(eager.double(), dense, atol=2e-5, rtol=1e-4)  # block structure ignored
    ours = attention(q, k, v, mode="flex", block_mask=bm)
    torch.testing.assert_close(ours.double(), naive_attention(q, k, v, token), atol=2e-5, rtol=1e-4)


def test_missing_backend_names_flag_and_package(monkeypatch):
    missing = [m for m in ("flash", "flash3", "sage", "xformers") if not is_backend_available(m)]
    flags = {"flash": "--flash_attn", "flash3": "--flash3", "sage": "--sage_attn", "xformers": "--xformers"}
    q, k, v = _qkv()
    for mode in missing:
        with pytest.raises(UserError, match=flags[mode]):
            attention(q, k, v, mode=mode)
    # independent of what is installed here: pretend sageattention is missing
    monkeypatch.setattr(attn_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"--sage_attn.*sageattention"):
        attention(q, k, v, mode="sage")


def _args(**flags):
    ns = argparse.Namespace(sdpa=False, flash_attn=False, flash3=False, sage_attn=False, xformers=False)
    for key, val in flags.items():
        setattr(ns, key, val)
    return ns


def test_attention_mode_from_args():
    assert attention_mode_from_args(_args()) == "sdpa"
    assert attention_mode_from_args(_args(sdpa=True)) == "sdpa"
    assert attention_mode_from_args(argparse.Namespace()) == "sdpa"
    with pytest.raises(UserError, match="--sdpa, --xformers"):
        attention_mode_from_args(_args(sdpa=True, xformers=True))
    with pytest.raises(UserError, match="--sage_attn"):
        attention_mode_from_args(_args(sage_attn=True), training=True)
    for dest, mode in (("flash_attn", "flash"), ("flash3", "flash3"), ("sage_attn", "sage"), ("xformers", "xformers")):
        if is_backend_available(mode):
            assert attention_mode_from_args(_args(**{dest: True})) == mode
        else:
            with pytest.raises(UserError, match="--" + dest):
                attention_mode_from_args(_args(**{dest: True}))


def test_aliases_and_bad_inputs():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, mode="torch"), attention(q, k, v))
    with pytest.raises(ValueError, match="unknown attention mode"):
        attention(q, k, v, mode="bogus")
    with pytest.raises(ValueError, match="key_mask shape"):
        attention(q, k, v, key_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask requires"):
        attention(q, k, v, block_mask=object())
