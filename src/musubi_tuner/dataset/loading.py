"""Planning and loading of latent-caching work: probe media, choose buckets and clips, decode + resize to pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musubi_tuner.dataset.architectures import ArchInfo
from musubi_tuner.dataset.buckets import BucketSelector, control_bucket, floor_to, resize_to_bucket
from musubi_tuner.dataset.cache_format import latent_cache_path
from musubi_tuner.dataset.config import DatasetParams
from musubi_tuner.dataset.frames import extract_clips, fps_ratio, frames_needed
from musubi_tuner.dataset.media import MediaError, iter_video_frames, load_image, probe_video
from musubi_tuner.dataset.sources import SourceItem
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass
class LatentItem:
    """One latent cache entry to produce: an image, or one clip of a video."""

    source: SourceItem
    dataset: DatasetParams
    original_size: tuple[int, int]  # (W, H) of the media
    bucket: tuple[int, int]  # (W, H) the pixels are resized to
    cache_path: Path
    clip: tuple[int, int] | None = None  # (start, count) in converted frames
    control_sizes: tuple[tuple[int, int], ...] = ()  # (W, H) of every control after resizing

    @property
    def key(self) -> str:
        """Item key: ``<stem>`` for images, ``<stem>_<start:05d>-<count:03d>`` for clips."""
        if self.clip is None:
            return self.source.stem
        return f"{self.source.stem}_{self.clip[0]:05d}-{self.clip[1]:03d}"

    @property
    def frame_count(self) -> int:
        return self.clip[1] if self.clip else 1 + len(self.source.targets)

    @property
    def batch_key(self) -> tuple:
        """Items sharing this key may be encoded (and trained) in one batch."""
        return (self.bucket, self.frame_count, self.control_sizes)


@dataclass
class LoadedItem:
    """Pixels of one item: ``pixels`` (C, F, H, W) float32 in [-1, 1]; ``controls`` one tensor per control."""

    item: LatentItem
    pixels: torch.Tensor
    controls: list[torch.Tensor] = field(default_factory=list)


def to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames ``(H, W, C)`` -> float32 ``(C, F, H, W)`` in [-1, 1]."""
    arr = np.stack(frames, axis=0)
    return torch.from_numpy(arr).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


class ItemPlanner:
    """Turns source items into ``LatentItem``s for one dataset (probing sizes and frame counts)."""

    def __init__(self, params: DatasetParams, arch: ArchInfo):
        self.params = params
        self.arch = arch
        self.step = arch.resolution_step
        self.selector = BucketSelector(
            params.resolution, enable_bucket=params.enable_bucket, no_upscale=params.bucket_no_upscale, step=self.step
        )
        self.ratio = fps_ratio(params.source_fps, arch.target_fps) if params.is_video else None

    def control_size(self, size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
        """Target size of a control image of ``size`` for an item in ``bucket``."""
        p = self.params
        if p.no_resize_control:
            return (max(floor_to(size[0], self.step), self.step), max(floor_to(size[1], self.step), self.step))
        if p.control_resolution is not None:
            return control_bucket(size, p.control_resolution, self.step)
        return bucket

    def plan(self, source: SourceItem) -> list[LatentItem]:
        """Latent items of a source item; [] with a warning when a video is shorter than every target length."""
        p = self.params
        if not p.is_video:
            size = _image_size(source.path)
            bucket = self.selector.select(size)
            controls = tuple(self.control_size(_image_size(c), bucket) for c in source.controls)
            path = latent_cache_path(p.cache_directory, source.stem, size, self.arch.short)
            return [LatentItem(source, p, size, bucket, path, None, controls)]
        limit = frames_needed(p.frame_extraction, p.target_frames)
        count, size = probe_video(source.path, ratio=self.ratio, max_frames=limit)
        clips = extract_clips(
            p.frame_extraction,
            count,
            p.target_frames,
            frame_stride=p.frame_stride,
            frame_sample=p.frame_sample,
            max_frames=p.max_frames,
        )
        if not clips:
            logger.warning(
                f"{source.path}: {count} frames (after fps conversion) is shorter than every target_frames "
                f"{list(p.target_frames)}; skipped"
            )
            return []
        bucket = self.selector.select(size)
        controls = (bucket,) if source.controls else ()
        return [
            LatentItem(
                source,
                p,
                size,
                bucket,
                latent_cache_path(p.cache_directory, source.stem, size, self.arch.short, clip=c),
                c,
                controls,
            )
            for c in clips
        ]

    def load(self, items: list[LatentItem]) -> list[LoadedItem]:
        """Decode and resize the media of items that share one source item (all clips of one video)."""
        source = items[0].source
        if not self.params.is_video:
            item = items[0]
            mode = "RGBA" if self.params.multiple_target else "RGB"
            layers = [load_image(source.path, mode)] + [load_image(t, mode) for t in source.targets]
            frames = [np.asarray(resize_to_bucket(im, item.bucket)) for im in layers]
            controls = [
                to_tensor([np.asarray(resize_to_bucket(load_image(c), cs))]) for c, cs in zip(source.controls, item.control_sizes)
            ]
            return [LoadedItem(item, to_tensor(frames), controls)]
        end = max(s + n for s, n in (it.clip for it in items))
        bucket = items[0].bucket
        frames = [np.asarray(resize_to_bucket(f, bucket)) for f in iter_video_frames(source.path, ratio=self.ratio, max_frames=end)]
        control_frames: list[np.ndarray] = []
        if source.controls:
            control_frames = [
                np.asarray(resize_to_bucket(f, bucket))
                for f in iter_video_frames(source.controls[0], ratio=self.ratio, max_frames=end)
            ]
            # product of spec §3.3: trim, or pad by repeating the last frame, to the main video's length
            control_frames = (control_frames + [control_frames[-1]] * len(frames))[: len(frames)]
        loaded = []
        for it in items:
            start, count = it.clip
            if start + count > len(frames):
                logger.warning(f"{source.path}: decoded {len(frames)} frames, fewer than planned; clip {it.key} skipped")
                continue
            controls = [to_tensor(control_frames[start : start + count])] if control_frames else []
            loaded.append(LoadedItem(it, to_tensor(frames[start : start + count]), controls))
        return loaded


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise MediaError(f"{path}: file not found") from None
    except Exception as e:
        raise MediaError(f"{path}: cannot decode image: {e}") from None
