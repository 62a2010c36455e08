"""Qwen-Image dual-stream diffusion transformer (``QwenImageTransformer``), specs/qwen_image.md §2–§3.

Module paths equal the released (diffusers-named) checkpoint keys, so a state dict loads with ``strict=True``.
The text key mask is always applied (padded varlen batches); RoPE runs in float32. Edit: condition-image tokens
follow the target tokens and ``img_shapes`` lists every image; Edit-2511 (``zero_cond_t``) modulates condition
tokens with t = 0; Layered adds ``additional_t_cond`` to the time embedding and uses the layer-aware 3-D RoPE.

Tensors: ``hidden_states (B, S, in_channels)`` packed 2×2 latent patches → ``(B, S, patch²·out_channels)``.
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

ROPE_THETA = 10000.0
ROPE_TABLE = 4096  # positions 0..4095 and -4096..-1 (diffusers' tables)
TIME_PROJ_DIM = 256
_HALF_OR_FULL = (torch.float32, torch.bfloat16, torch.float16)

ImgShapes = Sequence[tuple[int, int, int]]


def _input_dtype(linear: nn.Linear, fallback: torch.dtype) -> torch.dtype:
    """Dtype to feed a Linear: its weight dtype, or the activation dtype for fp8-stored weights."""
    dt = linear.weight.dtype
    return dt if dt in _HALF_OR_FULL else fallback


def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_PROJ_DIM, scale: float = 1000.0) -> torch.Tensor:
    """``[cos | sin]`` of ``scale·t·exp(−ln(10⁴)·j/(dim/2))`` (diffusers ``Timesteps(dim, flip_sin_to_cos=True, 0, scale)``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None] * scale
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``linear_2(SiLU(linear_1(sinusoid)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_PROJ_DIM, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Time embedding, plus the Layered ``addition_t_embedding`` (2 entries) when ``use_additional_t_cond``."""

    def __init__(self, dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype, additional_t_cond: torch.Tensor | None = None) -> torch.Tensor:
        proj = timestep_sinusoid(timestep)
        emb = self.timestep_embedder(proj.to(_input_dtype(self.timestep_embedder.linear_1, dtype)))
        if self.use_additional_t_cond:
            if additional_t_cond is None:
                raise ValueError("this model (Layered) needs additional_t_cond")
            emb = emb + self.addition_t_embedding(additional_t_cond.to(emb.device).long()).to(emb.dtype)
        return emb.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm with an affine weight (float32 statistics, result in the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GeluProj(nn.Module):
    """``GELU-tanh(proj(x))`` (diffusers ``GELU(approximate="tanh")``, key ``net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.2(GELU-tanh(net.0.proj(x)))``, inner width ×4 (``net.1`` is diffusers' dropout slot)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    """Separate q/k/v per stream, per-head RMSNorm, RoPE, one attention over ``[text, image]``, split, out projections."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        img_rope: tuple[torch.Tensor, torch.Tensor],
        txt_rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        attn_mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, -1))

        iq = apply_rope(self.norm_q(heads(self.to_q(img))), *img_rope)
        ik = apply_rope(self.norm_k(heads(self.to_k(img))), *img_rope)
        iv = heads(self.to_v(img))
        tq = apply_rope(self.norm_added_q(heads(self.add_q_proj(txt))), *txt_rope)
        tk = apply_rope(self.norm_added_k(heads(self.add_k_proj(txt))), *txt_rope)
        tv = heads(self.add_v_proj(txt))
        out = attention(
            torch.cat([tq, iq], dim=1),
            torch.cat([tk, ik], dim=1),
            torch.cat([tv, iv], dim=1),
            mode=attn_mode,
            key_mask=key_mask,
        ).flatten(-2)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:].contiguous()), self.to_add_out(out[:, :n_txt].contiguous())


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x)·(1 + scale) + shift`` (LayerNorm without affine, eps 1e-6)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def _select(params: torch.Tensor, index: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Per-token modulation ``(B, S, n)``: ``params (B, n)`` broadcast, or with ``index`` (B, S) choosing between the
    t half (0) and the t = 0 half (1) of ``params (2B, n)`` (Edit-2511)."""
    if index is None:
        return params[:, None]
    return torch.where(index[..., None] == 0, params[:batch, None], params[batch:, None])


class QwenImageTransformerBlock(nn.Module):
    """Dual-stream block: modulated joint attention and per-stream GELU-tanh MLPs with gated residuals."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, num_heads, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mlp = FeedForward(dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        *,
        img_temb: torch.Tensor,
        txt_temb: torch.Tensor,
        img_rope: tuple[torch.Tensor, torch.Tensor],
        txt_rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        modulate_index: torch.Tensor | None,
        attn_mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = img.shape[0]
        img_p = self.img_mod(img_temb)
        txt_p = self.txt_mod(txt_temb)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = (_select(p, modulate_index, b) for p in img_p.chunk(6, dim=-1))
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = (p[:, None] for p in txt_p.chunk(6, dim=-1))

        img_attn, txt_attn = self.attn(
            _modulate(img, i_shift1, i_scale1), _modulate(txt, t_shift1, t_scale1), img_rope, txt_rope, key_mask, attn_mode
        )
        img = img + i_gate1 * img_attn
        txt = txt + t_gate1 * txt_attn
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2))
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class AdaNormOut(nn.Module):
    """Final ``LN(x)·(1 + scale) + shift`` with ``(scale, shift) = linear(SiLU(temb))`` (diffusers' order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(temb).to(x.dtype)).chunk(2, dim=-1)
        return _modulate(x, shift[:, None], scale[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# RoPE


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(2j, 2j+1)`` of ``x (B, L, H, d)`` by angles with cos/sin ``(L, d/2)`` (float32).

    One complex multiply (fewer autograd nodes than the real-arithmetic form; the same values).
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos, sin)[None, :, None]
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def _axis_freqs(dim: int) -> torch.Tensor:
    return 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _centred(n: int) -> torch.Tensor:
    """Centred positions ``−(n − n//2) .. n//2 − 1`` (``scale_rope=True``)."""
    return torch.arange(n, dtype=torch.float32) - (n - n // 2)


def rope_positions(img_shapes: ImgShapes, text_len: int, *, layered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(S_img, 3)`` and ``(L_txt, 3)`` (frame, row, column) of specs/qwen_image.md §3.

    Image i (target 0, conditions 1, 2, ...) has frame position ``i + f``; rows and columns are centred. Text token k
    sits at ``max_vid_index + k`` on every axis. Layered: the last entry (the condition image) has frame −1 and the
    text start is at least ``len(img_shapes) − 1``.
    """
    parts = []
    max_vid = 0
    largest = 0  # the largest |position|, from the shapes alone (no data read: fake-tensor traces run this too)
    last = len(img_shapes) - 1
    for idx, (f, h, w) in enumerate(img_shapes):
        first_layer = layered and idx == last
        frame = torch.full((f,), -1.0) if first_layer else torch.arange(idx, idx + f, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(frame, _centred(h), _centred(w), indexing="ij"), dim=-1)
        parts.append(grid.reshape(-1, 3))
        max_vid = max(max_vid, h // 2, w // 2)
        largest = max(largest, 1 if first_layer else idx + f - 1, h - h // 2, w - w // 2)
    if layered:
        max_vid = max(max_vid, last)
    if text_len:
        largest = max(largest, max_vid + text_len - 1)
    if largest >= ROPE_TABLE:
        raise ValueError(f"RoPE position beyond the ±{ROPE_TABLE} table of the released model")
    txt = (max_vid + torch.arange(text_len, dtype=torch.float32))[:, None].expand(text_len, 3)
    return torch.cat(parts, dim=0), txt


def rope_cos_sin(pos: torch.Tensor, axes_dims: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(L, head_dim/2)``: per axis ``pos·θ^(−2j/axis_dim)``, axes concatenated."""
    angles = torch.cat([pos[:, a : a + 1] * _axis_freqs(d)[None] for a, d in enumerate(axes_dims)], dim=-1).to(device)
    return torch.cos(angles), torch.sin(angles)


# ----------------------------------------------------------------------------------------------------------------------
# Model


class QwenImageTransformer(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """Qwen-Image DiT; constructor arguments are the diffusers ``QwenImageTransformer2DModel`` config fields."""

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        attn_mode: str = "sdpa",
    ):
        super().__init__()
        if guidance_embeds:
            raise ValueError("guidance_embeds=True is not a released Qwen-Image configuration")
        if sum(axes_dims_rope) != attention_head_dim or any(a % 2 for a in axes_dims_rope):
            raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to attention_head_dim")
        self.config = {
            "patch_size": patch_size,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "num_layers": num_layers,
            "attention_head_dim": attention_head_dim,
            "num_attention_heads": num_attention_heads,
            "joint_attention_dim": joint_attention_dim,
            "guidance_embeds": guidance_embeds,
            "axes_dims_rope": tuple(axes_dims_rope),
            "zero_cond_t": zero_cond_t,
            "use_additional_t_cond": use_additional_t_cond,
            "use_layer3d_rope": use_layer3d_rope,
        }
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.axes_dims = tuple(axes_dims_rope)
        self.zero_cond_t = zero_cond_t
        self.use_layer3d_rope = use_layer3d_rope
        self.attn_mode = attn_mode
        self.num_layers = num_layers

        self.time_text_embed = TimeTextEmbed(self.inner_dim, use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.norm_out = AdaNormOut(self.inner_dim)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.transformer_blocks]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the dtype of the (never quantised) text RMSNorm weight."""
        return self.txt_norm.weight.dtype

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes: ImgShapes,
        additional_t_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for the packed tokens.

        Args:
            hidden_states: ``(B, S, in_channels)`` target tokens followed by condition-image tokens (Edit / Layered).
            encoder_hidden_states: ``(B, L, joint_attention_dim)`` text, zero-padded to the batch maximum.
            encoder_hidden_states_mask: ``(B, L)`` 1/True for real tokens (None: all real); always applied.
            timestep: ``(B,)`` σ in [0, 1] (× 1000 inside the sinusoid).
            img_shapes: ``(f, h/2, w/2)`` token grids of every image, shared by the whole batch.
            additional_t_cond: ``(B,)`` long (Layered; zeros in the releases).

        Returns:
            ``(B, S, patch²·out_channels)`` in the compute dtype (all tokens; keep the target ones).
        """
        b, s, _ = hidden_states.shape
        img_shapes = [tuple(int(v) for v in shp) for shp in img_shapes]
        n_img = sum(f * h * w for f, h, w in img_shapes)
        if n_img != s:
            raise ValueError(f"img_shapes {img_shapes} give {n_img} tokens, hidden_states has {s}")
        dtype = self.compute_dtype
        device = hidden_states.device
        # The released pipeline casts σ to the model dtype before the sinusoid; so do we.
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).to(dtype)
        if timestep.numel() == 1 and b > 1:
            timestep = timestep.expand(b)
        self.prepare_block_swap_before_forward()

        key_mask = None
        if encoder_hidden_states_mask is not None:
            txt_mask = encoder_hidden_states_mask.to(device=device, dtype=torch.bool)
            if not bool(txt_mask.all()):
                key_mask = torch.cat([txt_mask, torch.ones(b, s, dtype=torch.bool, device=device)], dim=1)

        img = self.img_in(hidden_states.to(dtype))
        txt = self.txt_in(self.txt_norm(encoder_hidden_states.to(device=device, dtype=dtype)))

        if additional_t_cond is not None and additional_t_cond.numel() == 1 and b > 1:
            additional_t_cond = additional_t_cond.reshape(1).expand(b)
        temb = self.time_text_embed(timestep, dtype, additional_t_cond)
        modulate_index = None
        img_temb = temb
        if self.zero_cond_t:
            zero = self.time_text_embed(torch.zeros_like(timestep), dtype, additional_t_cond)
            img_temb = torch.cat([temb, zero], dim=0)
            first = img_shapes[0][0] * img_shapes[0][1] * img_shapes[0][2]
            modulate_index = (torch.arange(s, device=device) >= first).int()[None].expand(b, s)

        img_pos, txt_pos = rope_positions(img_shapes, txt.shape[1], layered=self.use_layer3d_rope)
        img_rope = rope_cos_sin(img_pos, self.axes_dims, device)
        txt_rope = rope_cos_sin(txt_pos, self.axes_dims, device)

        for i, block in enumerate(self.transformer_blocks):
            self._before_block(0, i)
            img, txt = self._checkpointed(
                block,
                img,
                txt,
                img_temb=img_temb,
                txt_temb=temb,
                img_rope=img_rope,
                txt_rope=txt_rope,
                key_mask=key_mask,
                modulate_index=modulate_index,
                attn_mode=self.attn_mode,
            )
            self._after_block(0, i)

        return self.proj_out(self.norm_out(img, temb))
