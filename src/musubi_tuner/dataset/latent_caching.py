"""The shared latent-caching driver: datasets -> planned items -> decoded, resized pixel batches -> the
architecture's ``encode`` -> one safetensors cache per item (atomic), then stale-cache cleanup.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from musubi_tuner.dataset.architectures import ArchInfo, arch_info
from musubi_tuner.dataset.cache_format import (
    latent_cache_glob,
    latent_metadata,
    metadata_mismatch,
    read_header,
    save_cache,
)
from musubi_tuner.dataset.config import DatasetParams, resolve_datasets
from musubi_tuner.dataset.loading import ItemPlanner, LatentItem, LoadedItem
from musubi_tuner.dataset.media import MediaError
from musubi_tuner.dataset.processes import caching_processes
from musubi_tuner.dataset.sources import list_items
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass
class LatentBatch:
    """What an architecture's ``encode`` receives: items sharing one bucket, frame count and control shapes.

    ``pixels`` is ``(B, C, F, H, W)`` float32 in [-1, 1] (``F = 1`` for images; ``C = 4`` RGBA and ``F`` = number of
    layers for ``multiple_target``); ``controls[i]`` is the i-th control of every item, ``(B, C, Fc, Hc, Wc)``.
    """

    items: list[LatentItem]
    pixels: torch.Tensor
    controls: list[torch.Tensor] = field(default_factory=list)

    @property
    def dataset(self) -> DatasetParams:
        return self.items[0].dataset

    @property
    def is_video(self) -> bool:
        return self.dataset.is_video

    @property
    def bucket(self) -> tuple[int, int]:
        return self.items[0].bucket

    @property
    def frame_count(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def original_sizes(self) -> list[tuple[int, int]]:
        return [it.original_size for it in self.items]


EncodeFn = Callable[[LatentBatch], list[dict[str, torch.Tensor]]]


def add_latent_cache_args(parser: argparse.ArgumentParser, *, vae_required: bool = True) -> argparse.ArgumentParser:
    """Add the common options of every latent-caching script (spec §8) to ``parser``."""
    parser.add_argument("--dataset_config", type=str, required=True, help="dataset config (.toml or .json)")
    parser.add_argument("--vae", type=str, required=vae_required, help="VAE weights (file or diffusers directory)")
    parser.add_argument("--vae_dtype", type=str, default=None, help="VAE dtype (default: the architecture's)")
    parser.add_argument("--device", type=str, default=None, help="encoding device (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=None, help="encoding batch size (default: the dataset's)")
    parser.add_argument("--num_workers", type=int, default=None, help="threads decoding/resizing media (default: cpu count - 1)")
    parser.add_argument("--skip_existing", action="store_true", help="skip items whose cache exists and matches")
    parser.add_argument("--keep_cache", action="store_true", help="do not delete caches of items no longer in the dataset")
    parser.add_argument("--skip_corrupt", action="store_true", help="warn and skip unreadable media instead of failing")
    parser.add_argument(
        "--debug_mode",
        choices=["image", "console", "video"],
        default=None,
        help="show items instead of caching: console = table (+ images in the terminal), image/video = write resized "
        "frames as PNG / MP4 to --debug_dir",
    )
    parser.add_argument("--debug_dir", type=str, default="debug_dataset", help="output folder of --debug_mode image/video")
    parser.add_argument("--console_width", type=int, default=80, help="--debug_mode console: image width in characters")
    parser.add_argument(
        "--console_back", type=str, default=None, help="--debug_mode console: background colour behind transparency"
    )
    parser.add_argument("--console_num_images", type=int, default=None, help="--debug_mode console: images shown per dataset")
    parser.add_argument("--disable_cudnn_backend", action="store_true", help="disable cuDNN while encoding")
    return parser


def default_num_workers(args: Any) -> int:
    n = getattr(args, "num_workers", None)
    return max(1, n if n is not None else (os.cpu_count() or 2) - 1)


def plan_dataset(
    params: DatasetParams, arch: ArchInfo, *, skip_corrupt: bool, pool: ThreadPoolExecutor
) -> tuple[ItemPlanner, list[list[LatentItem]]]:
    """Probe every source item of a dataset; returns the planner and the latent items grouped per source item."""
    planner = ItemPlanner(params, arch)
    sources = list_items(params)
    futures = [pool.submit(planner.plan, s) for s in sources]
    grouped: list[list[LatentItem]] = []
    for fut in tqdm(futures, desc=f"{params.table}: probing", unit="item", leave=False):
        try:
            items = fut.result()
        except MediaError as e:
            if not skip_corrupt:
                raise
            logger.warning(f"{e} (skipped: --skip_corrupt)")
            continue
        if items:
            grouped.append(items)
    return planner, grouped


def clip_table(params: DatasetParams, items: list[LatentItem]) -> str:
    """Text table of item counts per (bucket, frame count), printed before caching."""
    counts = Counter((it.bucket, it.frame_count) for it in items)
    lines = [f"{params.table} ({params.source_path}): {len(items)} items", "  bucket (WxH)   frames   items"]
    for (bucket, frames), n in sorted(counts.items()):
        lines.append(f"  {bucket[0]:>5}x{bucket[1]:<5}   {frames:>6}   {n:>5}")
    return "\n".join(lines)


def _is_current(path: Path, arch: ArchInfo) -> bool:
    if not path.is_file():
        return False
    try:
        _, metadata = read_header(path)
    except UserError as e:
        logger.warning(f"{e} — encoding it again")
        return False
    return metadata_mismatch(metadata, arch.full) is None


def _load_stream(
    planner: ItemPlanner,
    groups: list[list[LatentItem]],
    pool: ThreadPoolExecutor,
    window: int,
    skip_corrupt: bool,
    failed: set[Path] | None = None,
) -> Iterator[LoadedItem]:
    """Load groups in the pool, at most ``window`` in flight, yielding in order.

    With ``skip_corrupt``, the cache paths of groups that fail to decode are added to ``failed``.
    """
    pending: list[tuple[Future, list[LatentItem]]] = []
    it = iter(groups)
    exhausted = False
    while True:
        while not exhausted and len(pending) < window:
            group = next(it, None)
            if group is None:
                exhausted = True
                break
            pending.append((pool.submit(planner.load, group), group))
        if not pending:
            return
        fut, group = pending.pop(0)
        try:
            loaded = fut.result()
        except MediaError as e:
            if not skip_corrupt:
                raise
            logger.warning(f"{e} (skipped: --skip_corrupt)")
            if failed is not None:
                failed.update(item.cache_path.resolve() for item in group)
            continue
        yield from loaded


def _write_batch(batch: LatentBatch, encode: EncodeFn, arch: ArchInfo) -> None:
    outputs = encode(batch)
    if len(outputs) != len(batch.items):
        raise RuntimeError(f"encode returned {len(outputs)} results for {len(batch.items)} items")
    for item, named in zip(batch.items, outputs):
        frame_count = item.clip[1] if item.clip else None
        md = latent_metadata(arch.full, item.original_size[0], item.original_size[1], frame_count)
        save_cache(item.cache_path, named, md)


def _make_batch(loaded: list[LoadedItem]) -> LatentBatch:
    pixels = torch.stack([x.pixels for x in loaded])
    controls = [torch.stack([x.controls[i] for x in loaded]) for i in range(len(loaded[0].controls))]
    return LatentBatch([x.item for x in loaded], pixels, controls)


def delete_stale(cache_dirs: dict[Path, set[Path]], glob: str) -> int:
    """Delete files matching ``glob`` in each cache directory that are not in its expected set; returns the count."""
    removed = 0
    for directory, expected in cache_dirs.items():
        if not directory.is_dir():
            continue
        for path in directory.glob(glob):
            if path.resolve() not in expected:
                logger.info(f"removing stale cache {path}")
                path.unlink()
                removed += 1
    return removed


def remove_caches(paths: set[Path]) -> None:
    """Delete the existing files among ``paths`` (old caches of items that are no longer part of the dataset)."""
    for path in sorted(paths):
        if path.is_file():
            logger.info(f"removing stale cache {path}")
            path.unlink()


def cache_latents(
    args: Any,
    *,
    architecture: str | ArchInfo,
    encode: EncodeFn,
    runtime_params: dict[str, Any] | None = None,
) -> None:
    """Cache the latents of every dataset of ``args.dataset_config`` with the architecture's ``encode``.

    ``encode(batch)`` returns one dict of named tensors per item (``latents`` ``(C, F, H, W)``, ``latents_image``,
    ``varlen_*``...); names become keys via ``cache_format.cache_key``. Launched with several processes, each
    encodes every N-th source item (all clips of one source stay in one process); each process removes the old
    caches of its items that failed to decode (``--skip_corrupt``), and process 0 removes the other stale caches once
    all are done.
    """
    arch = architecture if isinstance(architecture, ArchInfo) else arch_info(architecture)
    datasets = resolve_datasets(args.dataset_config, architecture=arch, args=args, runtime_params=runtime_params)
    skip_corrupt = bool(getattr(args, "skip_corrupt", False))
    debug_mode = getattr(args, "debug_mode", None)
    workers = default_num_workers(args)
    expected: dict[Path, set[Path]] = {}
    failed: set[Path] = set()  # caches of this process's items that failed to decode (--skip_corrupt)
    share = caching_processes()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for params in datasets:
            planner, groups = plan_dataset(params, arch, skip_corrupt=skip_corrupt, pool=pool)
            items = [it for g in groups for it in g]
            logger.info(clip_table(params, items))
            expected.setdefault(Path(params.cache_directory).resolve(), set()).update(it.cache_path.resolve() for it in items)
            if debug_mode:
                from musubi_tuner.dataset.debug import show_items

                if share.is_main:
                    show_items(args, params, planner, groups, debug_mode)
                continue
            if getattr(args, "skip_existing", False):
                kept = [[it for it in g if not _is_current(it.cache_path, arch)] for g in groups]
                skipped = len(items) - sum(len(g) for g in kept)
                groups = [g for g in kept if g]
                logger.info(f"{params.table}: {skipped} items skipped (cache exists and matches), {len(items) - skipped} to encode")
            groups = share.take(groups)
            _encode_dataset(params, planner, groups, pool, encode, arch, args, workers, skip_corrupt, failed)
    keep = debug_mode or getattr(args, "keep_cache", False)
    if not keep:
        # an item that became undecodable is no longer part of the dataset: its old cache is stale too. Only the
        # process whose share the item is knows it failed, so each process removes its own (before the barrier).
        remove_caches(failed)
    share.wait()
    if keep or not share.is_main:
        return
    removed = delete_stale(expected, latent_cache_glob(arch.short))
    if removed:
        logger.info(f"removed {removed} stale {arch.short} latent caches")


def _encode_dataset(
    params: DatasetParams,
    planner: ItemPlanner,
    groups: list[list[LatentItem]],
    pool: ThreadPoolExecutor,
    encode: EncodeFn,
    arch: ArchInfo,
    args: Any,
    workers: int,
    skip_corrupt: bool,
    failed: set[Path] | None = None,
) -> None:
    batch_size = getattr(args, "batch_size", None) or params.batch_size
    total = sum(len(g) for g in groups)
    if not total:
        return
    cudnn = torch.backends.cudnn.enabled
    if getattr(args, "disable_cudnn_backend", False):
        torch.backends.cudnn.enabled = False
    pending: dict[tuple, list[LoadedItem]] = {}
    try:
        with tqdm(total=total, desc=f"{params.table}: encoding", unit="item") as bar:
            for loaded in _load_stream(planner, groups, pool, workers * 2, skip_corrupt, failed):
                bucket = pending.setdefault(loaded.item.batch_key, [])
                bucket.append(loaded)
                if len(bucket) == batch_size:
                    _write_batch(_make_batch(bucket), encode, arch)
                    bar.update(len(bucket))
                    pending[loaded.item.batch_key] = []
            for bucket in pending.values():
                if bucket:
                    _write_batch(_make_batch(bucket), encode, arch)
                    bar.update(len(bucket))
    finally:
        torch.backends.cudnn.enabled = cudnn
