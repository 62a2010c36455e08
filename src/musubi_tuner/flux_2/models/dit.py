"""FLUX.2 transformer (``Flux2``) with the official BFL module paths (specs/flux2.md §4, §5).

``double_blocks`` run separate img / txt streams with joint attention over ``[txt, img]``; ``single_blocks`` run the
concatenated stream with the fused ``linear1`` (q, k, v, MLP-in) and ``linear2``. Every Linear is bias-free; the three
modulation heads are shared by all blocks. Positions are 4-axis ``(t, h, w, l)`` ids per token and per sample (so a
batch may carry different reference layouts; diffusers only reads ``ids[0]``).

Inputs are packed tokens: ``img (B, S_img, 128)`` (target tokens first, then reference tokens), ``txt (B, L, ctx)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.modules.attention import attention
from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin
from musubi_tuner.modules.offloading import BlockSwapConfig, BlockSwapMixin
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

TIME_EMBED_DIM = 256
TIME_FACTOR = 1000.0  # timesteps / guidance in [0, 1] (resp. raw) are multiplied by this before the sinusoid
_HALF_OR_FULL = (torch.float32, torch.bfloat16, torch.float16)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid ``[cos | sin]`` of ``t`` (already scaled by 1000), frequencies ``exp(-ln(max_period)·i/(dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_cos_sin(ids: torch.Tensor, axes_dim: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(B, L, 1, D/2)`` for 4-axis ids ``(B, L, n_axes)``: axis ``a`` uses ``theta^(-2j/d_a)``.

    Frequencies and angles are computed in float64 (as diffusers does off mps/npu) and returned in float32.
    """
    parts = []
    pos = ids.to(torch.float64)
    for a, d in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        parts.append(pos[..., a, None] * freqs)
    angles = torch.cat(parts, dim=-1)
    return torch.cos(angles).float()[:, :, None], torch.sin(angles).float()[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(2j, 2j+1)`` of ``x (B, L, H, D)``; float32 math, result in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm with the official parameter name ``scale`` (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (``query_norm`` / ``key_norm``)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class MLPEmbedder(nn.Module):
    """``in_layer`` → SiLU → ``out_layer`` (no bias): the timestep and guidance embedders."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """Shared modulation head ``lin(SiLU(temb))`` → ``sets`` × (shift, scale, gate), each ``(B, 1, H)``."""

    def __init__(self, hidden: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(hidden, 3 * sets * hidden, bias=False)

    def forward(self, temb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = self.lin(F.silu(temb))[:, None].chunk(3 * self.sets, dim=-1)
        return [tuple(out[3 * i : 3 * i + 3]) for i in range(self.sets)]  # type: ignore[misc]


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(a)·b`` over the two halves of the last dim."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


class SiLUGate(nn.Module):
    """The parameter-free SwiGLU between ``mlp.0`` and ``mlp.2`` (keeps the official ``.0`` / ``.2`` indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class SelfAttention(nn.Module):
    """Fused ``qkv``, per-head ``norm`` and output ``proj`` of one stream of a double block."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.norm = QKNorm(hidden // num_heads)
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 2 * mlp_hidden, bias=False), SiLUGate(), nn.Linear(mlp_hidden, hidden, bias=False))


class DoubleStreamBlock(nn.Module):
    """Separate img / txt weights, joint attention over ``[txt, img]``."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_attn = SelfAttention(hidden, num_heads)
        self.txt_attn = SelfAttention(hidden, num_heads)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img, txt, *, mod_img, mod_txt, rope, attn_mode="sdpa"):
        (i_shift, i_scale, i_gate), (i_shift2, i_scale2, i_gate2) = mod_img
        (t_shift, t_scale, t_gate), (t_shift2, t_scale2, t_gate2) = mod_txt
        iq, ik, iv = self.img_attn.qkv_heads(_modulate(img, i_shift, i_scale))
        tq, tk, tv = self.txt_attn.qkv_heads(_modulate(txt, t_shift, t_scale))
        q, k = apply_rope(torch.cat([tq, iq], 1), *rope), apply_rope(torch.cat([tk, ik], 1), *rope)
        out = attention(q, k, torch.cat([tv, iv], 1), mode=attn_mode).flatten(-2)
        t_out, i_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = img + i_gate * self.img_attn.proj(i_out)
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate * self.txt_attn.proj(t_out)
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint stream: ``linear1`` → (q, k, v, mlp) and ``linear2`` on [attn, mlp]."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden, bias=False)
        self.norm = QKNorm(hidden // num_heads)

    def forward(self, x, *, mod, rope, attn_mode="sdpa"):
        shift, scale, gate = mod
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, 2 * self.mlp_hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = apply_rope(self.norm.query_norm(q), *rope), apply_rope(self.norm.key_norm(k), *rope)
        out = attention(q, k, v, mode=attn_mode).flatten(-2)
        return x + gate * self.linear2(torch.cat([out, swiglu(mlp)], dim=-1))


class LastLayer(nn.Module):
    """LayerNorm modulated by ``adaLN_modulation`` (shift, scale), then ``linear``."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))
        self.linear = nn.Linear(hidden, out_channels, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(temb)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


def _raw_swap_split(n: int, num_double: int, num_single: int, keep: int) -> tuple[int, int, bool]:
    """``(double, single, fits)`` before clamping; see ``swap_split``."""
    ratio = num_single / num_double
    # n counts double-block units (a single block is about half a double block); both lists give the same fraction
    double = round(n / (1 + ratio / 2))
    # a small n whose share rounds to no double block swaps n single blocks (never fewer blocks than asked)
    single = round(double * ratio) if double else n
    cap_double, cap_single = num_double - keep, num_single - keep
    while double > max(cap_double, 0):  # trade a double block for two single blocks
        double, single = double - 1, single + 2
    while single > cap_single and double < cap_double:
        double, single = double + 1, single - 2
    return double, single, single <= cap_single


def swap_split(n: int, num_double: int, num_single: int, keep: int = 2) -> tuple[int, int]:
    """``--blocks_to_swap n`` → ``(double, single)`` blocks swapped (specs/flux2.md §9, musubi-tuner's FLUX.2 doc:
    one double block counts as two single blocks).

    ``double = round(n / (1 + r/2))`` and ``single = round(double · r)`` with ``r = num_single / num_double`` (the same
    share of each list); a list over its limit (``keep`` blocks stay resident: 2 in training, 1 in inference) trades
    one double block for two single blocks; an ``n`` too small for one double block swaps ``n`` single blocks. Counts
    above ``max_blocks_to_swap`` give the maximum's split. Training
    maxima (musubi-tuner's documented ones): dev 29 (6 + 44), klein-4b 13 (3 + 18), klein-9b 16 (6 + 18).
    """
    if n <= 0 or num_double + num_single == 0:
        return 0, 0
    if num_double == 0 or num_single == 0:
        return (min(n, max(0, num_double - keep)), 0) if num_double else (0, min(n, max(0, num_single - keep)))
    n = min(n, max_blocks_to_swap(num_double, num_single, keep))
    if n == 0:
        return 0, 0
    double, single, _ = _raw_swap_split(n, num_double, num_single, keep)
    return double, single


def max_blocks_to_swap(num_double: int, num_single: int, keep: int = 2) -> int:
    """The largest ``--blocks_to_swap`` whose split fits both lists (each keeping ``keep`` blocks resident)."""
    best = 0
    for n in range(1, num_double + num_single + 1):
        double, single, fits = _raw_swap_split(n, num_double, num_single, keep)
        if fits and double >= 0 and single >= 0:
            best = n
    return best


class Flux2(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """The FLUX.2 DiT; constructor arguments are the official config fields (specs/flux2.md §3)."""

    def __init__(
        self,
        in_channels: int = 128,
        context_in_dim: int = 15360,
        hidden_size: int = 6144,
        num_heads: int = 48,
        depth: int = 8,
        depth_single_blocks: int = 48,
        axes_dim: Sequence[int] = (32, 32, 32, 32),
        theta: int = 2000,
        mlp_ratio: float = 3.0,
        guidance_embed: bool = True,
        attn_mode: str = "sdpa",
    ):
        super().__init__()
        if hidden_size % num_heads or sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"sum(axes_dim)={sum(axes_dim)} must equal the head dim {hidden_size}/{num_heads}")
        self.config = {
            "in_channels": in_channels,
            "context_in_dim": context_in_dim,
            "hidden_size": hidden_size,
            "num_heads": num_heads,
            "depth": depth,
            "depth_single_blocks": depth_single_blocks,
            "axes_dim": list(axes_dim),
            "theta": theta,
            "mlp_ratio": mlp_ratio,
            "guidance_embed": guidance_embed,
        }
        self.in_channels = in_channels
        self.axes_dim = tuple(axes_dim)
        self.theta = theta
        self.guidance_embed = guidance_embed
        self.attn_mode = attn_mode
        self.img_in = nn.Linear(in_channels, hidden_size, bias=False)
        self.txt_in = nn.Linear(context_in_dim, hidden_size, bias=False)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden_size)
        if guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, hidden_size)
        self.double_stream_modulation_img = Modulation(hidden_size, 2)
        self.double_stream_modulation_txt = Modulation(hidden_size, 2)
        self.single_stream_modulation = Modulation(hidden_size, 1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(hidden_size, in_channels)

    # -- block swap contract ---------------------------------------------------------------------------------------

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.double_blocks, self.single_blocks]

    def _split_blocks_to_swap(self, n: int, training: bool = False) -> list[int]:
        """``[double, single]`` blocks swapped for ``--blocks_to_swap n`` (``swap_split``); each list keeps 2 blocks
        resident in training, 1 in inference."""
        return list(swap_split(n, len(self.double_blocks), len(self.single_blocks), keep=2 if training else 1))

    def max_blocks_to_swap(self, training: bool) -> int:
        """The spec's maximum ``--blocks_to_swap`` (one double block counts as two single blocks)."""
        return max_blocks_to_swap(len(self.double_blocks), len(self.single_blocks), keep=2 if training else 1)

    def enable_block_swap(self, num_blocks: int, config: BlockSwapConfig) -> None:
        """The mixin's block swap, with a count above this DiT's maximum lowered to it (and a warning naming it)."""
        limit = self.max_blocks_to_swap(config.supports_backward)
        if num_blocks > limit:
            logger.warning(
                f"--blocks_to_swap {num_blocks}: this FLUX.2 DiT swaps at most {limit} (double/single blocks "
                f"{len(self.double_blocks)}/{len(self.single_blocks)}); using {limit}"
            )
            num_blocks = limit
        super().enable_block_swap(num_blocks, config)

    # -- dtype -----------------------------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: that of the (never quantised) QK-norm scales."""
        return self.single_blocks[0].norm.query_norm.scale.dtype if len(self.single_blocks) else self.img_in.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> Flux2:
        """Cast floating (non-fp8) parameters to ``dtype``."""
        for p in self.parameters():
            if p.is_floating_point() and p.dtype in _HALF_OR_FULL:
                p.data = p.data.to(dtype)
        return self

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the velocity of every image token.

        Args:
            img: ``(B, S_img, in_channels)`` packed tokens (target first, references after).
            img_ids / txt_ids: ``(B, S, 4)`` positions ``(t, h, w, l)`` per sample.
            txt: ``(B, L, context_in_dim)`` stacked text-encoder hidden states.
            timesteps: ``(B,)`` in [0, 1] (scaled by 1000 inside).
            guidance: ``(B,)`` raw embedded guidance (models with ``guidance_embed`` only; required there).

        Returns:
            ``(B, S_img, in_channels)``; keep the first (target) tokens.
        """
        self.prepare_block_swap_before_forward()
        dtype = self.compute_dtype
        b = img.shape[0]
        if img_ids.shape[:2] != img.shape[:2] or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError(f"ids {tuple(img_ids.shape)} / {tuple(txt_ids.shape)} do not match img / txt tokens")
        timesteps = torch.as_tensor(timesteps, device=img.device).reshape(-1).expand(b)
        temb = self.time_in(timestep_embedding(timesteps * TIME_FACTOR).to(dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.2 model embeds guidance: pass guidance (B,)")
            guidance = torch.as_tensor(guidance, device=img.device).reshape(-1).expand(b)
            temb = temb + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR).to(dtype))
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        (mod_single,) = self.single_stream_modulation(temb)

        x = self.img_in(img.to(dtype))
        ctx = self.txt_in(txt.to(dtype))
        rope = rope_cos_sin(torch.cat([txt_ids, img_ids], dim=1).to(img.device), self.axes_dim, self.theta)
        for i, block in enumerate(self.double_blocks):
            self._before_block(0, i)
            x, ctx = self._checkpointed(block, x, ctx, mod_img=mod_img, mod_txt=mod_txt, rope=rope, attn_mode=self.attn_mode)
            self._after_block(0, i)
        n_txt = ctx.shape[1]
        x = torch.cat([ctx, x], dim=1)
        for i, block in enumerate(self.single_blocks):
            self._before_block(1, i)
            x = self._checkpointed(block, x, mod=mod_single, rope=rope, attn_mode=self.attn_mode)
            self._after_block(1, i)
        return self.final_layer(x[:, n_txt:], temb)
