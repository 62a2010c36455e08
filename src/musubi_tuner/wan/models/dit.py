"""The Wan 2.1 / 2.2 diffusion transformer (``WanModel``) in the official key layout (specs/wan.md §2–§4).

Module paths equal the official checkpoint keys (``blocks.N.self_attn.q``, ``blocks.N.norm3`` (the affine
cross-attention norm), ``head.modulation`` ...), so ComfyUI-repackaged and official files load with ``strict=True``.
Precision follows the references: time embedding, modulation sums, LayerNorm + modulate, gated residuals, q/k
RMSNorm and RoPE run in float32.

Tensors are channels-first: ``x (B, C_in, F, H, W)`` → flow (velocity) prediction ``(B, C_out, F, H, W)``. The
timestep is on the 0..1000 scale, ``(B,)`` or per token ``(B, L)`` (Wan 2.2 TI2V-5B). Text states are zero-padded
to 512 tokens (the references attend to the pads; the image/text split of cross-attention assumes 512).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.modules.attention import attention
from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin
from musubi_tuner.modules.offloading import BlockSwapMixin
from musubi_tuner.utils.errors import UserError

TEXT_LENGTH = 512
MAX_ROPE_POS = 1024
# Parameters kept in float32 when the rest of the model is bf16/fp16 (key substrings).
FP32_MODULES: tuple[str, ...] = ("time_embedding", "time_projection", "modulation", "norm")
_HALF_OR_FULL = (torch.float32, torch.bfloat16, torch.float16)


def _input_dtype(linear: nn.Linear) -> torch.dtype:
    """Dtype to feed a Linear: its weight dtype, or float32 for fp8-stored weights (the fp8 forward dequantises)."""
    dt = linear.weight.dtype
    return dt if dt in _HALF_OR_FULL else torch.float32


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos | sin]`` of ``t·10000^(−i/half)`` (float64, as the official code), returned as float32 ``(N, dim)``."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.reshape(-1).to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) rotary widths: h = w = 2·(d//6), t = d − 2h (spec §3)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    device: torch.device,
    riflex_index: int = 0,
    time_positions: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(1, L, 1, d/2)`` of the post-patch grid ``(F, H, W)``, row-major (f, h, w); angles in float64.

    ``riflex_index`` k > 0 replaces temporal frequency k − 1 by ``0.9·2π / F`` (RIFLEx, spec §10).
    ``time_positions`` (F values): the RoPE time index of each frame instead of ``0..F−1`` (one-frame mode).
    """
    parts = []
    for axis, (n, ad) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        freqs = 1.0 / torch.pow(10000.0, torch.arange(0, ad, 2, dtype=torch.float64, device=device) / ad)
        if axis == 0 and riflex_index > 0:
            freqs[riflex_index - 1] = 0.9 * 2.0 * math.pi / max(1, grid[0])
        if axis == 0 and time_positions is not None:
            pos = torch.as_tensor(time_positions, device=device).to(torch.float64).reshape(-1)
        else:
            pos = torch.arange(n, dtype=torch.float64, device=device)
        a = pos[:, None] * freqs[None]
        shape = [1, 1, 1, ad // 2]
        shape[axis] = n
        parts.append(a.view(shape).expand(*grid, ad // 2))
    angles = torch.cat(parts, dim=-1).reshape(-1, head_dim // 2)
    return torch.cos(angles).float()[None, :, None], torch.sin(angles).float()[None, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(2j, 2j+1)`` of ``x (B, L, heads, d)`` in float32; returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole feature dim (across heads), float32, learnable ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x)·(1 + scale) + shift`` in float32, returned in x's dtype."""
    return (norm(x.float()) * (1.0 + scale) + shift).type_as(x)


def _gated_add(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.float() + out.float() * gate).type_as(x)


class WanSelfAttention(nn.Module):
    """q/k/v/o Linears (bias), RMSNorm of q and k across heads, 3D RoPE, attention."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mode: str, split_attn: bool) -> torch.Tensor:
        q = apply_rope(self._heads(self.norm_q(self.q(x))), *rope)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope)
        v = self._heads(self.v(x))
        out = attention(q, k, v, mode=attn_mode, split_attn=split_attn)
        return self.o(out.flatten(2))


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """Normalized Attention Guidance on attention outputs ``(B, L, D)`` (spec §10).

    ``z̃ = s·z₊ − (s − 1)·z₋``; ``r = ‖z̃‖₁ / ‖z₊‖₁`` per token; ``ẑ = z̃·min(r, τ)/r``; ``α·ẑ + (1 − α)·z₊``.
    """
    zp, zn = z_pos.float(), z_neg.float()
    zt = scale * zp - (scale - 1.0) * zn
    r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    zh = zt * (r.clamp(max=tau) / r.clamp_min(1e-12))
    return (alpha * zh + (1.0 - alpha) * zp).type_as(z_pos)


class WanCrossAttention(WanSelfAttention):
    """Cross-attention to the text tokens, plus (2.1 I2V / FLF2V) a second attention over the image tokens."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, image: bool = False):
        super().__init__(dim, num_heads, eps)
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    @property
    def has_image(self) -> bool:
        return hasattr(self, "k_img")

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        attn_mode: str,
        split_attn: bool,
        nag: tuple[torch.Tensor, float, float, float] | None = None,
    ) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        out = attention(q, k, v, mode=attn_mode, split_attn=split_attn)
        if nag is not None:  # (negative context, scale, tau, alpha)
            ctx_neg, scale, tau, alpha = nag
            k_n = self._heads(self.norm_k(self.k(ctx_neg)))
            v_n = self._heads(self.v(ctx_neg))
            out_n = attention(q, k_n, v_n, mode=attn_mode, split_attn=split_attn)
            out = nag_combine(out.flatten(2), out_n.flatten(2), scale, tau, alpha).unflatten(-1, (self.num_heads, -1))
        if context_img is not None and self.has_image:
            k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
            v_img = self._heads(self.v_img(context_img))
            out = out + attention(q, k_img, v_img, mode=attn_mode, split_attn=split_attn)
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    """Modulated self-attention, cross-attention (affine ``norm3``, plain residual), modulated FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float, image: bool):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, image=image)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mode: str = "sdpa",
        split_attn: bool = False,
        nag: tuple[torch.Tensor, float, float, float] | None = None,
    ) -> torch.Tensor:
        if e.dim() == 3:  # (B, 6, dim): one timestep per sample
            mod = (self.modulation.float() + e.float()).chunk(6, dim=1)
        else:  # (B, L, 6, dim): per-token timesteps (TI2V-5B)
            mod = [m.squeeze(2) for m in (self.modulation.float()[None] + e.float()).chunk(6, dim=2)]
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        x = _gated_add(x, self.self_attn(_modulate(self.norm1, x, shift, scale), rope, attn_mode, split_attn), gate)
        x = x + self.cross_attn(self.norm3(x), context, context_img, attn_mode, split_attn, nag)
        return _gated_add(x, self.ffn(_modulate(self.norm2, x, c_shift, c_scale)), c_gate)


class Head(nn.Module):
    """Modulated LayerNorm (shift, scale from the time embedding) → Linear to ``prod(patch)·C_out``."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.dim() == 2:  # (B, dim)
            shift, scale = (self.modulation.float() + e.float()[:, None]).chunk(2, dim=1)
        else:  # (B, L, dim)
            shift, scale = (m.squeeze(2) for m in (self.modulation.float()[None] + e.float()[:, :, None]).chunk(2, dim=2))
        return self.head(_modulate(self.norm, x, shift, scale).to(_input_dtype(self.head)))


class MLPProj(nn.Module):
    """CLIP image tokens → model width: LN, Linear, GELU, Linear, LN (+ FLF2V position embedding ``emb_pos``)."""

    def __init__(self, in_dim: int, out_dim: int, flf_pos_emb: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, 1e-5, True),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            WanLayerNorm(out_dim, 1e-5, True),
        )
        if flf_pos_emb:
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * 257, in_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            b, n, d = image_embeds.shape
            image_embeds = image_embeds.reshape(-1, 2 * n, d) + self.emb_pos.to(image_embeds.dtype)
        return self.proj(image_embeds)


class WanModel(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """Wan DiT; constructor arguments are the official config fields (spec §2)."""

    def __init__(
        self,
        model_version: str = "2.1",
        patch_size: Sequence[int] = (1, 2, 2),
        in_dim: int = 16,
        out_dim: int = 16,
        dim: int = 5120,
        ffn_dim: int = 13824,
        num_heads: int = 40,
        num_layers: int = 40,
        text_dim: int = 4096,
        freq_dim: int = 256,
        image_dim: int | None = None,
        flf_pos_emb: bool = False,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        attn_mode: str = "sdpa",
        split_attn: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.config = {
            "model_version": str(model_version),
            "patch_size": tuple(patch_size),
            "in_dim": in_dim,
            "out_dim": out_dim,
            "dim": dim,
            "ffn_dim": ffn_dim,
            "num_heads": num_heads,
            "num_layers": num_layers,
            "text_dim": text_dim,
            "freq_dim": freq_dim,
            "image_dim": image_dim,
            "flf_pos_emb": flf_pos_emb,
            "cross_attn_norm": cross_attn_norm,
            "eps": eps,
        }
        self.model_version = str(model_version)
        self.patch_size = tuple(patch_size)
        self.in_dim, self.out_dim, self.dim, self.num_heads, self.freq_dim = in_dim, out_dim, dim, num_heads, freq_dim
        self.num_layers = num_layers
        self.attn_mode = attn_mode
        self.split_attn = split_attn

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, cross_attn_norm, eps, image=image_dim is not None) for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        if image_dim is not None:
            self.img_emb = MLPProj(image_dim, dim, flf_pos_emb=flf_pos_emb)

    # -- contracts -------------------------------------------------------------------------------------------------

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.blocks]

    @property
    def has_image_input(self) -> bool:
        return hasattr(self, "img_emb")

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the dtype of the (never quantised) patch embedding."""
        return self.patch_embedding.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> WanModel:
        """Cast floating parameters to ``dtype`` except the float32 islands (``FP32_MODULES``)."""
        for name, p in self.named_parameters():
            if p.is_floating_point() and p.dtype in _HALF_OR_FULL:
                p.data = p.data.to(torch.float32 if any(s in name for s in FP32_MODULES) else dtype)
        return self

    # -- forward ---------------------------------------------------------------------------------------------------

    def embed_text(self, context: torch.Tensor | Sequence[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """Zero-pad each prompt's states to 512 tokens, then ``text_embedding``; returns ``(B, 512, dim)``."""
        if isinstance(context, torch.Tensor) and context.dim() == 3:
            items = list(context)
        else:
            items = list(context)
        if len(items) != batch:
            raise ValueError(f"context has {len(items)} prompts for a batch of {batch}")
        padded = []
        for c in items:
            if c.shape[0] > TEXT_LENGTH:
                raise ValueError(f"text states of {c.shape[0]} tokens exceed {TEXT_LENGTH}")
            padded.append(torch.cat([c, c.new_zeros(TEXT_LENGTH - c.shape[0], c.shape[1])]) if c.shape[0] < TEXT_LENGTH else c)
        ctx = torch.stack(padded).to(device=device, dtype=_input_dtype(self.text_embedding[0]))
        return self.text_embedding(ctx).to(self.compute_dtype)

    def _rope(
        self,
        grid: tuple[int, int, int],
        batch: int,
        device: torch.device,
        riflex_index: int,
        frame_indices: Sequence[int] | torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin ``(1 or B, L, 1, d/2)``; with ``frame_indices`` the time axis uses those positions."""
        head_dim = self.dim // self.num_heads
        if frame_indices is None:
            return rope_cos_sin(grid, head_dim, device, riflex_index)
        idx = torch.as_tensor(frame_indices).long().cpu()
        rows = idx.reshape(1, -1) if idx.dim() == 1 else idx
        if rows.shape[1] != grid[0] or rows.shape[0] not in (1, batch):
            raise ValueError(f"frame_indices {tuple(idx.shape)} do not fit {batch} samples of {grid[0]} latent frames")
        if int(rows.min()) < 0 or int(rows.max()) >= MAX_ROPE_POS:
            raise UserError(f"frame indices {rows.tolist()} must lie in 0..{MAX_ROPE_POS - 1} (RoPE positions)")
        if rows.shape[0] > 1 and bool((rows == rows[:1]).all()):
            rows = rows[:1]
        parts = [rope_cos_sin(grid, head_dim, device, riflex_index, r) for r in rows]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor],
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        skip_block_indices: Sequence[int] | None = None,
        riflex_index: int = 0,
        nag: tuple[torch.Tensor | Sequence[torch.Tensor], float, float, float] | None = None,
        frame_indices: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow.

        Args:
            x: ``(B, C, F, H, W)`` noisy latent; with ``y`` the two are concatenated on channels (I2V: 16 + 20).
            timestep: ``(B,)`` (or a scalar) on the 0..1000 scale, or ``(B, L)`` per post-patch token (TI2V-5B).
            context: ``(B, L ≤ 512, text_dim)`` or a list of ``(L_i, text_dim)``; zero-padded to 512 here.
            clip_fea: 2.1 I2V ``(B, 257, 1280)`` CLIP tokens; FLF2V ``(2B, 257, 1280)`` (first, last per sample).
            y: condition channels (mask + image latent, control latent ...), concatenated after ``x``.
            skip_block_indices: blocks to skip (skip-layer guidance).
            riflex_index: RIFLEx temporal frequency index (0 = off).
            nag: ``(negative text states, scale, tau, alpha)``: Normalized Attention Guidance in cross-attention.
            frame_indices: one-frame mode: RoPE time index of each latent frame, ``(F,)`` for the batch or ``(B, F)``
                per sample (``wan.one_frame``); default ``0..F−1``.

        Returns:
            ``(B, out_dim, F, H, W)`` in the compute dtype.
        """
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.dim() != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be (B, {self.in_dim}, F, H, W) channels-first, got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        if f % pt or h % ph or w % pw:
            raise UserError(f"latent size {f}x{h}x{w} (F x H x W) is not divisible by the patch size {self.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        if max(grid) > MAX_ROPE_POS:
            raise UserError(f"token grid {grid} exceeds the {MAX_ROPE_POS} RoPE positions per axis")
        seq = grid[0] * grid[1] * grid[2]
        device, dtype = x.device, self.compute_dtype

        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        t = torch.as_tensor(timestep, device=device)
        if t.dim() == 0 or (t.dim() == 1 and t.numel() == 1 and b > 1):
            t = t.reshape(1).expand(b)
        if t.dim() == 2 and tuple(t.shape) != (b, seq):
            raise ValueError(f"per-token timesteps must be (B={b}, L={seq}), got {tuple(t.shape)}")
        if t.dim() == 1 and t.shape[0] != b:
            raise ValueError(f"timestep must be (B={b},), got {tuple(t.shape)}")
        sin = sinusoidal_embedding(t, self.freq_dim).to(_input_dtype(self.time_embedding[0]))
        e = self.time_embedding(sin).float()  # (B·[L], dim)
        e0 = self.time_projection(e.to(_input_dtype(self.time_projection[1]))).float()
        if t.dim() == 2:
            e, e0 = e.view(b, seq, -1), e0.view(b, seq, 6, -1)
        else:
            e0 = e0.view(b, 6, -1)

        ctx = self.embed_text(context, b, device)
        ctx_img = None
        if self.has_image_input:
            if clip_fea is None:
                raise UserError("this Wan model takes CLIP image features (2.1 I2V / FLF2V): clip_fea is missing")
            ctx_img = self.img_emb(clip_fea.to(device=device, dtype=torch.float32)).to(dtype)

        nag_in = None
        if nag is not None:
            nag_in = (self.embed_text(nag[0], b, device), float(nag[1]), float(nag[2]), float(nag[3]))
        rope = self._rope(grid, b, device, riflex_index, frame_indices)
        skip = set(skip_block_indices or ())
        for i, block in enumerate(self.blocks):
            self._before_block(0, i)
            if i not in skip:
                tokens = self._checkpointed(
                    block,
                    tokens,
                    e=e0,
                    context=ctx,
                    context_img=ctx_img,
                    rope=rope,
                    attn_mode=self.attn_mode,
                    split_attn=self.split_attn,
                    nag=nag_in,
                )
            self._after_block(0, i)

        out = self.head(tokens, e)
        out = out.view(b, *grid, pt, ph, pw, self.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, self.out_dim, f, h, w)
