"""Batching: bucket-keyed batch plans with per-epoch shuffling, stratified timestep pools, batch assembly."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch

from musubi_tuner.dataset.cache_format import batch_key
from musubi_tuner.utils.errors import UserError


def pad_varlen(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad variable-length tensors ``(L_i, ...)`` to ``(B, L_max, ...)`` with zeros; mask ``(B, L_max)`` True = valid."""
    if not tensors:
        raise ValueError("pad_varlen needs at least one tensor")
    lmax = max(int(t.shape[0]) for t in tensors)
    first = tensors[0]
    padded = first.new_zeros((len(tensors), lmax, *first.shape[1:]))
    mask = torch.zeros((len(tensors), lmax), dtype=torch.bool, device=first.device)
    for i, t in enumerate(tensors):
        if t.shape[1:] != first.shape[1:]:
            raise ValueError(f"pad_varlen: trailing shapes differ: {tuple(first.shape)} vs {tuple(t.shape)}")
        padded[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return padded, mask


def assemble_batch(items: Sequence[dict[str, torch.Tensor]], files: Sequence[str | Path] = ()) -> dict[str, object]:
    """Merge per-item cache dicts into a batch (spec §6.4): non-varlen values stacked, ``varlen_`` values as lists."""
    names: dict[str, tuple[str, bool]] = {}
    for key in items[0]:
        name, varlen = batch_key(key)
        names[key] = (name, varlen)
    for i, item in enumerate(items[1:], start=1):
        extra = sorted(set(item) - set(names))
        if extra:
            who = files[i] if i < len(files) else f"item {i}"
            raise UserError(
                f"{who}: cache key {extra[0]!r} is not in the other items of the batch (caches of different kinds, e.g. "
                "one-frame and video, in one bucket); re-run caching so the dataset's caches agree"
            )
    batch: dict[str, object] = {}
    for key, (name, varlen) in names.items():
        values = []
        for i, item in enumerate(items):
            if key not in item:
                who = files[i] if i < len(files) else f"item {i}"
                raise UserError(f"{who}: cache key {key!r} missing (present in the other items of the batch); re-run caching")
            values.append(item[key])
        if varlen:
            batch[name] = values
        else:
            try:
                batch[name] = torch.stack(values)
            except RuntimeError:
                shapes = ", ".join(f"{files[i] if i < len(files) else i}: {tuple(v.shape)}" for i, v in enumerate(values))
                raise UserError(f"cache tensors {key!r} differ in shape within one batch ({shapes}); re-run caching") from None
    return batch


class BatchPlan:
    """Items grouped by a hashable batch key; each item repeated ``num_repeats`` times; whole batches per key.

    ``build(rng)`` shuffles the items inside every bucket and the batch order with ``rng``; without it the order
    is the (sorted) insertion order. Every build starts from the insertion order, so an epoch's order depends only
    on its own ``rng`` (a resumed run rebuilds epoch N without replaying epochs 1..N-1).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._inserted: dict[Hashable, list[int]] = {}
        self.buckets: dict[Hashable, list[int]] = {}
        self.batches: list[tuple[Hashable, int]] = []

    def add(self, key: Hashable, item: int, num_repeats: int = 1) -> None:
        self._inserted.setdefault(key, []).extend([item] * num_repeats)
        self.buckets.setdefault(key, []).extend([item] * num_repeats)

    def build(self, rng: random.Random | None = None) -> None:
        """(Re)build the batch list, shuffling inside buckets and the batch order when ``rng`` is given."""
        self.batches = []
        self.buckets = {}
        for key in sorted(self._inserted, key=repr):
            members = list(self._inserted[key])
            if rng is not None:
                rng.shuffle(members)
            self.buckets[key] = members
            self.batches.extend((key, start) for start in range(0, len(members), self.batch_size))
        if rng is not None:
            rng.shuffle(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, i: int) -> list[int]:
        key, start = self.batches[i]
        return self.buckets[key][start : start + self.batch_size]

    @property
    def num_items(self) -> int:
        return sum(len(v) for v in self.buckets.values())


def stratified_pool(num_samples: int, num_buckets: int, rng: random.Random) -> list[float]:
    """``num_samples`` uniforms with (as nearly as possible) equal counts in each ``[k/K, (k+1)/K)``, shuffled.

    When ``num_samples`` is not a multiple of ``K`` the remainder goes to randomly chosen distinct strata.
    """
    base, extra = divmod(num_samples, num_buckets)
    counts = [base] * num_buckets
    for k in rng.sample(range(num_buckets), extra):
        counts[k] += 1
    pool = []
    for k, c in enumerate(counts):
        upper = (k + 1) / num_buckets
        # (k + r) / K can round up to the next stratum's edge in floating point; keep it inside [k/K, (k+1)/K)
        pool.extend(min((k + rng.random()) / num_buckets, upper - 1e-12) for _ in range(c))
    rng.shuffle(pool)
    return pool
