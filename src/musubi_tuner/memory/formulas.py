"""Closed-form memory terms for what a dispatch trace cannot see (specs/memory_estimator.md §8).

Every constant marked "calibrate" in the spec lives in ``Calibration``; ``bench/memory_calibration.py`` measures them
on a GPU. Until a measured table ships, ``DEFAULT_CALIBRATION`` is used and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Calibration:
    """Constants of §8 that only a GPU run can measure."""

    source: str = "default constants"
    cuda_context: int = 600 * MiB  # §8.1: driver + kernels after the first ops
    cublas_workspace: int = 32 * MiB  # §8.2: one handle's workspace (Hopper default :4096:8)
    attention_dq_coefficient: float = 1.0  # §8.2: x 4·B·H·L·d bytes (fp32 dQ accumulator) in attention backward
    slack: float = 0.10  # §8.8: reserved / allocated - 1
    slack_expandable_segments: float = 0.03
    multi_bucket_slack: float = 0.05  # §11: extra fragmentation when the dataset has several bucket shapes
    host_runtime: int = int(1.5 * GiB)  # §8.9: CUDA runtime + libraries mapped in the host process
    worker_rss: int = 300 * MiB  # §8.9: one DataLoader worker

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


DEFAULT_CALIBRATION = Calibration()


def swappable_weight_bytes(block: nn.Module) -> int:
    """Bytes block swap keeps on the host for one block: the ``.weight`` of every frozen Linear-like submodule
    (the same selection as ``modules.offloading``; biases, norms, buffers and adapters stay on the device)."""
    total = 0
    for module in block.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and type(module).__name__.endswith("Linear") and not w.requires_grad:
            total += w.numel() * w.element_size()
    return total


def block_swap_saved(model: nn.Module, blocks_to_swap: int, training: bool) -> tuple[int, int, list[int]]:
    """§8.3: ``(device bytes saved, largest swapped block's bytes, blocks swapped per list)`` for ``--blocks_to_swap``.

    The model's own ``_split_blocks_to_swap`` decides how many of the *last* blocks of each list are offloaded. Swaps
    exchange storages with the outgoing block, so nothing is added on the device.
    """
    if blocks_to_swap <= 0:
        return 0, 0, []
    lists = model._block_lists()
    split = model._split_blocks_to_swap(blocks_to_swap, training=training)
    saved, largest = 0, 0
    for blocks, n in zip(lists, split):
        for block in list(blocks)[len(blocks) - n :] if n else []:
            b = swappable_weight_bytes(block)
            saved += b
            largest = max(largest, b)
    return saved, largest, list(split)


def max_blocks_to_swap(model: nn.Module, training: bool) -> int:
    """The largest useful ``--blocks_to_swap`` of a block-swap DiT (its own ``max_blocks_to_swap``: the number the
    trainer's and generator's clamp warning names)."""
    return int(model.max_blocks_to_swap(training))


def activation_offload_saved(kept_inputs: Iterable[int]) -> int:
    """§8.4: ``--gradient_checkpointing_cpu_offload`` moves every kept block input to the host; one comes back for
    the block being recomputed. Returns the device bytes saved (= Σ kept − max kept)."""
    kept = list(kept_inputs)
    return sum(kept) - max(kept) if kept else 0


def attention_workspace(batch: int, heads: int, tokens: int, head_dim: int, backward: bool, calibration: Calibration) -> int:
    """§8.2: flash-style attention backward allocates an fp32 dQ accumulator (4·B·H·L·d bytes) inside the kernel;
    forward-only needs O(B·H·L) fp32 rows."""
    if backward:
        return int(calibration.attention_dq_coefficient * 4 * batch * heads * tokens * head_dim)
    return 4 * batch * heads * tokens


def bnb_8bit_state_bytes(param_numels: Iterable[int]) -> int:
    """§8.6: bitsandbytes 8-bit Adam states: uint8 state1/state2 + fp32 absmax per 256-element block + two 256-entry
    qmaps per tensor of >= 4096 elements; smaller tensors keep fp32 states (8 B/element)."""
    total = 0
    for n in param_numels:
        if n >= 4096:
            total += 2 * n + 8 * math.ceil(n / 256) + 2 * 1024
        else:
            total += 8 * n
    return total


def allocator_slack(allocated: int, calibration: Calibration, expandable_segments: bool, several_buckets: bool) -> int:
    """§8.8 / §11: reserved − allocated of the caching allocator."""
    f = calibration.slack_expandable_segments if expandable_segments else calibration.slack
    if several_buckets:
        f += calibration.multi_bucket_slack
    return int(allocated * f)


def round_up(n: int, granularity: int = 512) -> int:
    """``n`` rounded up to the allocator granularity."""
    return -(-n // granularity) * granularity
