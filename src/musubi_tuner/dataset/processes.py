"""Caching with several processes (``accelerate launch`` / ``torchrun`` over a caching script): each process
encodes its share of the items on its own GPU, instead of every process loading an encoder for every item.

``caching_processes()`` joins the launcher's process group (through accelerate; gloo without CUDA) and tells the
caching drivers which items are this process's; a one-process run gets the trivial share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

T = TypeVar("T")


def launched_world_size() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class ProcessShare:
    """This process's place among the caching processes."""

    index: int = 0
    count: int = 1
    state: Any = None  # accelerate PartialState when count > 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, items: list[T]) -> list[T]:
        """Every ``count``-th item starting at ``index`` (the items are in the same order in every process)."""
        return items[self.index :: self.count]

    def wait(self) -> None:
        """Barrier: return when every process got here."""
        if self.state is not None:
            self.state.wait_for_everyone()


def caching_processes() -> ProcessShare:
    """The share of this process; several launched processes join one process group (gloo without CUDA)."""
    world = launched_world_size()
    if world <= 1:
        return ProcessShare()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        from musubi_tuner.utils.errors import UserError

        raise UserError(f"{world} processes were launched but {state.num_processes} joined the process group")
    logger.info(f"caching process {state.process_index} of {state.num_processes}: encoding every {world}th item")
    return ProcessShare(state.process_index, state.num_processes, state)
