"""Kandinsky 5 diffusion transformer (``DiffusionTransformer3D``), batched, with text key masks and NABLA attention.

Module paths equal the official / diffusers checkpoint keys (specs/kandinsky5.md §4), so an official single-file
state dict loads with ``strict=True``. The math follows §3 including the precision rules of §3.8: time embedding,
modulation Linears, LayerNorm+modulate, gated residuals, q/k RMSNorm and RoPE run in float32, and rotated q/k are
rounded to bfloat16 (both reference implementations do this, even in an fp32 model).

Tensors are channels-last: ``x (B, F, H, W, C_in)`` → velocity ``(B, F, H, W, C_out)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.kandinsky5.models.nabla import NablaParams, fractal_flatten, fractal_unflatten, nabla_block_mask
from musubi_tuner.modules.attention import attention
from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin
from musubi_tuner.modules.offloading import BlockSwapMixin
from musubi_tuner.utils.errors import UserError

MAX_PERIOD = 10000.0
MAX_ROPE_POS = 128  # official visual RoPE table size per axis
# Modules kept in float32 when the rest of the model is bf16/fp16 (key substrings; diffusers' _keep_in_fp32_modules).
FP32_MODULES: tuple[str, ...] = ("time_embeddings", "modulation")
_HALF_OR_FULL = (torch.float32, torch.bfloat16, torch.float16)


def _freqs(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``exp(-ln(10000)·j/n)`` for j < n, float32."""
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(n, dtype=torch.float32, device=device) / n)


def _input_dtype(linear: nn.Linear) -> torch.dtype:
    """Dtype to feed a Linear: its weight dtype, or float32 for fp8-stored weights (the fp8 forward dequantises)."""
    dt = linear.weight.dtype
    return dt if dt in _HALF_OR_FULL else torch.float32


def _modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x)·(1 + scale) + shift`` in float32, returned in x's dtype."""
    return (norm(x.float()) * (scale.float() + 1.0) + shift.float()).type_as(x)


