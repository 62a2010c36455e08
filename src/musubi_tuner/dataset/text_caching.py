"""The shared text-encoder caching driver: captions -> the architecture's ``encode`` -> ``<stem>_<arch>_te.safetensors``.

Existing TE caches are merged (spec §6.5): keys of other encoders are kept, stale dtype variants of the keys being
written are dropped, a changed caption is warned about. Product rule: a cache of another architecture or
``format_version`` (or with different ``extra_metadata``) is rewritten from scratch, never merged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from musubi_tuner.dataset.architectures import ArchInfo, arch_info
from musubi_tuner.dataset.cache_format import (
    cache_key,
    load_tensors,
    metadata_mismatch,
    read_header,
    sanitize_nans,
    strip_dtype,
    te_cache_glob,
    te_cache_path,
    te_metadata,
)
from musubi_tuner.dataset.config import DatasetParams, resolve_datasets
from musubi_tuner.dataset.latent_caching import delete_stale
from musubi_tuner.dataset.processes import caching_processes
from musubi_tuner.dataset.sources import list_items
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass
class TextItem:
    """One caption to encode. ``is_video`` tells the encoder which template to use (video vs image dataset);
    ``control_paths`` lets edit models show the control image to the text encoder."""

    stem: str
    caption: str
    is_video: bool
    dataset: DatasetParams
    media_path: Path
    cache_path: Path
    control_paths: list[Path] = field(default_factory=list)


TextEncodeFn = Callable[[list[TextItem]], list[dict[str, torch.Tensor]]]


def add_text_cache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the common options of every text-encoder caching script (spec §8) to ``parser``."""
    parser.add_argument("--dataset_config", type=str, required=True, help="dataset config (.toml or .json)")
    parser.add_argument("--device", type=str, default=None, help="encoding device (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=None, help="captions per encoder call (default: the dataset's)")
    parser.add_argument("--num_workers", type=int, default=None, help="threads reading captions (default: cpu count - 1)")
    parser.add_argument("--skip_existing", action="store_true", help="skip items whose TE cache exists and matches")
    parser.add_argument("--keep_cache", action="store_true", help="do not delete TE caches of items no longer in the dataset")
    return parser


def _needs_encoding(path: Path, arch: ArchInfo, caption: str, extra: dict[str, str]) -> bool:
    if not path.is_file():
        return True
    try:
        _, metadata = read_header(path)
    except UserError as e:
        logger.warning(f"{e} — encoding it again")
        return True
    if metadata_mismatch(metadata, arch.full) or metadata.get("caption1") != caption:
        return True
    return any(metadata.get(k) != v for k, v in extra.items())


def write_te_cache(path: Path, named: dict[str, torch.Tensor], arch: ArchInfo, caption: str, extra: dict[str, str]) -> None:
    """Write (merging with a compatible existing file) one TE cache atomically."""
    # clone: encoders often return views of one batch tensor, which safetensors refuses to save as shared memory
    tensors = {cache_key(name, t): t.detach().to("cpu").clone() for name, t in named.items()}
    metadata = {**te_metadata(arch.full, caption), **extra}
    old_md = None
    if path.is_file():
        try:
            _, old_md = read_header(path)
        except UserError:
            old_md = None  # unreadable (truncated): replaced, nothing of it is kept
    if old_md is not None:
        problem = metadata_mismatch(old_md, arch.full) or next(
            (f"{k} expected {v!r}, found {old_md.get(k)!r}" for k, v in extra.items() if old_md.get(k) != v), None
        )
        if problem:
            logger.warning(f"{path}: existing TE cache rewritten ({problem})")
        else:
            if old_md.get("caption1") not in (None, caption):
                logger.warning(f"{path}: caption changed from {old_md.get('caption1')!r} to {caption!r}")
            new_bases = {strip_dtype(k) for k in tensors}
            old = {k: v for k, v in load_tensors(path).items() if strip_dtype(k) not in new_bases}
            tensors = {**old, **tensors}
    save_safetensors_atomic(sanitize_nans(tensors, str(path)), path, metadata)


def collect_text_items(datasets: list[DatasetParams], arch: ArchInfo, workers: int) -> list[TextItem]:
    """Every caption of every dataset (captions are read in a thread pool)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        per_dataset = list(pool.map(list_items, datasets))
    items = []
    for params, sources in zip(datasets, per_dataset):
        for s in sources:
            items.append(
                TextItem(
                    stem=s.stem,
                    caption=s.caption or "",
                    is_video=params.is_video,
                    dataset=params,
                    media_path=s.path,
                    cache_path=te_cache_path(params.cache_directory, s.stem, arch.short),
                    control_paths=list(s.controls),
                )
            )
    return items


def cache_text_encoder_outputs(
    args: Any,
    *,
    architecture: str | ArchInfo,
    encode: TextEncodeFn,
    extra_metadata: dict[str, str] | Callable[[DatasetParams], dict[str, str]] | None = None,
    runtime_params: dict[str, Any] | None = None,
) -> None:
    """Encode every caption of ``args.dataset_config`` with ``encode`` and write the TE caches.

    ``encode(items)`` returns one dict of named tensors per item (variable-length ones named ``varlen_<name>``).
    Items are batched per dataset (image and video datasets never share a call). ``extra_metadata`` (e.g. the
    template and max length an encoder used) is stored, and a cache with other values is re-encoded; it may be a
    function of the dataset (``DatasetParams -> dict``) when the values differ per dataset (e.g. video vs image template).
    Launched with several processes, each encodes every N-th caption; process 0 removes stale caches at the end.
    """
    arch = architecture if isinstance(architecture, ArchInfo) else arch_info(architecture)
    datasets = resolve_datasets(args.dataset_config, architecture=arch, args=args, runtime_params=runtime_params)
    extras = {p.index: dict((extra_metadata(p) if callable(extra_metadata) else extra_metadata) or {}) for p in datasets}
    workers = max(1, args.num_workers if getattr(args, "num_workers", None) is not None else (os.cpu_count() or 2) - 1)
    items = collect_text_items(datasets, arch, workers)
    expected: dict[Path, set[Path]] = {}
    for it in items:
        expected.setdefault(Path(it.dataset.cache_directory).resolve(), set()).add(it.cache_path.resolve())
    todo = items
    if getattr(args, "skip_existing", False):
        todo = [it for it in items if _needs_encoding(it.cache_path, arch, it.caption, extras[it.dataset.index])]
        logger.info(f"{len(items) - len(todo)} TE caches skipped (exist and match), {len(todo)} to encode")
    share = caching_processes()
    todo = share.take(todo)
    with tqdm(total=len(todo), desc="encoding captions", unit="caption") as bar:
        for params in datasets:
            mine = [it for it in todo if it.dataset is params]
            batch_size = getattr(args, "batch_size", None) or params.batch_size
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                outputs = encode(batch)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"encode returned {len(outputs)} results for {len(batch)} captions")
                for it, named in zip(batch, outputs):
                    write_te_cache(it.cache_path, named, arch, it.caption, extras[it.dataset.index])
                bar.update(len(batch))
    share.wait()
    if share.is_main and not getattr(args, "keep_cache", False):
        removed = delete_stale(expected, te_cache_glob(arch.short))
        if removed:
            logger.info(f"removed {removed} stale {arch.short} TE caches")
