"""The dataset scan every architecture's ``step_shape`` hook starts with: the largest cached step, from headers only.

``largest_cached_step`` walks the training datasets' cached items, counts the distinct bucket shapes and returns the
item whose step is the largest (``batch_size × tokens``); ``longest_text_cache`` finds the longest caption of a
dataset in its text-encoder caches (the batch pads to it). No tensor data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from musubi_tuner.dataset.cache_format import batch_key, read_header
from musubi_tuner.memory.cache_headers import cache_entry, numel
from musubi_tuner.memory.hooks import StepShape
from musubi_tuner.utils.errors import UserError

_CONTROL = re.compile(r"^latents_control_(\d+)$")

Shape = tuple[int, ...]
Controls = tuple[tuple[Shape, str], ...]  # (shape, dtype) of each latents_control_{i}, in index order


@dataclass(frozen=True)
class LargestStep:
    """The largest cached training step: its dataset, item, latent-cache header, control latents and bucket count."""

    dataset: Any
    item: Any
    latent_shape: Shape
    entries: dict[str, dict]  # the item's latent-cache header
    controls: Controls
    buckets: int  # distinct bucket shapes (latent shape with the control shapes) over all training datasets

    def step_shape(self, text_len: int, details: dict[str, Any]) -> StepShape:
        """The ``StepShape`` of this step: its dataset's batch size, the latent shape and bucket count, plus these."""
        return StepShape(
            batch=self.dataset.batch_size, latent=self.latent_shape, text_len=int(text_len), buckets=self.buckets, details=details
        )


def control_latents(entries: dict[str, dict]) -> Controls:
    """``(shape, dtype)`` of every ``latents_control_{i}`` in a latent-cache header, ordered by ``i``."""
    found = sorted(
        (int(m.group(1)), tuple(int(s) for s in e["shape"]), e["dtype"])
        for k, e in entries.items()
        if (m := _CONTROL.match(batch_key(k)[0]))
    )
    return tuple((shape, dtype) for _, shape, dtype in found)


def largest_cached_step(
    datasets: Iterable[Any],
    tokens: Callable[[Shape, Controls], int] | None = None,
    *,
    with_controls: bool = False,
    missing: str,
) -> LargestStep:
    """The item with the largest ``dataset.batch_size × tokens(latent_shape, controls)`` over ``datasets``.

    ``tokens`` defaults to the latent's element count. ``with_controls`` reads every item's latent-cache header for its
    control latents (they then count in ``tokens`` and in the bucket shapes); otherwise only the largest item's header
    is read. Items without a cached latent are skipped; when none is cached, ``missing`` is raised as a ``UserError``.
    """
    size_of = tokens or (lambda shape, controls: numel(shape))
    best = None
    buckets = set()
    for ds in datasets:
        for item in ds.items:
            if item.latent_shape is None:
                continue
            shape = tuple(int(s) for s in item.latent_shape)
            entries = read_header(item.latent_path)[0] if with_controls else None
            controls = control_latents(entries) if with_controls else ()
            buckets.add((shape, tuple(c[0] for c in controls)))
            size = ds.batch_size * size_of(shape, controls)
            if best is None or size > best[0]:
                best = (size, ds, item, shape, entries, controls)
    if best is None:
        raise UserError(missing)
    _, ds, item, shape, entries, controls = best
    if entries is None:
        entries = read_header(item.latent_path)[0]
    return LargestStep(ds, item, shape, entries, controls, len(buckets))


def longest_text_cache(items: Iterable[Any], key: str, missing: str, also: tuple[str, ...] = ()) -> dict[str, dict]:
    """The text-cache header, over ``items``, whose tensor ``key`` has the most tokens (``shape[-2]``; first wins ties).

    Every cache must hold ``key`` and the ``also`` tensors: ``missing`` (formatted with ``path=`` the text-cache file)
    is raised as a ``UserError`` otherwise, and when there are no items.
    """
    longest, most = None, -1
    for item in items:
        entries, _ = read_header(item.te_path)
        if any(cache_entry(entries, k) is None for k in (key, *also)):
            raise UserError(missing.format(path=item.te_path))
        tokens = int(cache_entry(entries, key)["shape"][-2])
        if tokens > most:
            longest, most = entries, tokens
    if longest is None:
        raise UserError(missing.format(path="(no cached items)"))
    return longest
