"""One attention entry point for every DiT, dispatching to SDPA, FlashAttention 2/3, SageAttention, xformers or
flex attention.

Layout everywhere: ``q, k, v`` are ``(B, L, H, D)`` and the result is ``(B, Lq, Hq, D)``. Masks follow one rule:
``key_mask`` ``(B, Lk)`` bool, True = attend; every query row attends to the valid keys of its batch item.

Fully-masked rows policy: a query row with no key to attend to (a batch item whose ``key_mask`` is all False, or an
``attn_mask`` row that is all False) produces **zeros** on every backend, never NaN, and its gradient is zero.

GQA: when K/V have fewer heads than Q (``Hq % Hk == 0``) the K/V heads are repeated (``repeat_interleave``) for
every backend except FlashAttention, which handles GQA natively (``enable_gqa`` can fall back to the math kernel).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

MODES = ("sdpa", "flash", "flash3", "sage", "xformers", "flex")

# Aliases used by the reference command lines / AttentionParams ("torch" for SDPA, "sageattn" for SageAttention).
_ALIASES = {"torch": "sdpa", "sageattn": "sage", "flash2": "flash", "flash_attn": "flash"}

# mode -> (CLI flag, pip package, importable module)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "flash": ("--flash_attn", "flash-attn", "flash_attn"),
    "flash3": ("--flash3", "flash-attn 3 (hopper build, module flash_attn_interface)", "flash_attn_interface"),
    "sage": ("--sage_attn", "sageattention", "sageattention"),
    "xformers": ("--xformers", "xformers", "xformers"),
}

# argparse dest -> mode, in the order the flags are listed in --help.
_FLAG_TO_MODE = {"sdpa": "sdpa", "flash_attn": "flash", "flash3": "flash3", "sage_attn": "sage", "xformers": "xformers"}


def normalize_mode(mode: str) -> str:
    """Return the canonical mode name for ``mode`` (accepts the reference aliases ``torch`` and ``sageattn``)."""
    m = _ALIASES.get(mode, mode)
    if m not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(MODES)}")
    return m


def _flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def is_backend_available(mode: str) -> bool:
    """True when the backend of ``mode`` can be imported in this environment."""
    m = normalize_mode(mode)
    if m == "sdpa":
        return True
    if m == "flex":
        return _flex_available()
    return importlib.util.find_spec(_BACKENDS[m][2]) is not None


def available_backends() -> list[str]:
    """The attention modes usable in this environment (``sdpa`` always)."""
    return [m for m in MODES if is_backend_available(m)]


def _import_backend(mode: str) -> Any:
    if not is_backend_available(mode):
        if mode == "flex":
            raise UserError(f"flex attention needs torch >= 2.5 (found torch {torch.__version__})")
        flag, package, _ = _BACKENDS[mode]
        raise UserError(f"{flag} was given but the package {package!r} is not installed; install it or use --sdpa")
    if mode == "flex":
        return importlib.import_module("torch.nn.attention.flex_attention")
    return importlib.import_module(_BACKENDS[mode][2])


def attention_mode_from_args(args: Any, *, training: bool = False) -> str:
    """Map ``--sdpa/--flash_attn/--flash3/--sage_attn/--xformers`` to a mode name.

    No flag means ``sdpa``. More than one flag, or ``--sage_attn`` for training (SageAttention has no backward pass),
    is a ``UserError``. A named backend that is not installed is also reported here, before any model is loaded.
    """
    chosen = [(dest, mode) for dest, mode in _FLAG_TO_MODE.items() if getattr(args, dest, False)]
    if len(chosen) > 1:
        flags = ", ".join("--" + dest for dest, _ in chosen)
        raise UserError(f"choose one attention backend, got {flags}")
    mode = chosen[0][1] if chosen else "sdpa"
    if training and mode == "sage":
        raise UserError("--sage_attn is for inference only (SageAttention has no backward pass); use --sdpa or --flash_attn")
    if mode != "sdpa":
        _import_backend(mode)
    return mode


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat K/V heads (dim 2 of (B, L, H, D)) to match Q for GQA."""
    hq, hk = q.shape[2], k.shape[2]
    if hq == hk:
        return k, v
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    r = hq // hk
    return k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, L, H, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool (True = attend), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_mask shape {tuple(key_mask.shape)} does not match keys (B={k.shape[0]}, Lk={k.shape[1]})")


def _to_half(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float16, torch.bfloat16) else t.to(torch.bfloat16)