def _gated_add(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x + gate·out`` in float32, returned in x's dtype."""
    return (x.float() + gate.float() * out.float()).type_as(x)


def _rms_norm_fp32(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm computed in float32 (weight upcast too), returned in x's dtype."""
    weight = norm.weight.float() if norm.weight is not None else None
    return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(2j, 2j+1)`` of ``x (B, L, heads, d)`` by angles with cos/sin ``(*, L, 1, d/2)``.

    Computed in float32; the result is rounded to bfloat16 and returned in x's dtype (reference behaviour, §3.3).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
    return out.to(torch.bfloat16).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings


class TimeEmbeddings(nn.Module):
    """Sinusoidal embedding of width ``model_dim`` ([cos | sin]) → Linear → SiLU → Linear (float32 island)."""

    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        if model_dim % 2:
            raise ValueError(f"model_dim must be even, got {model_dim}")
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        args = time.float()[:, None] * _freqs(self.model_dim // 2, time.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        h = self.activation(self.in_layer(emb.to(_input_dtype(self.in_layer))))
        return self.out_layer(h.to(_input_dtype(self.out_layer))).float()


class TextEmbeddings(nn.Module):
    """Linear → affine LayerNorm (used for the Qwen token sequence and for the pooled CLIP vector)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_layer(x)
        return self.norm(h).type_as(h)


class VisualEmbeddings(nn.Module):
    """Patchify ``(B, F, H, W, C)`` → ``(B, T', H', W', D)``; per-token vector order (pt, ph, pw, C), channel fastest."""

    def __init__(self, in_dim: int, model_dim: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = nn.Linear(math.prod(self.patch_size) * in_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(4, 7)
        return self.in_layer(x)


class Modulation(nn.Module):
    """``Linear(SiLU(time_embed))`` producing ``num_params·model_dim`` values (float32; zero-initialised)."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:
        h = self.activation(time_embed.float())
        return self.out_layer(h.to(_input_dtype(self.out_layer))).float()


# ----------------------------------------------------------------------------------------------------------------------
# Attention, feed-forward, blocks


class MultiheadSelfAttention(nn.Module):
    """q/k/v projections, per-head q/k RMSNorm (float32), optional RoPE, attention, output projection.

    Used for text self-attention, visual self-attention (dense or NABLA) and, with ``context``, cross-attention.
    """

    def __init__(self, model_dim: int, head_dim: int):
        super().__init__()
        if model_dim % head_dim:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head_dim {head_dim}")
        self.num_heads = model_dim // head_dim
        self.to_query = nn.Linear(model_dim, model_dim)
        self.to_key = nn.Linear(model_dim, model_dim)
        self.to_value = nn.Linear(model_dim, model_dim)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(model_dim, model_dim)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
        nabla: NablaParams | None = None,
        attn_mode: str = "sdpa",
    ) -> torch.Tensor:
        src = x if context is None else context
        q = self.to_query(x).unflatten(-1, (self.num_heads, -1))
        k = self.to_key(src).unflatten(-1, (self.num_heads, -1))
        v = self.to_value(src).unflatten(-1, (self.num_heads, -1))
        q = _rms_norm_fp32(self.query_norm, q)
        k = _rms_norm_fp32(self.key_norm, k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if nabla is not None:
            out = attention(q, k, v, mode="flex", block_mask=nabla_block_mask(q, k, nabla))
        else:
            out = attention(q, k, v, mode=attn_mode, key_mask=key_mask)
        return self.out_layer(out.flatten(-2))


class FeedForward(nn.Module):
    """Linear (no bias) → exact GELU → Linear (no bias)."""

    def __init__(self, model_dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim, bias=False)
        self.activation = nn.GELU()
        self.out_layer = nn.Linear(ff_dim, model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.activation(self.in_layer(x)))


class TransformerEncoderBlock(nn.Module):
    """Text block: modulated self-attention (1D RoPE, key mask) and feed-forward with gated residuals."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = MultiheadSelfAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(
        self,
        x: torch.Tensor,
        time_embed: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
        attn_mode: str = "sdpa",
    ) -> torch.Tensor:
        attn_p, ff_p = self.text_modulation(time_embed).unsqueeze(1).chunk(2, dim=-1)
        shift, scale, gate = attn_p.chunk(3, dim=-1)
        h = _modulate(self.self_attention_norm, x, shift, scale)
        x = _gated_add(x, gate, self.self_attention(h, rope=rope, key_mask=key_mask, attn_mode=attn_mode))
        shift, scale, gate = ff_p.chunk(3, dim=-1)
        h = _modulate(self.feed_forward_norm, x, shift, scale)
        return _gated_add(x, gate, self.feed_forward(h))


class TransformerDecoderBlock(nn.Module):
    """Visual block: self-attention (3D RoPE, dense or NABLA), cross-attention to text, feed-forward."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = MultiheadSelfAttention(model_dim, head_dim)
        self.cross_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.cross_attention = MultiheadSelfAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        time_embed: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_mask: torch.Tensor | None = None,
        nabla: NablaParams | None = None,
        attn_mode: str = "sdpa",
    ) -> torch.Tensor:
        self_p, cross_p, ff_p = self.visual_modulation(time_embed).unsqueeze(1).chunk(3, dim=-1)
        shift, scale, gate = self_p.chunk(3, dim=-1)
        h = _modulate(self.self_attention_norm, x, shift, scale)
        x = _gated_add(x, gate, self.self_attention(h, rope=rope, nabla=nabla, attn_mode=attn_mode))
        shift, scale, gate = cross_p.chunk(3, dim=-1)
        h = _modulate(self.cross_attention_norm, x, shift, scale)
        x = _gated_add(x, gate, self.cross_attention(h, context=text, key_mask=text_mask, attn_mode=attn_mode))
        shift, scale, gate = ff_p.chunk(3, dim=-1)
        h = _modulate(self.feed_forward_norm, x, shift, scale)
        return _gated_add(x, gate, self.feed_forward(h))


class OutLayer(nn.Module):
    """Modulated LayerNorm (shift, scale) → Linear → unpatchify; the output vector is read channel-slowest."""

    def __init__(self, model_dim: int, time_dim: int, out_dim: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.out_layer = nn.Linear(model_dim, math.prod(self.patch_size) * out_dim)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(time_embed)[:, None, None, None].chunk(2, dim=-1)
        x = self.out_layer(_modulate(self.norm, x, shift, scale))
        b, t, h, w, _ = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, t, h, w, -1, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t * pt, h * ph, w * pw, -1)


# ----------------------------------------------------------------------------------------------------------------------
# RoPE tables


def text_rope(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(1, L, 1, d/2)`` for positions ``0..L-1``."""
    args = torch.arange(length, dtype=torch.float32, device=device)[:, None] * _freqs(head_dim // 2, device)[None]
    return torch.cos(args)[None, :, None], torch.sin(args)[None, :, None]


def visual_rope_grid(
    grid: tuple[int, int, int], axes_dims: Sequence[int], scale_factor: Sequence[float], device: torch.device
) -> torch.Tensor:
    """Angles ``(T', H', W', d/2)``: per token ``[t-angles | h-angles | w-angles]``, each axis divided by its scale."""
    parts = []
    for axis, (n, dim, sf) in enumerate(zip(grid, axes_dims, scale_factor)):
        a = torch.arange(n, dtype=torch.float32, device=device)[:, None] * _freqs(dim // 2, device)[None] / sf
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        parts.append(a.view(shape).expand(*grid, dim // 2))
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Model


class DiffusionTransformer3D(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """Kandinsky 5 DiT; constructor arguments are the official / diffusers config fields (specs/kandinsky5.md §4)."""

    def __init__(
        self,
        in_visual_dim: int = 16,
        in_text_dim: int = 3584,
        in_text_dim2: int = 768,
        time_dim: int = 512,
        out_visual_dim: int = 16,
        patch_size: Sequence[int] = (1, 2, 2),
        model_dim: int = 1792,
        ff_dim: int = 7168,
        num_text_blocks: int = 2,
        num_visual_blocks: int = 32,
        axes_dims: Sequence[int] = (16, 24, 24),
        visual_cond: bool = False,
        attention_type: str = "regular",
        attention_causal: bool | None = None,
        attention_local: bool | None = None,
        attention_glob: bool | None = None,
        attention_window: int | None = None,
        attention_P: float | None = None,
        attention_wT: int | None = None,
        attention_wW: int | None = None,
        attention_wH: int | None = None,
        attention_add_sta: bool | None = None,
        attention_method: str | None = None,
        instruct_type: str | None = None,
        attn_mode: str = "sdpa",
    ):
        # attention_causal/local/glob/window exist in the official/diffusers configs but no released model uses them;
        # the NABLA fields are recorded in ``config`` and applied per call through ``sparse_params``.
        super().__init__()
        if any(a % 2 for a in axes_dims):
            raise ValueError(f"axes_dims must be even, got {tuple(axes_dims)}")
        if attention_type not in ("regular", "flash", "nabla"):
            raise ValueError(f"unknown attention_type {attention_type!r}")
        self.config = {
            "in_visual_dim": in_visual_dim,
            "in_text_dim": in_text_dim,
            "in_text_dim2": in_text_dim2,
            "time_dim": time_dim,
            "out_visual_dim": out_visual_dim,
            "patch_size": tuple(patch_size),
            "model_dim": model_dim,
            "ff_dim": ff_dim,
            "num_text_blocks": num_text_blocks,
            "num_visual_blocks": num_visual_blocks,
            "axes_dims": tuple(axes_dims),
            "visual_cond": visual_cond,
            "attention_type": attention_type,
            "attention_P": attention_P,
            "attention_wT": attention_wT,
            "attention_wW": attention_wW,
            "attention_wH": attention_wH,
            "attention_add_sta": attention_add_sta,
            "attention_method": attention_method,
        }
        self.patch_size = tuple(patch_size)
        self.axes_dims = tuple(axes_dims)
        self.head_dim = sum(axes_dims)
        self.model_dim = model_dim
        self.num_text_blocks = num_text_blocks
        self.num_visual_blocks = num_visual_blocks
        self.attn_mode = attn_mode
        # Official instruct_type "channel" (Image Lite I2I) widens the input exactly like visual_cond.
        self.in_channels = 2 * in_visual_dim + 1 if (visual_cond or instruct_type == "channel") else in_visual_dim

        self.time_embeddings = TimeEmbeddings(model_dim, time_dim)
        self.text_embeddings = TextEmbeddings(in_text_dim, model_dim)
        self.pooled_text_embeddings = TextEmbeddings(in_text_dim2, time_dim)
        self.visual_embeddings = VisualEmbeddings(self.in_channels, model_dim, self.patch_size)
        self.text_transformer_blocks = nn.ModuleList(
            TransformerEncoderBlock(model_dim, time_dim, ff_dim, self.head_dim) for _ in range(num_text_blocks)
        )
        self.visual_transformer_blocks = nn.ModuleList(
            TransformerDecoderBlock(model_dim, time_dim, ff_dim, self.head_dim) for _ in range(num_visual_blocks)
        )
        self.out_layer = OutLayer(model_dim, time_dim, out_visual_dim, self.patch_size)

    # -- block swap contract ---------------------------------------------------------------------------------------

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.text_transformer_blocks, self.visual_transformer_blocks]

    def _split_blocks_to_swap(self, n: int, training: bool = False) -> list[int]:
        """musubi split (training.md §15.1): a quarter (at most half the text blocks) from text, the rest visual.

        In training an offloader can swap at most N - 2 blocks of a list, so the text share is also capped at
        ``num_text_blocks - 2`` (Lite's two text blocks then stay resident; Pro swaps up to two of four).
        """
        if n <= 0:
            return [0, 0]
        text = max(0, min(self.num_text_blocks // 2, n // 4))
        if training:
            text = min(text, max(0, self.num_text_blocks - 2))
        visual = min(max(1, n - text), self.num_visual_blocks - 2)
        return [text, visual]

    # -- dtype helpers ---------------------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the dtype of the (never quantised) affine LayerNorm of the text embedding."""
        return self.text_embeddings.norm.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> DiffusionTransformer3D:
        """Cast floating parameters to ``dtype`` except the float32 islands (``FP32_MODULES``); use instead of ``.to``."""
        for name, p in self.named_parameters():
            if p.is_floating_point() and p.dtype in _HALF_OR_FULL:
                target = torch.float32 if any(s in name for s in FP32_MODULES) else dtype
                p.data = p.data.to(target)
        return self

    # -- forward ---------------------------------------------------------------------------------------------------

    def _check_inputs(
        self, x: torch.Tensor, text_embed: torch.Tensor, pooled: torch.Tensor, time: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        if x.dim() != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be (B, F, H, W, {self.in_channels}) channels-last, got {tuple(x.shape)}")
        b, f, h, w, _ = x.shape
        pt, ph, pw = self.patch_size
        if f % pt or h % ph or w % pw:
            raise UserError(f"latent size {f}x{h}x{w} (F x H x W) is not divisible by the patch size {self.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        if max(grid) > MAX_ROPE_POS:
            raise UserError(
                f"latent size {f}x{h}x{w} gives a token grid {grid}; Kandinsky 5 RoPE supports at most {MAX_ROPE_POS} "
                f"positions per axis (<= {MAX_ROPE_POS} latent frames, <= {MAX_ROPE_POS * ph * 8} px per side)"
            )
        if text_embed.dim() != 3 or text_embed.shape[0] != b:
            raise ValueError(f"text_embed must be (B={b}, L, D), got {tuple(text_embed.shape)}")
        if pooled.shape[0] != b:
            raise ValueError(f"pooled_text_embed must be (B={b}, D), got {tuple(pooled.shape)}")
        if time.shape[0] != b:
            raise ValueError(f"time must be (B={b},), got {tuple(time.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_embed.shape[:2]):
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} does not match text_embed {tuple(text_embed.shape[:2])}")
        return grid

    def forward(
        self,
        x: torch.Tensor,
        text_embed: torch.Tensor,
        pooled_text_embed: torch.Tensor,
        time: torch.Tensor,
        scale_factor: Sequence[float] = (1.0, 1.0, 1.0),
        sparse_params: NablaParams | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: ``(B, F, H, W, C_in)`` noisy latent (plus condition and mask channels for 33-channel models).
            text_embed: ``(B, L, in_text_dim)`` Qwen hidden states, right-padded when prompts differ in length.
            pooled_text_embed: ``(B, in_text_dim2)`` CLIP pooled vector.
            time: ``(B,)`` timesteps on the 0..1000 scale (or a scalar / ``(1,)`` for the whole batch).
            scale_factor: RoPE position-interpolation divisors ``(t, h, w)`` of the task.
            sparse_params: NABLA parameters for this grid (``build_sparse_params``) or ``None`` for dense attention.
            text_mask: ``(B, L)`` bool, True for real tokens; pad tokens are masked as keys everywhere.

        Returns:
            ``(B, F, H, W, out_visual_dim)`` velocity in the compute dtype.
        """
        b = x.shape[0]
        time = torch.as_tensor(time, device=x.device).reshape(-1)
        if time.numel() == 1 and b > 1:
            time = time.expand(b)
        grid = self._check_inputs(x, text_embed, pooled_text_embed, time, text_mask)
        if sparse_params is not None and tuple(sparse_params.grid) != grid:
            raise ValueError(f"sparse_params were built for token grid {sparse_params.grid}, the input has {grid}")
        if text_mask is not None:
            text_mask = text_mask.to(device=x.device, dtype=torch.bool)
            if bool(text_mask.all()):
                text_mask = None  # nothing to mask: keep kernels that cannot take masks usable
        dtype = self.compute_dtype
        device = x.device

        text = self.text_embeddings(text_embed.to(device=device, dtype=dtype))
        time_embed = self.time_embeddings(time) + self.pooled_text_embeddings(pooled_text_embed.to(device=device, dtype=dtype))
        visual = self.visual_embeddings(x.to(dtype))

        t_rope = text_rope(text.shape[1], self.head_dim, device)
        for i, block in enumerate(self.text_transformer_blocks):
            self._before_block(0, i)
            # Only the per-block activation goes positionally: it is what checkpoint CPU offload moves to the host.
            text = self._checkpointed(block, text, time_embed=time_embed, rope=t_rope, key_mask=text_mask, attn_mode=self.attn_mode)
            self._after_block(0, i)

        angles = visual_rope_grid(grid, self.axes_dims, scale_factor, device)[None]
        to_fractal = sparse_params is not None and sparse_params.to_fractal
        if to_fractal:
            visual, angles = fractal_flatten(visual, grid), fractal_flatten(angles, grid)
        else:
            visual, angles = visual.flatten(1, 3), angles.flatten(1, 3)
        v_rope = (torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None])
        for i, block in enumerate(self.visual_transformer_blocks):
            self._before_block(1, i)
            visual = self._checkpointed(
                block,
                visual,
                text=text,
                time_embed=time_embed,
                rope=v_rope,
                text_mask=text_mask,
                nabla=sparse_params,
                attn_mode=self.attn_mode,
            )
            self._after_block(1, i)

        visual = fractal_unflatten(visual, grid) if to_fractal else visual.reshape(b, *grid, -1)
        return self.out_layer(visual, time_embed)
