"""Block swap: keep only part of a DiT's transformer blocks on the accelerator and stream the rest.

Classic schedule (specs/training.md §15.2), for a block list of N blocks with S swapped:

- Before forward, blocks ``0 .. N-S-1`` are resident; blocks ``N-S .. N-1`` keep buffers and non-Linear parameters
  on the device but their frozen Linear weights on the offload device (CPU).
- A swap *exchanges* the ``.data`` of matching Linear weights (same name, shape, dtype) between the outgoing and the
  incoming block: the outgoing weights go device→host while the incoming go host→device into the reused device buffer.
- Training forward: after block ``i < S``, swap block ``i`` out and ``N-S+i`` in. Training backward (full backward
  hooks): with ``p = N-i-1`` blocks back-propagated, the hook of block ``i`` swaps block ``i+1`` out and ``S-p`` in
  when ``0 < p <= S``, and waits for block ``i-1`` when ``0 < i <= S``. Forward + backward restore the initial state.
- Inference: if ``S < N/2`` only the first and last S blocks rotate (``prepare_block_devices_before_forward``
  restores the layout before the next forward); otherwise the wrap-around ``i -> (N-S+i) mod N`` returns to the
  initial layout by itself.

Trainable parameters (LoRA adapters placed inside a block) are never swapped: their gradients live on the device.
On CUDA the copies run on a dedicated stream driven by a single-worker thread pool, through pinned staging buffers
(or directly from pinned host weights with ``use_pinned_memory``); an event makes the compute stream wait. Elsewhere
the same schedule runs synchronously. Every block has a residency flag; ``wait_for_block`` raises if the schedule
ever hands a non-resident block to the compute loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

DEBUG_ENV = "MUSUBI_TUNER_OFFLOADER_DEBUG"


@dataclass
class BlockSwapConfig:
    """Settings of block swap.

    Attributes:
        device: the compute device (blocks run there).
        supports_backward: register backward hooks (training); inference offloaders run forward-only.
        use_pinned_memory: keep offloaded weights in pinned host memory (``--use_pinned_memory_for_block_swap``).
        h2d_only: the H2D-only ring buffer (``--block_swap_h2d_only``); not available in this version.
        ring_size: ring slots of the H2D-only mode (``--block_swap_ring_size``, >= 1).
        debug: record the schedule in ``ModelOffloader.events`` and log it (also ``MUSUBI_TUNER_OFFLOADER_DEBUG=1``).
        offload_device: where offloaded weights live (the host). Tests may point it elsewhere; never ``meta``.
        allow_linear_compile: do not wrap the Linear forwards of swapped blocks in ``torch._dynamo.disable``
            (``--allow_linear_for_compile``); by default compiled graphs never capture swapped weights.
    """

    device: torch.device | str
    supports_backward: bool
    use_pinned_memory: bool = False
    h2d_only: bool = False
    ring_size: int = 2
    debug: bool = False
    offload_device: torch.device | str = "cpu"
    allow_linear_compile: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.offload_device = torch.device(self.offload_device)
        if self.offload_device.type == "meta":
            raise ValueError("the meta device holds no data and cannot be used as the block-swap offload device")
        if self.ring_size < 1:
            raise UserError(f"--block_swap_ring_size must be >= 1, got {self.ring_size}")
        if self.h2d_only:
            raise UserError(
                "--block_swap_h2d_only (H2D-only ring buffer) is not available in this version; use the classic block swap"
            )
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            self.debug = True


def _swappable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like submodules whose frozen weight block swap moves (name -> module)."""
    out = {}
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(module).__name__.endswith("Linear") and not weight.requires_grad:
            out[name] = module
    return out


def _swappable_weight_ids(block: nn.Module) -> set[int]:
    return {id(m.weight) for m in _swappable_linears(block).values()}


