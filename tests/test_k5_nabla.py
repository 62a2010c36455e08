"""NABLA sparse attention: fractal order, STA prior, block-map binarisation, BlockMask, geometry errors, parameters."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import Kandinsky5T2VPipeline
from diffusers.models.transformers import transformer_kandinsky as dk

from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.models.nabla import (
    NablaParams,
    block_mask_from_map,
    build_sparse_params,
    check_nabla_geometry,
    fractal_flatten,
    fractal_permutation,
    fractal_unflatten,
    nabla_block_map,
    sta_mask,
)
from musubi_tuner.utils.errors import UserError


def test_fractal_order_matches_definition_and_round_trips():
    grid = (2, 16, 24)
    t, h, w = grid
    x = torch.randn(3, t, h, w, 5)
    flat = fractal_flatten(x, grid)
    # Definition: order = (t, tile_row, tile_col, row_in_tile, col_in_tile) with 8x8 tiles.
    expected = [
        x[:, ti, tr * 8 + r, tc * 8 + c]
        for ti, tr, tc, r, c in itertools.product(range(t), range(h // 8), range(w // 8), range(8), range(8))
    ]
    assert torch.equal(flat, torch.stack(expected, dim=1))
    assert torch.equal(fractal_unflatten(flat, grid), x)
    perm = fractal_permutation(grid)
    assert torch.equal(x.flatten(1, 3)[:, perm], flat)
    assert torch.equal(fractal_flatten(x, grid), dk.fractal_flatten(x, x, (3, *grid), block_mask=True)[0])


def test_sta_mask_brute_force_and_diffusers():
    t, hb, wb, wT, wH, wW = 4, 3, 5, 3, 3, 1
    got = sta_mask(t, hb, wb, wT, wH, wW)
    coords = list(itertools.product(range(t), range(hb), range(wb)))
    expected = torch.tensor(
        [
            [abs(a[0] - b[0]) <= wT // 2 and abs(a[1] - b[1]) <= wH // 2 and abs(a[2] - b[2]) <= wW // 2 for b in coords]
            for a in coords
        ]
    )
    assert torch.equal(got, expected)
    assert torch.equal(sta_mask(3, 4, 4, 11, 3, 3), Kandinsky5T2VPipeline.fast_sta_nabla(3, 4, 4, 11, 3, 3, device="cpu"))


def _map_from_scores(scores: torch.Tensor, p: float, method: str = "topcdf") -> torch.Tensor:
    """q, k whose block means give softmax(q̄·k̄ᵀ/sqrt(d)) = scores: one block of keys per row, 64 equal tokens."""
    n = scores.shape[-1]
    d = n
    q_blocks = torch.eye(n) * 1.0  # q̄_i = e_i
    k_blocks = torch.log(scores).T * (d**0.5)  # k̄_j[i] = log(scores[i, j])·sqrt(d)  → logits row i = log scores[i]
    q = q_blocks.repeat_interleave(64, 0)[None, :, None]
    k = k_blocks.repeat_interleave(64, 0)[None, :, None]
    return nabla_block_map(q, k, NablaParams(grid=(n, 8, 8), P=p, method=method, add_sta=False))[0, 0]


def test_top_cdf_keeps_the_smallest_set_covering_p():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.06, 0.04]])
    got = _map_from_scores(scores, 0.8)
    # Independent rule: drop ascending entries while their cumulative mass stays below 1 - P.
    expected = torch.zeros_like(scores, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        order = sorted(range(4), key=lambda j: row[j])
        dropped = 0.0
        for j in order:
            if dropped + row[j] < 1 - 0.8 - 1e-6:
                dropped += row[j]
            else:
                expected[i, j] = True
    assert torch.equal(got, expected)
    assert bool(_map_from_scores(scores, 1.0).all())
    assert _map_from_scores(scores, 0.5, method="topk").sum(-1).tolist() == [2, 2, 2, 2]


def test_block_map_equals_diffusers():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 64 * 12, 3, 16, generator=g), torch.randn(2, 64 * 12, 3, 16, generator=g)
    sta = sta_mask(3, 1, 4, 11, 3, 3)[None, None]
    ours = nabla_block_map(q, k, NablaParams(grid=(3, 8, 32), P=0.6, sta_mask=sta))
    bm = dk.nablaT_v2(q, k, sta, 0.6)
    theirs = torch.zeros_like(ours)
    slots = torch.arange(12)
    theirs.scatter_(-1, bm.full_kv_indices.long(), slots < bm.full_kv_num_blocks[..., None])
    assert torch.equal(ours, theirs)
    assert not bool(ours.all())


def test_block_mask_selects_exactly_the_map():
    keep = torch.rand(1, 2, 6, 6) > 0.5
    keep[..., torch.arange(6), torch.arange(6)] = True
    bm = block_mask_from_map(keep)
    assert torch.equal(bm.kv_num_blocks, torch.zeros(1, 2, 6, dtype=torch.int32))  # no partial blocks
    rebuilt = torch.zeros_like(keep)
    slots = torch.arange(6)
    rebuilt.scatter_(-1, bm.full_kv_indices.long(), slots < bm.full_kv_num_blocks[..., None])
    assert torch.equal(rebuilt, keep)
    assert bm.BLOCK_SIZE == (64, 64)


def test_geometry_errors_are_clear():
    with pytest.raises(UserError) as e:
        check_nabla_geometry((31, 60, 80))
    msg = str(e.value)
    assert "31x60x80" in msg and "128 px" in msg and "--nabla_resize" in msg
    check_nabla_geometry((31, 64, 96))  # 512x768 px is fine
    with pytest.raises(UserError, match="--nabla_resize"):
        build_sparse_params(get_task_config("k5-lite-t2v-10s-sd"), (1, 40, 64))


def test_build_sparse_params_task_defaults_and_overrides():
    dense = get_task_config("k5-lite-t2v-5s-sd")
    assert build_sparse_params(dense, (31, 64, 96)) is None
    forced = build_sparse_params(dense, (31, 64, 96), force_nabla=True)
    assert forced.P == 0.9 and forced.grid == (31, 32, 48) and forced.num_blocks == 31 * 4 * 6
    hd = get_task_config("k5-pro-t2v-10s-hd")
    assert build_sparse_params(hd, (5, 128, 128)).P == 0.7  # the task's own P, not a global 0.9
    assert build_sparse_params(hd, (5, 128, 128), nabla_p=0.95).P == 0.95
    sp = build_sparse_params(hd, (5, 128, 128))
    assert sp.sta_mask.shape == (1, 1, 5 * 64, 5 * 64) and sp.method == "topcdf" and sp.add_sta
