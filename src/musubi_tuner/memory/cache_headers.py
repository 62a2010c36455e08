"""Small readers of cache-file headers shared by the architectures' memory hooks (no tensor data is touched)."""

from __future__ import annotations

import math

import torch

from musubi_tuner.dataset.cache_format import batch_key

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def numel(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements of a tensor of ``shape``."""
    return math.prod(int(s) for s in shape)


def cache_entry(entries: dict[str, dict], name: str) -> dict | None:
    """The header entry (``dtype``, ``shape``) of the cache tensor whose batch key is ``name``, or None."""
    for key, e in entries.items():
        if batch_key(key)[0] == name:
            return e
    return None


def cache_dtype(entries: dict[str, dict], name: str) -> str:
    """The safetensors dtype name (``BF16``, ...) of the cache tensor ``name``; ``float32`` when it is absent."""
    e = cache_entry(entries, name)
    return e["dtype"] if e is not None else "float32"


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype from a safetensors (``BF16``) or torch (``bfloat16``) dtype name."""
    return getattr(torch, _SAFETENSORS_DTYPES.get(name, name))
