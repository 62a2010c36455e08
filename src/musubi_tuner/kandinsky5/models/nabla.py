"""NABLA sparse attention for the Kandinsky 5 visual self-attention (specs/kandinsky5.md §3.5, §5).

Tokens are put in *fractal order* (every 64 consecutive tokens are one 8x8 tile of one frame), a block map is estimated
from tile-averaged queries and keys, binarised (top-CDF or top-k), OR-ed with a sliding-tile (STA) prior and turned
into a flex-attention ``BlockMask`` whose selected blocks are all full 64x64 blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from musubi_tuner.kandinsky5.configs import NABLA_METHODS
from musubi_tuner.utils.errors import UserError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from musubi_tuner.kandinsky5.configs import TaskConfig

TILE = 8  # tile side in post-patch tokens
BLOCK_SIZE = TILE * TILE  # tokens per attention block
DEFAULT_FORCED_P = 0.9


@dataclass(frozen=True)
class NablaParams:
    """Per-forward NABLA settings for one token grid ``(T', H', W')``.

    ``sta_mask`` is the ``(1, 1, N, N)`` bool STA prior (``None`` when ``add_sta`` is off).
    """

    grid: tuple[int, int, int]
    P: float
    method: str = "topcdf"
    add_sta: bool = True
    sta_mask: torch.Tensor | None = None
    to_fractal: bool = True

    @property
    def num_blocks(self) -> int:
        t, h, w = self.grid
        return t * (h // TILE) * (w // TILE)


# ----------------------------------------------------------------------------------------------------------------------
# Fractal token order


def fractal_flatten(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``(B, T, H, W, *rest)`` → ``(B, T·H·W, *rest)`` in (t, tile_row, tile_col, row_in_tile, col_in_tile) order."""
    t, h, w = grid
    b, rest = x.shape[0], x.shape[4:]
    x = x.reshape(b, t, h // TILE, TILE, w // TILE, TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, x.dim()))
    return x.reshape(b, t * h * w, *rest)


def fractal_unflatten(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`fractal_flatten`: ``(B, T·H·W, *rest)`` → ``(B, T, H, W, *rest)``."""
    t, h, w = grid
    b, rest = x.shape[0], x.shape[2:]
    x = x.reshape(b, t, h // TILE, w // TILE, TILE, TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, x.dim()))
    return x.reshape(b, t, h, w, *rest)


def fractal_permutation(grid: tuple[int, int, int]) -> torch.Tensor:
    """Row-major (t, h, w) index of the token at each fractal position (``flat[perm]`` equals the fractal order)."""
    t, h, w = grid
    idx = torch.arange(t * h * w).reshape(1, t, h, w)
    return fractal_flatten(idx, grid)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Geometry


def token_grid(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int] = (1, 2, 2)) -> tuple[int, int, int]:
    """Post-patchify token grid ``(T', H', W')`` of a latent ``(F, H, W)``."""
    f, h, w = latent_shape
    return f // patch_size[0], h // patch_size[1], w // patch_size[2]


def check_nabla_geometry(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int] = (1, 2, 2)) -> None:
    """Raise a ``UserError`` when a latent ``(F, H, W)`` cannot be cut into 8x8-token tiles."""
    f, h, w = latent_shape
    if patch_size[0] != 1:
        raise UserError(f"NABLA attention needs a temporal patch size of 1; this model uses patch_size={tuple(patch_size)}")
    need = TILE * patch_size[1]  # latent multiple (16 for patch 2)
    px_multiple = need * 8  # VAE downsamples by 8 → 128 px
    if h % need or w % need:
        raise UserError(
            f"NABLA sparse attention needs frames whose size is a multiple of {px_multiple} px, but the latent is "
            f"{f}x{h}x{w} (F x H x W, about {h * 8}x{w * 8} px): latent height and width must be multiples of {need} "
            f"so the token grid splits into {TILE}x{TILE} tiles. Use a resolution that is a multiple of {px_multiple} px "
            f"(cache latents with --nabla_resize, or use {px_multiple}-px bucket steps), or a dense-attention task."
        )


# ----------------------------------------------------------------------------------------------------------------------
# STA prior


@lru_cache(maxsize=16)
def _sta_mask_cached(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: str) -> torch.Tensor:
    k = torch.arange(t * hb * wb, device=device)
    tt, rr, cc = k // (hb * wb), (k // wb) % hb, k % wb

    def near(a: torch.Tensor, win: int) -> torch.Tensor:
        return (a[:, None] - a[None, :]).abs() <= win // 2

    return near(tt, wT) & near(rr, wH) & near(cc, wW)


def sta_mask(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N, N)`` bool sliding-tile prior over blocks ``k = t·hb·wb + r·wb + c`` (hb, wb = tiles per column/row)."""
    return _sta_mask_cached(t, hb, wb, wT, wH, wW, str(torch.device(device)))


# ----------------------------------------------------------------------------------------------------------------------
# Block map and BlockMask


def nabla_block_map(q: torch.Tensor, k: torch.Tensor, params: NablaParams) -> torch.Tensor:
    """Bool block map ``(B, heads, N, N)`` from q, k ``(B, S, heads, d)`` taken after q/k norm and RoPE."""
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    b, heads, s, d = q.shape
    n = s // BLOCK_SIZE
    q_mean = q.reshape(b, heads, n, BLOCK_SIZE, d).mean(-2)
    k_mean = k.reshape(b, heads, n, BLOCK_SIZE, d).mean(-2)
    scores = torch.softmax((q_mean @ k_mean.transpose(-2, -1)) / math.sqrt(d), dim=-1)

    if params.method == "topcdf":
        vals, order = scores.sort(dim=-1)
        keep_sorted = vals.cumsum(dim=-1) >= 1 - params.P
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    elif params.method == "topk":
        count = int(params.P * n) if 0 < params.P < 1 else int(params.P)
        count = max(1, min(n, count))
        top = scores.topk(count, dim=-1).indices
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    else:
        raise UserError(f"unknown NABLA method '{params.method}'; valid: {', '.join(NABLA_METHODS)}")

    if params.add_sta and params.sta_mask is not None:
        keep = keep | params.sta_mask.to(keep.device)
    return keep


def block_mask_from_map(keep: torch.Tensor) -> BlockMask:
    """Flex-attention ``BlockMask`` where every selected 64x64 block is a full block (no partial blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = keep.sum(-1).to(torch.int32)
    # Stable descending sort puts the selected key blocks first, in ascending block order.
    indices = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=BLOCK_SIZE, mask_mod=None)


def nabla_block_mask(q: torch.Tensor, k: torch.Tensor, params: NablaParams) -> BlockMask:
    """Block map of :func:`nabla_block_map` as a flex-attention ``BlockMask``."""
    return block_mask_from_map(nabla_block_map(q, k, params))


# ----------------------------------------------------------------------------------------------------------------------
# Builder


def build_sparse_params(
    task_config: TaskConfig,
    latent_shape: tuple[int, int, int],
    force_nabla: bool = False,
    nabla_p: float | None = None,
    device: torch.device | str = "cpu",
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> NablaParams | None:
    """NABLA parameters for a latent ``(F, H, W)`` of a task, or ``None`` for dense attention.

    ``force_nabla`` (``--force_nabla_attention``) turns NABLA on for a dense task; ``nabla_p`` (``--nabla_p``)
    overrides the threshold. Without an override the task's own P is used (defect #14: no silent 0.9 for HD tasks).
    """
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (F, H, W), got {tuple(latent_shape)}")
    if not (task_config.uses_nabla or force_nabla):
        return None
    p = nabla_p if nabla_p is not None else (task_config.nabla_p if task_config.nabla_p is not None else DEFAULT_FORCED_P)
    if not 0.0 < p:
        raise UserError(f"--nabla_p must be > 0 (got {p})")
    if task_config.nabla_method not in NABLA_METHODS:
        raise UserError(f"unknown NABLA method '{task_config.nabla_method}'; valid: {', '.join(NABLA_METHODS)}")
    check_nabla_geometry(tuple(latent_shape), patch_size)
    grid = token_grid(tuple(latent_shape), patch_size)
    t, h, w = grid
    sta = None
    if task_config.nabla_add_sta:
        sta = sta_mask(t, h // TILE, w // TILE, task_config.nabla_wT, task_config.nabla_wH, task_config.nabla_wW, device)
        sta = sta[None, None]
    return NablaParams(grid=grid, P=float(p), method=task_config.nabla_method, add_sta=task_config.nabla_add_sta, sta_mask=sta)
