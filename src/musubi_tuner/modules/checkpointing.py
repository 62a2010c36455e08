"""Gradient checkpointing of transformer blocks, optionally with the saved activations in host memory.

With checkpointing only the inputs of each block are kept for the backward pass; the block is recomputed there.
With ``cpu_offload`` (``--gradient_checkpointing_cpu_offload``) those kept inputs live on the CPU: the positional
tensor arguments are copied to the host before the checkpoint, the checkpointed function copies them back to the
compute device, runs the block and returns its outputs on the compute device. Keyword arguments (RoPE tables,
masks, modulation vectors shared by all blocks) stay where they are — pass per-block activations positionally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

_observers: list[list[torch.device]] = []


@contextlib.contextmanager
def record_saved_activation_devices() -> Iterator[list[torch.device]]:
    """Record the devices of the activations that ``checkpoint_block`` keeps for recomputation.

    Appends the device of every kept tensor each time an offloaded block runs: in the forward pass and when it is
    recomputed in backward (the recomputation reads exactly the kept tensors). For diagnostics and tests.
    """
    seen: list[torch.device] = []
    _observers.append(seen)
    try:
        yield seen
    finally:
        _observers.remove(seen)


_kept_observers: list[list[int]] = []


@contextlib.contextmanager
def record_kept_input_bytes() -> Iterator[list[int]]:
    """Record, per checkpointed block call in forward, the bytes of the positional tensor inputs checkpointing keeps.

    These are what ``--gradient_checkpointing_cpu_offload`` moves to the host (the memory estimator's offload formula).
    """
    seen: list[int] = []
    _kept_observers.append(seen)
    try:
        yield seen
    finally:
        _kept_observers.remove(seen)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        mapped = [_map_tensors(o, fn) for o in obj]
        return type(obj)(mapped) if not hasattr(obj, "_fields") else type(obj)(*mapped)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _observe(t: torch.Tensor) -> torch.Tensor:
    for seen in _observers:
        seen.append(t.device)
    return t


class _OffloadedCall:
    """Moves host-resident inputs back to their compute devices, then runs the block."""

    def __init__(self, fn: Callable[..., Any], devices: list[torch.device]):
        self.fn = fn
        self.devices = devices

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        it = iter(self.devices)
        if _observers:
            _map_tensors(args, _observe)
        args = _map_tensors(args, lambda t: t.to(next(it), non_blocking=True))
        return self.fn(*args, **kwargs)


def checkpoint_block(fn: Callable[..., Any], *args: Any, enabled: bool, cpu_offload: bool = False, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``, checkpointed when ``enabled`` and gradients are being recorded.

    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; with ``cpu_offload`` the kept block inputs (the
    activations between blocks) are stored on the CPU, and the result is returned on the compute device.
    """
    if not enabled or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if _kept_observers:
        kept: list[int] = []
        _map_tensors(args, lambda t: kept.append(t.untyped_storage().nbytes()) or t)
        for seen in _kept_observers:
            seen.append(sum(kept))
    if not cpu_offload:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    devices: list[torch.device] = []

    def to_host(t: torch.Tensor) -> torch.Tensor:
        devices.append(t.device)
        return t.to("cpu")

    host_args = _map_tensors(args, to_host)
    return checkpoint(_OffloadedCall(fn, devices), *host_args, use_reentrant=False, **kwargs)


class GradientCheckpointingMixin:
    """Gradient-checkpointing switches of a DiT; its forward loop runs blocks through ``self._checkpointed``."""

    gradient_checkpointing: bool = False
    activation_cpu_offloading: bool = False

    def enable_gradient_checkpointing(self, activation_cpu_offloading: bool = False) -> None:
        """``--gradient_checkpointing`` (+ ``--gradient_checkpointing_cpu_offload``)."""
        self.gradient_checkpointing = True
        self.activation_cpu_offloading = activation_cpu_offloading

    def disable_gradient_checkpointing(self) -> None:
        """Turn checkpointing (and activation offloading) off."""
        self.gradient_checkpointing = False
        self.activation_cpu_offloading = False

    def _checkpointed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one block with this model's checkpointing settings."""
        return checkpoint_block(
            fn, *args, enabled=self.gradient_checkpointing, cpu_offload=self.activation_cpu_offloading, **kwargs
        )