def _zero_empty_items(out: Tensor, key_mask: Tensor | None) -> Tensor:
    """Apply the fully-masked policy to batch items without any valid key."""
    if key_mask is None:
        return out
    has_key = key_mask.any(dim=1)
    if bool(has_key.all()):
        return out
    return out * has_key.view(-1, 1, 1, 1).to(out.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SDPA


def _combine_masks(attn_mask: Tensor | None, key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Combine a dense ``attn_mask`` (bool or additive, broadcastable to (B, H, Lq, Lk)) with a key mask."""
    if key_mask is None:
        return attn_mask
    km = key_mask[:, None, None, :]
    if attn_mask is None:
        return km
    if attn_mask.dtype == torch.bool:
        return attn_mask & km
    return attn_mask.to(dtype).masked_fill(~km, float("-inf"))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    k, v = _repeat_kv(q, k, v)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    # Rows without any allowed key would be NaN: let them attend everywhere, then zero them (documented policy).
    allowed = mask if mask.dtype == torch.bool else torch.isfinite(mask)
    row_ok = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, Lq|1, 1)
    if not bool(row_ok.all()):
        mask = mask | ~row_ok if mask.dtype == torch.bool else mask.masked_fill(~row_ok, 0.0)
    else:
        row_ok = None
    if mask.dtype != torch.bool:
        mask = mask.to(qt.dtype)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    if row_ok is not None:
        out = out * row_ok.to(out.dtype)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# FlashAttention 2 / 3


def _cu_seqlens(lengths: Tensor) -> Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _flash(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float | None, mode: str) -> Tensor:
    lib = _import_backend(mode)
    dtype = q.dtype
    q, k, v = _to_half(q), _to_half(k), _to_half(v)
    if key_mask is None:
        out = lib.flash_attn_func(q, k, v, softmax_scale=scale)
    else:
        # varlen: every query is kept, keys are unpadded with the mask.
        b, lq, h, d = q.shape
        lengths = key_mask.sum(dim=1, dtype=torch.int32)
        q_unpad = q.reshape(b * lq, h, d)
        k_unpad, v_unpad = k[key_mask], v[key_mask]
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        cu_k = _cu_seqlens(lengths).to(q.device)
        out = lib.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, lq, int(lengths.max().item()), softmax_scale=scale)
        if isinstance(out, tuple):
            out = out[0]
        out = _zero_empty_items(out.reshape(b, lq, h, d), key_mask)
    if isinstance(out, tuple):  # flash_attn_interface returns (out, lse) in some releases
        out = out[0]
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# SageAttention / xformers


def _sage(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float | None) -> Tensor:
    lib = _import_backend("sage")
    if key_mask is not None:  # no mask support in the kernel: per-item key trimming gives the same result
        return _split(q, k, v, key_mask, None, scale, lambda qq, kk, vv, s: _sage(qq, kk, vv, None, s))
    dtype = q.dtype
    k, v = _repeat_kv(q, k, v)
    q, k, v = _to_half(q), _to_half(k), _to_half(v)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return lib.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=sm_scale).to(dtype)


def _xformers(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float | None) -> Tensor:
    _import_backend("xformers")
    xops = importlib.import_module("xformers.ops")
    k, v = _repeat_kv(q, k, v)
    if key_mask is None:
        return xops.memory_efficient_attention(q, k, v, scale=scale)
    # Pack the batch into one sequence with a block-diagonal bias: item b's queries see only its valid keys.
    attn_bias_mod = importlib.import_module("xformers.ops.fmha.attn_bias")
    b, lq, h, d = q.shape
    lengths = key_mask.sum(dim=1).tolist()
    if min(lengths) == 0:  # the kernel cannot express an empty key block: run those items separately (zeros)
        return _split(q, k, v, key_mask, None, scale, lambda qq, kk, vv, s: _xformers(qq, kk, vv, None, s))
    bias = attn_bias_mod.BlockDiagonalMask.from_seqlens(q_seqlen=[lq] * b, kv_seqlen=lengths)
    out = xops.memory_efficient_attention(
        q.reshape(1, b * lq, h, d), k[key_mask].unsqueeze(0), v[key_mask].unsqueeze(0), attn_bias=bias, scale=scale
    )
    return out.reshape(b, lq, h, d)


# ----------------------------------------------------------------------------------------------------------------
# flex attention

_compiled_flex: Callable[..., Tensor] | None = None


def _flex_fn() -> Callable[..., Tensor]:
    """Compiled flex attention for accelerators (eager flex ignores the block sparsity and materialises scores)."""
    global _compiled_flex
    if _compiled_flex is None:
        fa = _import_backend("flex")
        _compiled_flex = torch.compile(fa.flex_attention, dynamic=True)
    return _compiled_flex


def _ordered_to_dense(num_blocks: Tensor, indices: Tensor, n_kv: int) -> Tensor:
    """(…, nq) counts + (…, nq, n) indices -> dense (…, nq, n_kv) bool block matrix."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < num_blocks.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], n_kv + 1, dtype=torch.bool, device=indices.device)
    # Invalid slots scatter into a spill column that is dropped afterwards.
    idx = torch.where(valid, indices.long(), torch.full_like(indices.long(), n_kv))
    dense.scatter_(-1, idx, True)
    return dense[..., :n_kv]


def _block_dense(block_mask: Any) -> tuple[Tensor, Tensor]:
    """(partial, full) dense block matrices of shape (B, H, nq, nk) of a ``BlockMask``."""
    nk = block_mask.kv_indices.shape[-1]
    partial = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
    if block_mask.full_kv_num_blocks is None:
        full = torch.zeros_like(partial)
    else:
        full = _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk)
    return partial, full


def _dense_to_block_mask(fa: Any, partial: Tensor, full: Tensor, block_size: tuple[int, int], mask_mod, lengths) -> Any:
    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        num = dense.sum(dim=-1, dtype=torch.int32)
        idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return fa.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=lengths
    )


