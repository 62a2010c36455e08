"""Sharded training of the frozen DiT with torch FSDP2 (``fully_shard``), requested through an accelerate FSDP config.

``accelerate launch --config_file configs/accelerate_fsdp2.yaml`` (or ``torchrun`` with ``ACCELERATE_USE_FSDP=true
FSDP_VERSION=2``) exports the ``FSDP_*`` settings. The trainer reads them here and shards the frozen DiT itself: one
``fully_shard`` group per transformer block (the model's ``_block_lists()``, the same lists block swap uses) plus a
root group for the rest, resharded after forward. The adapter is not part of the sharded model: LoRA/LoHa
parameters are small, replicated on every process and averaged by the trainer's one all-reduce per step, so saved
LoRAs and states are exactly those of a one-process run.

Why not ``accelerator.prepare(dit)``: accelerate's FSDP path shards the *trained* model together with its optimizer
and only engages for GPU-like distributed types (specs/training.md §13: on CPU it silently runs unsharded). Calling
``fully_shard`` from this shared layer gives one code path on CPU (gloo, tested in CI) and GPU (nccl), with the
model's own block lists as the wrap policy, so every architecture gets sharding without FSDP code of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

FSDP_ENV = "ACCELERATE_USE_FSDP"


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "y", "on")


@dataclass(frozen=True)
class ShardingConfig:
    """The FSDP settings of an accelerate config (exported by ``accelerate launch`` as environment variables)."""

    version: int = 2
    reshard_after_forward: bool = True
    offload_params: bool = False
    activation_checkpointing: bool = False
    wrap_classes: str = ""  # fsdp_transformer_layer_cls_to_wrap: ignored, the model's block lists are the policy

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ShardingConfig | None:
        """The requested sharding, or None when no FSDP config is active (``ACCELERATE_USE_FSDP`` not true)."""
        env = os.environ if env is None else env
        if not _flag(env, FSDP_ENV, False):
            return None
        raw_version = env.get("FSDP_VERSION", "1") or "1"
        try:
            version = int(raw_version)
        except ValueError:
            raise UserError(f"FSDP_VERSION={raw_version!r}: expected 2 (fsdp_version: 2 in the accelerate config)") from None
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().upper()
        return cls(
            version=version,
            # FSDP1 strategy names may still be in an edited config: FULL_SHARD means reshard, the others do not
            reshard_after_forward=reshard in ("TRUE", "1", "YES", "FULL_SHARD", "HYBRID_SHARD"),
            offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS", False),
            activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING", False),
            wrap_classes=env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", ""),
        )


def check_sharding_request(
    config: ShardingConfig, args: Any, *, cuda_available: bool, env: Mapping[str, str] | None = None
) -> None:
    """Start-up errors for sharding requests that cannot engage (never a silent fallback to unsharded training)."""
    env = os.environ if env is None else env
    if config.version != 2:
        raise UserError(
            f"the accelerate config asks for FSDP version {config.version}; only FSDP2 is supported: set "
            "fsdp_version: 2 (see configs/accelerate_fsdp2.yaml)"
        )
    if getattr(args, "blocks_to_swap", 0):
        raise UserError(
            f"--blocks_to_swap {args.blocks_to_swap} cannot be combined with FSDP sharding: swapped blocks live in host "
            "memory outside the sharded groups. Use sharding (more processes) or block swap, not both"
        )
    if getattr(args, "block_swap_h2d_only", False) or getattr(args, "use_pinned_memory_for_block_swap", False):
        raise UserError(
            "block swap options cannot be combined with FSDP sharding (drop --block_swap_h2d_only / --use_pinned_memory_for_block_swap)"
        )
    if getattr(args, "offload_dit_during_sampling", False):
        raise UserError(
            "--offload_dit_during_sampling cannot be combined with FSDP sharding: each process holds only its shard of "
            "the DiT, which stays in place while samples are decoded; drop the option"
        )
    if config.offload_params and not cuda_available:
        raise UserError(
            "fsdp_offload_params: true offloads sharded parameters from the GPU to the host; without CUDA the "
            "parameters are already in host memory: set fsdp_offload_params: false"
        )
    if _flag(env, "ACCELERATE_USE_CPU", False) and cuda_available:
        raise UserError(
            "FSDP sharding was requested together with ACCELERATE_USE_CPU=true (use_cpu) on a machine with CUDA; "
            "accelerate would run unsharded CPU processes. Unset it (CPU-only machines use gloo automatically)"
        )


def check_world(accelerator: Any, env: Mapping[str, str] | None = None) -> None:
    """Processes launched as a group that did not join one process group would train unsynchronised: refuse."""
    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched (WORLD_SIZE) but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): they would train independently. Launch with a multi-process "
            "config (configs/accelerate_multi_gpu.yaml or configs/accelerate_fsdp2.yaml) or torchrun"
        )


@contextlib.contextmanager
def fsdp_env_hidden(env: dict[str, str] | None = None) -> Iterator[None]:
    """Hide ``ACCELERATE_USE_FSDP`` while the ``Accelerator`` is built: the trainer shards the frozen DiT itself, and
    accelerate must treat the run as data-parallel (its FSDP path expects to prepare the trained model)."""
    env = os.environ if env is None else env
    saved = env.pop(FSDP_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            env[FSDP_ENV] = saved


def take_turns(accelerator: Any) -> Iterator[int]:
    """Yield once, in this process's turn: processes of one host run the body one after the other (barrier between
    turns), so a host never holds more than one full copy of the DiT while loading. Hosts run in parallel."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or accelerator.num_processes
    for turn in range(local_world):
        if accelerator.local_process_index == turn:
            yield turn
        accelerator.wait_for_everyone()


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's transformer block lists (``_block_lists()``, the block-swap contract); UserError when absent."""
    lists = model._block_lists() if hasattr(model, "_block_lists") else None
    if not lists:
        raise UserError(
            f"{type(model).__name__} declares no transformer blocks (_block_lists()), which FSDP sharding wraps one by one"
        )
    return list(lists)


def shard_model(model: nn.Module, config: ShardingConfig, device: torch.device) -> nn.Module:
    """``fully_shard`` each transformer block and then the model (root group: embeddings, heads...) over all processes.

    Parameters are moved to ``device`` block by block while they are cut into shards, so a model loaded in host
    memory never lands whole on the GPU. Returns the same (now sharded) module.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = torch.device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UserError("FSDP sharding needs a process group: launch with accelerate launch or torchrun")
        from musubi_tuner.training.accel import process_group_backend

        dist.init_process_group(process_group_backend())  # one process under torchrun: accelerate set up none
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    offload = CPUOffloadPolicy() if config.offload_params else OffloadPolicy()
    opts = dict(mesh=mesh, reshard_after_forward=config.reshard_after_forward, offload_policy=offload)
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, **opts)
    fully_shard(model, **opts)
    # buffers (RoPE tables, fp8 scales) are not sharded: move what FSDP left in place
    for buf_owner in model.modules():
        for name, buf in list(buf_owner.named_buffers(recurse=False)):
            if buf is not None and buf.device != device and not config.offload_params:
                buf_owner._buffers[name] = buf.to(device)
    return model


def is_sharded(model: Any) -> bool:
    """True when ``model`` was sharded by ``shard_model`` (every process must then run the same forwards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule)


def local_parameter_share(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the full model) over the model's parameters."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (its shards, plus unsharded parameters)."""
    from torch.distributed.tensor import DTensor

    n = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        n += t.numel() * t.element_size()
    return n
