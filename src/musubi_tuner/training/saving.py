"""Saved-file names (specs/training.md §10), ``--save_last_n_*`` pruning, ``--save_precision`` and atomic LoRA writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(args: Any) -> torch.dtype:
    """``--save_precision`` (default fp32; ``full_fp16``/``full_bf16`` select fp16/bf16 when it is not given)."""
    if args.save_precision:
        return _PRECISIONS[args.save_precision]
    if getattr(args, "full_fp16", False):
        return torch.float16
    if getattr(args, "full_bf16", False):
        return torch.bfloat16
    return torch.float32


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def lora_file(output_dir: str | Path, stem: str) -> Path:
    """``<output_dir>/<stem>.safetensors``."""
    return Path(output_dir) / f"{stem}.safetensors"


def state_dir(output_dir: str | Path, stem: str) -> Path:
    """``<output_dir>/<stem>-state``."""
    return Path(output_dir) / f"{stem}-state"


def save_network_atomic(network: Any, path: Path, dtype: torch.dtype, metadata: dict[str, str] | None) -> None:
    """``network.save_weights`` into a temporary ``.safetensors`` next to ``path``, then rename over it.

    The temporary name keeps the ``.safetensors`` suffix because network modules pick the format from it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.safetensors", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        network.save_weights(str(tmp), dtype, metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        logger.info(f"removing old state {path}")
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        logger.info(f"removing old checkpoint {path}")
        path.unlink()


def prune_epoch_saves(args: Any, epoch: int) -> None:
    """After saving epoch ``epoch``: delete epoch ``epoch − N·save_every_n_epochs`` (``--save_last_n_epochs[_state]``)."""
    every = args.save_every_n_epochs or 1
    if args.save_last_n_epochs:
        old = epoch - args.save_last_n_epochs * every
        if old > 0:
            _remove(lora_file(args.output_dir, epoch_name(args.output_name, old)))
    if args.save_last_n_epochs_state:
        old = epoch - args.save_last_n_epochs_state * every
        if old > 0:
            _remove(state_dir(args.output_dir, epoch_name(args.output_name, old)))


def _old_step(step: int, keep: int, every: int) -> int:
    """``r = step − keep − 1`` rounded down to a multiple of ``every`` (0 = nothing to delete)."""
    r = step - keep - 1
    return (r // every) * every if r > 0 else 0


def prune_step_saves(args: Any, step: int) -> None:
    """After saving step ``step``: ``--save_last_n_steps[_state]`` keep the saves of the last N **steps**."""
    every = args.save_every_n_steps or 1
    if args.save_last_n_steps:
        old = _old_step(step, args.save_last_n_steps, every)
        if old > 0:
            _remove(lora_file(args.output_dir, step_name(args.output_name, old)))
    if args.save_last_n_steps_state:
        old = _old_step(step, args.save_last_n_steps_state, every)
        if old > 0:
            _remove(state_dir(args.output_dir, step_name(args.output_name, old)))
