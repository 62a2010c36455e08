"""Data loaders over a ``DatasetGroup``: whole batches, no DataLoader shuffling (the group reshuffles per epoch from
``seed + epoch``), the current epoch shared with worker processes."""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def _first(examples: list[Any]) -> Any:
    return examples[0]


class EpochSyncedDataset(Dataset):
    """Wraps a ``DatasetGroup`` so every worker process rebuilds the order of the epoch set in the main process."""

    def __init__(self, group: Any):
        self.group = group
        self.shared_epoch = multiprocessing.Value("i", group.current_epoch)

    # not named ``set_epoch``: accelerate's prepared loaders call ``dataset.set_epoch(n)`` with their own counter
    def use_epoch(self, epoch: int) -> None:
        """Set the epoch here and (through shared memory) in every worker before the next item is read."""
        self.shared_epoch.value = epoch
        self.group.set_current_epoch(epoch)

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, i: int) -> Any:
        epoch = self.shared_epoch.value
        if epoch != self.group.current_epoch:
            self.group.set_current_epoch(epoch)
        return self.group[i]


def make_loader(dataset: EpochSyncedDataset, num_workers: int, persistent: bool, seed: int) -> DataLoader:
    """``batch_size=1``, sequential order, collate = the pre-built batch; a private generator keeps the global
    RNG stream untouched by iterator creation (so resumed runs draw the same noise)."""
    return DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        collate_fn=_first,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
