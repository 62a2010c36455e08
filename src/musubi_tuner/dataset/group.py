"""Training-time datasets: read only the caches, group items into whole batches per bucket, shuffle per epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.dataset.architectures import ArchInfo
from musubi_tuner.dataset.batching import BatchPlan, assemble_batch, stratified_pool
from musubi_tuner.dataset.buckets import BucketSelector
from musubi_tuner.dataset.cache_format import (
    LatentCacheName,
    batch_key,
    latent_cache_glob,
    load_tensors,
    metadata_mismatch,
    parse_latent_cache_name,
    read_header,
    te_cache_path,
)
from musubi_tuner.dataset.config import DatasetParams
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class CachedItem:
    """One trainable item: its latent cache, its TE cache, what was parsed from the name and the latent's shape."""

    latent_path: Path
    te_path: Path
    name: LatentCacheName
    bucket: tuple[int, int]
    latent_shape: tuple[int, ...] | None = None  # of the ``latents`` tensor, from the cache header


class CachedDataset:
    """The cached items of one ``[[datasets]]`` entry, grouped into batches of ``batch_size`` per batch key.

    The batch key is the bucket recomputed from the original size in the file name, the frame count, and the shapes
    of the stackable tensors in both cache headers (so caches written with other settings never share a batch).
    """

    def __init__(self, params: DatasetParams, arch: ArchInfo):
        self.params = params
        self.arch = arch
        self.cache_directory = Path(params.cache_directory)
        self.batch_size = params.batch_size
        self.num_repeats = params.num_repeats
        self.is_validation = params.validation
        self.items: list[CachedItem] = []
        self.plan = BatchPlan(params.batch_size)
        self.missing_te = 0
        self._scan()

    def _scan(self) -> None:
        p, arch = self.params, self.arch
        selector = BucketSelector(
            p.resolution, enable_bucket=p.enable_bucket, no_upscale=p.bucket_no_upscale, step=arch.resolution_step
        )
        files = sorted(self.cache_directory.glob(latent_cache_glob(arch.short))) if self.cache_directory.is_dir() else []
        for path in files:
            name = parse_latent_cache_name(path, arch.short, video=p.is_video)
            if name is None:
                logger.warning(f"{path}: file name not understood as a {arch.short} latent cache; ignored")
                continue
            te_path = te_cache_path(self.cache_directory, name.stem, arch.short)
            if not te_path.is_file():
                self.missing_te += 1
                continue
            shapes = []
            for f in (path, te_path):
                entries, metadata = read_header(f)
                problem = metadata_mismatch(metadata, arch.full)
                if problem:
                    raise UserError(f"{f}: cache does not match this run ({problem}); re-run the caching scripts")
                shapes.extend((k, tuple(v["shape"])) for k, v in sorted(entries.items()) if not batch_key(k)[1])
            latent_shape = next((shape for k, shape in shapes if batch_key(k)[0] == "latents"), None)
            bucket = selector.select((name.width, name.height))
            index = len(self.items)
            self.items.append(CachedItem(path, te_path, name, bucket, latent_shape))
            self.plan.add((bucket, name.count, tuple(shapes)), index, p.num_repeats)
        if self.missing_te:
            logger.warning(
                f"{self.cache_directory}: {self.missing_te} latent caches without a text-encoder cache "
                f"(<stem>_{arch.short}_te.safetensors) were skipped; run the text-encoder caching script"
            )
        logger.info(f"{p.table}: {len(self.items)} cached items in {self.cache_directory}")

    def load_batch(self, indices: list[int]) -> dict[str, object]:
        """Load the latent and TE caches of the items and assemble one batch."""
        merged, files = [], []
        for i in indices:
            item = self.items[i]
            tensors = load_tensors(item.latent_path)
            te = load_tensors(item.te_path)
            clash = set(tensors) & set(te)
            if clash:
                raise UserError(f"{item.te_path}: keys {sorted(clash)} also present in {item.latent_path}")
            tensors.update(te)
            merged.append(tensors)
            files.append(str(item.latent_path))
        batch = assemble_batch(merged, files)
        batch["item_keys"] = files
        return batch


class DatasetGroup(torch.utils.data.Dataset):
    """All cached datasets of a config as one dataset of whole batches (use a DataLoader with ``batch_size=1``,
    ``shuffle=False`` and a collate function returning the single element)."""

    def __init__(
        self,
        params: list[DatasetParams],
        arch: ArchInfo,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_timestep_buckets: int | None = None,
    ):
        self.arch = arch
        self.shuffle = shuffle
        self.seed = seed
        self.num_timestep_buckets = num_timestep_buckets or None
        self.datasets = [CachedDataset(p, arch) for p in params]
        if not any(d.items for d in self.datasets):
            searched = "; ".join(f"{d.cache_directory}/{latent_cache_glob(arch.short)}" for d in self.datasets)
            raise UserError(
                f"no cached items found (searched {searched}, each with a matching *_{arch.short}_te.safetensors); "
                "run the latent and text-encoder caching scripts with this dataset config first"
            )
        self.current_epoch = -1
        self._order: list[tuple[int, int]] = []
        self._timesteps: list[list[float] | None] = []
        self.set_current_epoch(0)

    @property
    def num_train_items(self) -> int:
        """Items per epoch (with repeats)."""
        return sum(d.plan.num_items for d in self.datasets)

    def set_current_epoch(self, epoch: int) -> None:
        """Rebuild the batch order for ``epoch`` (deterministic from ``seed + epoch``) and the timestep pool."""
        if epoch == self.current_epoch:
            return
        self.current_epoch = epoch
        rng = random.Random(self.seed + epoch)
        for d in self.datasets:
            d.plan.build(rng if self.shuffle else None)
        self._order = [(di, bi) for di, d in enumerate(self.datasets) for bi in range(len(d.plan))]
        if self.shuffle:
            rng.shuffle(self._order)
        self._timesteps = [None] * len(self._order)
        if self.num_timestep_buckets:
            pool = stratified_pool(self.num_train_items, self.num_timestep_buckets, rng)
            offset = 0
            for i, (di, bi) in enumerate(self._order):
                n = len(self.datasets[di].plan.batch(bi))
                self._timesteps[i] = pool[offset : offset + n]
                offset += n

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> dict[str, object]:
        di, bi = self._order[i]
        d = self.datasets[di]
        batch = d.load_batch(d.plan.batch(bi))
        batch["timesteps"] = self._timesteps[i]
        return batch