def key_mask_block_mask(key_mask: Tensor, q_len: int, block_mask: Any = None, block_size: int = 128) -> Any:
    """A ``BlockMask`` that applies ``key_mask`` (B, Lk), composed with ``block_mask`` when given.

    Key blocks whose keys are all valid stay *full*, mixed blocks become *partial* with
    ``mask_mod = original_mask_mod & key_mask[b, kv]``, blocks without a valid key are dropped.
    """
    fa = _import_backend("flex")
    b, lk = key_mask.shape
    if block_mask is None:
        bs_q = bs_kv = block_size
        nq, nk = -(-q_len // bs_q), -(-lk // bs_kv)
        partial = torch.zeros(b, 1, nq, nk, dtype=torch.bool, device=key_mask.device)
        full = torch.ones_like(partial)
        orig_mod = None
    else:
        bs_q, bs_kv = block_mask.BLOCK_SIZE
        partial, full = _block_dense(block_mask)
        nk = partial.shape[-1]
        orig_mod = block_mask.mask_mod
        if partial.shape[0] != b:
            partial, full = partial.expand(b, *partial.shape[1:]), full.expand(b, *full.shape[1:])
    padded = F.pad(key_mask, (0, nk * bs_kv - lk), value=False).view(b, nk, bs_kv)
    kb_any = padded.any(-1)[:, None, None, :]
    # A key block that runs past Lk is "all valid" when all of its in-range keys are.
    in_range = (torch.arange(nk * bs_kv, device=key_mask.device) < lk).view(nk, bs_kv)
    kb_all = (padded | ~in_range).all(-1)[:, None, None, :]
    new_full = full & kb_all
    new_partial = (partial & kb_any) | (full & kb_any & ~kb_all)

    def mask_mod(bi, hi, qi, ki):
        allowed = key_mask[bi, ki]
        if orig_mod is not None:
            allowed = allowed & orig_mod(bi, hi, qi, ki)
        return allowed

    return _dense_to_block_mask(fa, new_partial, new_full, (bs_q, bs_kv), mask_mod, (q_len, lk))


def block_mask_to_dense(block_mask: Any, q_len: int, kv_len: int) -> Tensor:
    """Token-level bool mask (B, H, Lq, Lk) equivalent to a ``BlockMask`` (full blocks | partial blocks & mask_mod)."""
    fa = _import_backend("flex")
    bs_q, bs_kv = block_mask.BLOCK_SIZE
    partial, full = _block_dense(block_mask)

    def expand(dense: Tensor) -> Tensor:
        return dense.repeat_interleave(bs_q, dim=-2)[..., :q_len, :].repeat_interleave(bs_kv, dim=-1)[..., :kv_len]

    out = expand(full)
    if bool(partial.any()):
        mod = block_mask.mask_mod
        b, h = partial.shape[0], partial.shape[1]
        token = fa.create_mask(mod, b, h, q_len, kv_len, device=partial.device) if mod is not None else True
        out = out | (expand(partial) & token)
    return out


def _flex(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, attn_mask: Tensor | None, block_mask: Any, scale: float | None
) -> Tensor:
    _import_backend("flex")
    k, v = _repeat_kv(q, k, v)
    lq, lk = q.shape[1], k.shape[1]
    if q.device.type == "cpu":
        # Eager flex attention (the only kind on CPU) applies mask_mod densely and ignores the block structure, so
        # a NABLA BlockMask would silently become dense attention; it also has no CPU backward. Use the exact
        # token-level mask with SDPA instead (the eager kernel materialises the scores anyway).
        mask = block_mask_to_dense(block_mask, lq, lk) if block_mask is not None else None
        if key_mask is not None:
            mask = key_mask[:, None, None, :] if mask is None else mask & key_mask[:, None, None, :]
        if attn_mask is not None:
            if mask is None:
                mask = attn_mask
            elif attn_mask.dtype == torch.bool:
                mask = attn_mask & mask
            else:
                mask = torch.where(mask, attn_mask.to(q.dtype), float("-inf"))
        return _sdpa(q, k, v, mask, scale)
    if key_mask is not None:
        block_mask = key_mask_block_mask(key_mask, lq, block_mask)
    score_mod = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            dense = attn_mask.expand(q.shape[0], q.shape[2], lq, lk)

            def score_mod(s, bi, hi, qi, ki):
                return torch.where(dense[bi, hi, qi, ki], s, float("-inf"))
        else:
            bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[2], lq, lk)

            def score_mod(s, bi, hi, qi, ki):
                return s + bias[bi, hi, qi, ki]

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = _flex_fn()(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# dispatcher


def _split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    scale: float | None,
    run: Callable[[Tensor, Tensor, Tensor, float | None], Tensor] | None = None,
    mode: str = "sdpa",
) -> Tensor:
    """Attention one batch item at a time, keys trimmed to the item's valid keys (lower peak memory)."""
    outs = []
    for i in range(q.shape[0]):
        qi, ki, vi = q[i : i + 1], k[i : i + 1], v[i : i + 1]
        ami = None
        if attn_mask is not None:
            ami = attn_mask[i : i + 1] if attn_mask.ndim == 4 and attn_mask.shape[0] > 1 else attn_mask
        if key_mask is not None:
            sel = key_mask[i]
            if not bool(sel.any()):
                outs.append(torch.zeros_like(qi))
                continue
            if not bool(sel.all()):
                ki, vi = ki[:, sel], vi[:, sel]
                if ami is not None:
                    ami = ami[..., sel]
        if run is not None:
            outs.append(run(qi, ki, vi, scale))
        else:
            outs.append(_dispatch(qi, ki, vi, mode, None, ami, None, scale))
    return torch.cat(outs, dim=0)


