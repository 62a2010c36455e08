"""Live tensor bytes of a traced step: a dispatch-level tracker of storages (works on fake and real tensors).

Every storage produced by a dispatched op is counted once (views and in-place results share it) until Python frees
it (a weak reference on the storage). Tensors that exist before the traced code (weights, adapter parameters, the
batch) are registered with a category. Storages created while tracing are categorised by the phase they were created
in: ``forward`` (activations kept for backward and forward temporaries), ``backward`` (gradients and backward
temporaries), ``optimizer`` (optimizer state and step temporaries). The tracker keeps the global peak, the category
totals at that peak, per-phase peaks and the largest single storage.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_ALLOCATION_GRANULARITY = 512  # the CUDA caching allocator rounds every block up to 512 B


@dataclass
class TraceResult:
    """What a traced run allocated (bytes)."""

    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # category -> live bytes at the global peak
    phase_peaks: dict[str, int] = field(default_factory=dict)
    largest_tensor: int = 0
    largest_op: str = ""
    kept_block_inputs: list[int] = field(default_factory=list)  # per checkpointed block call (GC offload formula)


class LiveTensorTracker(TorchDispatchMode):
    """Count live storage bytes while active (``with tracker:``); ``round_to`` mimics an allocator's granularity."""

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = max(1, int(round_to))
        self.phase = "forward"
        self._live: dict[int, tuple[int, str]] = {}
        self._by_category: Counter[str] = Counter()
        self._current = 0
        self.result = TraceResult()

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    def _round(self, n: int) -> int:
        return -(-n // self.round_to) * self.round_to if n else 0

    def _add(self, storage: torch.UntypedStorage, category: str, op: str = "") -> None:
        key = id(storage)
        if key in self._live:
            return
        n = self._round(storage.nbytes())
        self._live[key] = (n, category)
        weakref.finalize(storage, self._free, key)
        self._by_category[category] += n
        self._current += n
        r = self.result
        if op and n > r.largest_tensor:
            r.largest_tensor, r.largest_op = n, op
        if self._current > r.phase_peaks.get(self.phase, 0):
            r.phase_peaks[self.phase] = self._current
        if self._current > r.peak:
            r.peak = self._current
            r.at_peak = {k: v for k, v in self._by_category.items() if v}

    def _free(self, key: int) -> None:
        n, category = self._live.pop(key, (0, ""))
        self._by_category[category] -= n
        self._current -= n

    def register(self, tensors: Any, category: str) -> None:
        """Count tensors that already exist (parameters, buffers, inputs) under ``category``."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), category)

    def register_module(self, module: torch.nn.Module, trainable: str = "trainable", frozen: str = "weights") -> None:
        """Parameters (split by ``requires_grad``) and buffers of ``module``."""
        for p in module.parameters():
            self.register(p, trainable if p.requires_grad else frozen)
        for b in module.buffers():
            self.register(b, frozen)

    def set_phase(self, phase: str) -> None:
        """Storages created from now on belong to ``phase``; its peak starts at the current live bytes."""
        self.phase = phase
        self.result.phase_peaks[phase] = max(self.result.phase_peaks.get(phase, 0), self._current)

    @property
    def current(self) -> int:
        """Live bytes now."""
        return self._current

    # -- dispatch ---------------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), self.phase, func.__name__)
        return out
