"""Aspect-ratio buckets (spec §5): bucket sets, bucket choice, control-image sizes, resize + centre crop."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def floor_to(x: float, step: int) -> int:
    """Round down to a multiple of ``step``."""
    return int(x // step) * step


class BucketSelector:
    """Chooses the bucket ``(W, H)`` of a media size for one dataset's resolution and bucketing settings."""

    def __init__(self, resolution: tuple[int, int], *, enable_bucket: bool, no_upscale: bool, step: int):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.area = self.resolution[0] * self.resolution[1]
        self.step = step
        self.no_upscale = no_upscale and enable_bucket
        self.buckets = bucket_set(self.resolution, step) if enable_bucket else [self.resolution]
        self._ratios = np.array([w / h for w, h in self.buckets])

    def select(self, size: tuple[int, int]) -> tuple[int, int]:
        """Bucket for a media ``(width, height)``: the closest aspect ratio (first on ties, buckets sorted)."""
        w, h = size
        if self.no_upscale and w * h <= self.area:
            return (max(floor_to(w, self.step), self.step), max(floor_to(h, self.step), self.step))
        idx = int(np.argmin(np.abs(self._ratios - w / h)))
        return self.buckets[idx]


def bucket_set(resolution: tuple[int, int], step: int) -> list[tuple[int, int]]:
    """Buckets of area ``A = W·H``: for ``w = floor_k(√A / 2)`` while ``w < √A + k`` (the reference loop, which can
    include one width just above √A), add ``(w, floor_k(A // w))`` and its transpose; deduplicated and sorted."""
    area = resolution[0] * resolution[1]
    sqrt_size = int(math.sqrt(area))
    min_size = floor_to(sqrt_size // 2, step)
    result: set[tuple[int, int]] = set()
    for w in range(min_size, sqrt_size + step, step):
        h = floor_to(area // w, step)
        result.add((w, h))
        result.add((h, w))
    return sorted(result)


def control_bucket(size: tuple[int, int], control_resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """Control-image size for ``control_resolution``: ideal ``(√(A_c·a), √(A_c/a))``, then among the candidates within
    ±2 steps per side (multiples of ``step``) whose area does not exceed ``A_c``, the closest aspect ratio, ties to the
    larger area (product rule)."""
    w, h = size
    a = w / h
    area = control_resolution[0] * control_resolution[1]
    ideal_w, ideal_h = math.sqrt(area * a), math.sqrt(area / a)
    base_w, base_h = floor_to(ideal_w, step), floor_to(ideal_h, step)
    best: tuple[float, int, tuple[int, int]] | None = None
    for dw in range(-2, 3):
        for dh in range(-2, 3):
            cw, ch = base_w + dw * step, base_h + dh * step
            if cw < step or ch < step or cw * ch > area:
                continue
            score = (abs(cw / ch - a), -(cw * ch))
            if best is None or score < best[:2]:
                best = (score[0], score[1], (cw, ch))
    return best[2] if best is not None else (max(base_w, step), max(base_h, step))


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale by ``max(bw/w, bh/h)`` so the image covers the bucket (Lanczos up, box/area down), then centre-crop."""
    bw, bh = bucket
    w, h = image.size
    if (w, h) == (bw, bh):
        return image
    scale = max(bw / w, bh / h)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
    image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - bw) // 2, (new_h - bh) // 2
    return image.crop((left, top, left + bw, top + bh))