def _dispatch(
    q: Tensor, k: Tensor, v: Tensor, mode: str, key_mask: Tensor | None, attn_mask: Tensor | None, block_mask: Any, scale
) -> Tensor:
    if attn_mask is not None and mode not in ("sdpa", "flex"):
        raise UserError(f"{_BACKENDS[mode][0]} does not support dense attention masks; use --sdpa")
    if mode == "sdpa":
        return _sdpa(q, k, v, _combine_masks(attn_mask, key_mask, q.dtype), scale)
    if mode == "flex":
        return _flex(q, k, v, key_mask, attn_mask, block_mask, scale)
    if mode in ("flash", "flash3"):
        return _flash(q, k, v, key_mask, scale, mode)
    if mode == "sage":
        return _sage(q, k, v, key_mask, scale)
    return _xformers(q, k, v, key_mask, scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str = "sdpa",
    key_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    block_mask: Any = None,
    scale: float | None = None,
    split_attn: bool = False,
) -> Tensor:
    """Scaled dot-product attention over ``(B, L, H, D)`` tensors; returns ``(B, Lq, Hq, D)``.

    Args:
        mode: ``sdpa | flash | flash3 | sage | xformers | flex`` (aliases ``torch``, ``sageattn``).
        key_mask: ``(B, Lk)`` bool, True = attend (text padding). Supported by every backend.
        attn_mask: dense mask broadcastable to ``(B, H, Lq, Lk)``, bool (True = attend) or additive float;
            ``sdpa`` and ``flex`` only.
        block_mask: a flex-attention ``BlockMask`` (``mode="flex"`` only), e.g. NABLA's sparse block map.
        scale: softmax scale, default ``1/sqrt(D)``.
        split_attn: run one batch item at a time with its keys trimmed to the valid ones (lower peak memory).
            Ignored with a ``block_mask`` (flex never materialises the score matrix when compiled).
    """
    mode = normalize_mode(mode)
    _check_inputs(q, k, v, key_mask)
    if block_mask is not None and mode != "flex":
        raise ValueError(f"block_mask requires mode='flex', got {mode!r}")
    if mode != "sdpa":
        _import_backend(mode)
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None  # nothing is padded: use the dense kernels
    if split_attn and block_mask is None and q.shape[0] > 1:
        return _split(q, k, v, key_mask, attn_mask, scale, mode=mode)
    return _dispatch(q, k, v, mode, key_mask, attn_mask, block_mask, scale)