class _CudaMover:
    """Device-host exchanges on a side stream with reusable pinned staging buffers (CUDA only)."""

    def __init__(self, device: torch.device, use_pinned_memory: bool):
        self.device = device
        self.use_pinned_memory = use_pinned_memory
        self.stream = torch.cuda.Stream(device=device)
        self._staging: dict[tuple[torch.Size, torch.dtype], list[torch.Tensor]] = {}

    def _take(self, like: torch.Tensor) -> torch.Tensor:
        pool = self._staging.setdefault((like.shape, like.dtype), [])
        return pool.pop() if pool else torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def _give(self, t: torch.Tensor) -> None:
        self._staging.setdefault((t.shape, t.dtype), []).append(t)

    def exchange(self, pairs: list[tuple[nn.Module, nn.Module]], ready: torch.cuda.Event) -> torch.cuda.Event:
        """For (outgoing, incoming) module pairs, swap weight storages; returns an event recorded after the copies."""
        jobs = []
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)  # the compute stream is done with the outgoing block
            for out_mod, in_mod in pairs:
                dev_buf, host_in = out_mod.weight.data, in_mod.weight.data
                d2h = self._take(dev_buf)
                d2h.copy_(dev_buf, non_blocking=True)
                if self.use_pinned_memory:
                    dev_buf.copy_(host_in, non_blocking=True)  # host_in is pinned: truly asynchronous
                    h2d = None
                else:
                    h2d = self._take(host_in)
                    h2d.copy_(host_in)  # pageable -> pinned on the host, then an async upload
                    dev_buf.copy_(h2d, non_blocking=True)
                jobs.append((out_mod, in_mod, dev_buf, host_in, d2h, h2d))
            self.stream.synchronize()
        for out_mod, in_mod, dev_buf, host_in, d2h, h2d in jobs:
            in_mod.weight.data = dev_buf
            if self.use_pinned_memory:
                out_mod.weight.data = d2h  # the pinned staging tensor becomes the host copy ...
                self._give(host_in)  # ... and the old pinned host tensor becomes a staging buffer
            else:
                host_in.copy_(d2h)  # reuse the incoming block's pageable host storage
                out_mod.weight.data = host_in
                self._give(d2h)
                self._give(h2d)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done


class ModelOffloader:
    """Classic block swap for one ``nn.ModuleList`` (see the module docstring for the schedule)."""

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, config: BlockSwapConfig, name: str = "blocks"):
        n = len(blocks)
        limit = n - 2 if config.supports_backward else n - 1
        if blocks_to_swap < 0 or blocks_to_swap > max(limit, 0):
            raise UserError(
                f"--blocks_to_swap: {blocks_to_swap} blocks of {name} cannot be swapped; "
                f"at most {max(limit, 0)} of its {n} blocks ({'training' if config.supports_backward else 'inference'})"
            )
        self.blocks = blocks
        self.num_blocks = n
        self.blocks_to_swap = blocks_to_swap
        self.config = config
        self.device: torch.device = config.device  # type: ignore[assignment]
        self.offload_device: torch.device = config.offload_device  # type: ignore[assignment]
        self.name = name
        self.forward_only = not config.supports_backward
        self.debug = config.debug
        self.events: list[tuple[Any, ...]] = []
        self.resident = [True] * n
        self._laid_out = False  # set once prepare_block_devices_before_forward has placed every tensor
        self._lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._cuda_events: dict[int, torch.cuda.Event] = {}
        self._use_cuda = self.device.type == "cuda" and self.offload_device.type == "cpu"
        self._mover = _CudaMover(self.device, config.use_pinned_memory) if self._use_cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1) if self._use_cuda else None
        if config.use_pinned_memory and not self._use_cuda:
            logger.info("block swap: pinned memory only applies to CUDA devices; ignored on %s", self.device)
        self._hook_handles: list[Any] = []
        if config.supports_backward and blocks_to_swap > 0:
            for i, block in enumerate(blocks):
                hook = self._create_backward_hook(i)
                if hook is not None:
                    self._hook_handles.append(block.register_full_backward_hook(hook))
                if self.debug:
                    self._hook_handles.append(block.register_full_backward_pre_hook(self._make_backward_pre_check(i)))

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _record(self, *event: Any) -> None:
        if self.debug:
            with self._lock:
                self.events.append(event)
            logger.info("block swap [%s]: %s", self.name, " ".join(str(e) for e in event))

    def _make_backward_pre_check(self, i: int) -> Callable:
        def pre_hook(module, grad_output):
            self._record("backward", i)
            if not self.forward_only and not self.resident[i]:
                raise RuntimeError(f"block swap schedule error: backward of {self.name}[{i}] while it is offloaded")
            return None

        return pre_hook

    # -- moves -------------------------------------------------------------------------------------------------

    def _pairs(self, out_block: nn.Module, in_block: nn.Module) -> tuple[list, list, list]:
        outs, ins = _swappable_linears(out_block), _swappable_linears(in_block)
        pairs, lone_in, lone_out = [], [], []
        for name, in_mod in ins.items():
            out_mod = outs.get(name)
            placed = self.device == self.offload_device or (
                out_mod is not None and out_mod.weight.device == self.device and in_mod.weight.device != self.device
            )
            if (
                out_mod is not None
                and placed
                and out_mod.weight.shape == in_mod.weight.shape
                and out_mod.weight.dtype == in_mod.weight.dtype
            ):
                pairs.append((out_mod, in_mod))
            else:
                lone_in.append(in_mod)
        paired_out = {id(o) for o, _ in pairs}
        lone_out = [m for m in outs.values() if id(m) not in paired_out]
        return pairs, lone_in, lone_out

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.offload_device)
        if self.config.use_pinned_memory and self._use_cuda and not t.is_pinned():
            t = t.pin_memory()
        return t

    def _swap(self, out_idx: int, in_idx: int, ready: torch.cuda.Event | None) -> None:
        out_block, in_block = self.blocks[out_idx], self.blocks[in_idx]
        pairs, lone_in, lone_out = self._pairs(out_block, in_block)
        for m in lone_out:
            m.weight.data = self._host(m.weight.data)
        for m in lone_in:
            m.weight.data = m.weight.data.to(self.device)
        if self._mover is not None and pairs:
            self._cuda_events[in_idx] = self._mover.exchange(pairs, ready)
        else:
            for out_mod, in_mod in pairs:
                dev_buf, host_in = out_mod.weight.data, in_mod.weight.data
                host_out = dev_buf.to(self.offload_device, copy=True)
                dev_buf.copy_(host_in)
                in_mod.weight.data = dev_buf
                out_mod.weight.data = host_out
        with self._lock:
            self.resident[out_idx] = False
            self.resident[in_idx] = True

    def _submit_move_blocks(self, out_idx: int, in_idx: int) -> None:
        self._record("swap", out_idx, in_idx)
        if self._pool is None:
            self._swap(out_idx, in_idx, None)
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self._futures[in_idx] = self._pool.submit(self._swap, out_idx, in_idx, ready)

    def _wait_blocks_move(self, i: int) -> None:
        future = self._futures.pop(i, None)
        if future is not None:
            future.result()
        event = self._cuda_events.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if not self.resident[i]:
            raise RuntimeError(f"block swap schedule error: {self.name}[{i}] is not on {self.device} when it is needed")
        if self.debug:
            for m in _swappable_linears(self.blocks[i]).values():
                if m.weight.device != self.device:
                    raise RuntimeError(f"block swap: a weight of {self.name}[{i}] is on {m.weight.device}, not {self.device}")

    # -- public schedule ---------------------------------------------------------------------------------------

    def set_forward_only(self, forward_only: bool) -> None:
        """Inference (forward-only, no backward hooks active) or training schedule."""
        self.forward_only = forward_only

    def wait_for_block(self, block_idx: int) -> None:
        """Block until block ``block_idx`` is resident on the device (call before running it)."""
        if self.blocks_to_swap == 0:
            return
        if not self._laid_out:
            raise RuntimeError("block swap: call prepare_block_swap_before_forward() before the first forward")
        self._record("wait", block_idx)
        self._wait_blocks_move(block_idx)

    def submit_move_blocks_forward(self, blocks: nn.ModuleList, block_idx: int) -> None:
        """Schedule the swap that follows block ``block_idx`` in the forward pass (call after running it)."""
        if blocks is not self.blocks:
            raise ValueError(f"submit_move_blocks_forward got a different block list than {self.name}")
        s, n = self.blocks_to_swap, self.num_blocks
        if s == 0:
            return
        wrap_around = self.forward_only and s >= n / 2
        if not wrap_around and block_idx >= s:
            return
        self._submit_move_blocks(block_idx, (n - s + block_idx) % n)

    def _create_backward_hook(self, block_idx: int) -> Callable | None:
        n, s = self.num_blocks, self.blocks_to_swap
        propagated = n - block_idx - 1
        swapping = 0 < propagated <= s
        waiting = 0 < block_idx <= s
        if not swapping and not waiting:
            return None
        idx_to_host, idx_to_device, idx_to_wait = block_idx + 1, s - propagated, block_idx - 1

        def backward_hook(module, grad_input, grad_output):
            if self.forward_only:
                return None
            if swapping:
                self._submit_move_blocks(idx_to_host, idx_to_device)
            if waiting:
                self._record("wait", idx_to_wait)
                self._wait_blocks_move(idx_to_wait)
            return None

        return backward_hook

    def prepare_block_devices_before_forward(self, blocks: nn.ModuleList) -> None:
        """Lay the blocks out for the start of a forward pass: ``0..N-S-1`` resident, the rest offloaded."""
        if blocks is not self.blocks:
            raise ValueError(f"prepare_block_devices_before_forward got a different block list than {self.name}")
        first_offloaded = self.num_blocks - self.blocks_to_swap
        if not self._futures and self._laid_out and self.resident == [i < first_offloaded for i in range(self.num_blocks)]:
            return  # already in the initial layout (e.g. after a training forward + backward, or a wrap-around pass)
        self._drain()
        self._record("prepare")
        for i, block in enumerate(blocks):
            offload = i >= first_offloaded
            swap_ids = _swappable_weight_ids(block) if offload else set()
            for module in block.modules():
                for p in module._parameters.values():
                    if p is None:
                        continue
                    if id(p) in swap_ids:
                        if p.device != self.offload_device or (self.config.use_pinned_memory and self._use_cuda):
                            p.data = self._host(p.data)
                    elif p.device != self.device:
                        p.data = p.data.to(self.device)
                for key, b in module._buffers.items():
                    if b is not None and b.device != self.device:
                        module._buffers[key] = b.to(self.device)
            self.resident[i] = not offload
        self._laid_out = True
        if self._use_cuda:
            torch.cuda.synchronize(self.device)

    def _drain(self) -> None:
        for i in list(self._futures):
            self._futures.pop(i).result()
        self._cuda_events.clear()
        if self._use_cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Remove the hooks and stop the worker thread (block swap disabled)."""
        self._drain()
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _disable_dynamo_on_linears(blocks: nn.ModuleList) -> None:
    """Wrap Linear forwards so torch.compile never captures swapped weights (they change storage between calls)."""
    for block in blocks:
        for module in block.modules():
            if type(module).__name__.endswith("Linear") and not getattr(module, "_block_swap_dynamo_disabled", False):
                module.forward = torch._dynamo.disable(module.forward)
                module._block_swap_dynamo_disabled = True


class BlockSwapMixin:
    """The block-swap model contract for a DiT (``nn.Module`` subclass).

    A model provides ``_block_lists()`` and may override ``_split_blocks_to_swap(n, training)``; its forward loop calls
    ``self._before_block(list_idx, i)`` before and ``self._after_block(list_idx, i)`` after block ``i`` of list
    ``list_idx`` (both are no-ops while block swap is off).
    """

    blocks_to_swap: int = 0
    offloaders: list[ModelOffloader | None] | None = None

    def _block_lists(self) -> list[nn.ModuleList]:
        raise NotImplementedError("a DiT using BlockSwapMixin must implement _block_lists()")

    def _split_blocks_to_swap(self, num_blocks: int, training: bool = False) -> list[int]:
        """How many blocks each list swaps; default: all to the last (the main transformer) list.

        ``training`` is True when the offloader will run backward too (each list can then swap at most N - 2).
        """
        counts = [0] * len(self._block_lists())
        counts[-1] = num_blocks
        return counts

    def enable_block_swap(self, num_blocks: int, config: BlockSwapConfig) -> None:
        """Enable block swap of ``num_blocks`` blocks (``--blocks_to_swap``), split over the block lists.

        More blocks than the model can swap (each list keeps at least 2 blocks resident in training, 1 in inference, and
        the model's split may keep more) are clamped to the maximum with a warning naming it; ``blocks_to_swap`` is then
        the number actually swapped (0 turns block swap off).
        """
        self.disable_block_swap()
        if num_blocks < 0:
            raise UserError(f"--blocks_to_swap must be >= 0, got {num_blocks}")
        lists = self._block_lists()
        training = config.supports_backward
        counts = self._clamped_split(num_blocks, training)
        if len(counts) != len(lists):
            raise ValueError(f"_split_blocks_to_swap returned {len(counts)} counts for {len(lists)} block lists")
        if sum(counts) < num_blocks:
            maximum = sum(self._clamped_split(sum(len(b) for b in lists), training))
            logger.warning(
                f"--blocks_to_swap {num_blocks}: this model can swap at most {maximum} blocks when "
                f"{'training' if training else 'generating'} (block lists of {[len(b) for b in lists]}); "
                + (f"swapping {sum(counts)}" if sum(counts) else "block swap is off")
            )
        self.blocks_to_swap = sum(counts)
        self.block_swap_config = config
        self.offloaders = []
        for idx, (blocks, count) in enumerate(zip(lists, counts)):
            if count == 0:
                self.offloaders.append(None)
                continue
            self.offloaders.append(ModelOffloader(blocks, count, config, name=f"{type(self).__name__}.list{idx}"))
            if not config.allow_linear_compile:
                _disable_dynamo_on_linears(blocks)
        logger.info("block swap: %s of the blocks %s swapped", counts, [len(b) for b in lists])

    def max_blocks_to_swap(self, training: bool) -> int:
        """The largest ``--blocks_to_swap`` that swaps more than a smaller count would (the estimator's and the
        trainers' maximum; models whose count is not a block count, like FLUX.2's, override it)."""
        best, most = 0, 0
        for n in range(1, sum(len(b) for b in self._block_lists()) + 1):
            swapped = sum(self._clamped_split(n, training))
            if swapped > most:
                best, most = n, swapped
        return best

    def _clamped_split(self, num_blocks: int, training: bool) -> list[int]:
        """``_split_blocks_to_swap`` with each count capped at what ``ModelOffloader`` accepts for its list."""
        counts = self._split_blocks_to_swap(num_blocks, training=training)
        keep = 2 if training else 1
        return [max(0, min(c, len(b) - keep)) for c, b in zip(counts, self._block_lists())] + list(
            counts[len(self._block_lists()) :]
        )

    def disable_block_swap(self) -> None:
        """Turn block swap off (hooks removed); call ``to(device)`` afterwards to put every block back."""
        for off in self.offloaders or []:
            if off is not None:
                off.close()
        self.offloaders = None
        self.blocks_to_swap = 0

    def move_to_device_except_swap_blocks(self, device: torch.device | str) -> None:
        """Move everything except the block lists that swap blocks (their layout is set by prepare)."""
        device = torch.device(device)
        skip: set[int] = set()
        for blocks, off in zip(self._block_lists(), self.offloaders or []):
            if off is not None:
                skip.update(id(m) for m in blocks.modules())
        for module in self.modules():  # type: ignore[attr-defined]
            if id(module) in skip:
                continue
            for p in module._parameters.values():
                if p is not None and p.device != device:
                    p.data = p.data.to(device)
            for key, b in module._buffers.items():
                if b is not None and b.device != device:
                    module._buffers[key] = b.to(device)

    def prepare_block_swap_before_forward(self) -> None:
        """Lay out every swapped list for the start of a forward pass."""
        for blocks, off in zip(self._block_lists(), self.offloaders or []):
            if off is not None:
                off.prepare_block_devices_before_forward(blocks)

    def switch_block_swap_for_inference(self) -> None:
        """Forward-only schedule (sampling during training, generation); re-lays out the blocks."""
        for off in self.offloaders or []:
            if off is not None:
                off.set_forward_only(True)
        self.prepare_block_swap_before_forward()

    def switch_block_swap_for_training(self) -> None:
        """Training schedule with backward hooks; re-lays out the blocks."""
        for off in self.offloaders or []:
            if off is not None:
                if not off.config.supports_backward:
                    raise ValueError("this block swap was enabled for inference (supports_backward=False)")
                off.set_forward_only(False)
        self.prepare_block_swap_before_forward()

    def _before_block(self, list_idx: int, block_idx: int) -> None:
        if self.offloaders and self.offloaders[list_idx] is not None:
            self.offloaders[list_idx].wait_for_block(block_idx)

    def _after_block(self, list_idx: int, block_idx: int) -> None:
        if self.offloaders and self.offloaders[list_idx] is not None:
            off = self.offloaders[list_idx]
            off.submit_move_blocks_forward(off.blocks, block_idx)
