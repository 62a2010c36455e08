"""Frame arithmetic for video datasets: 4n+1 rounding, frame-rate dropping and clip extraction (pure functions)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def round_to_4n1(n: int) -> int:
    """Round a pixel frame count down to the nearest ``4k + 1`` (the causal video VAEs' lengths)."""
    return ((n - 1) // 4) * 4 + 1


def fps_ratio(source_fps: float | None, target_fps: float | None) -> Fraction | None:
    """``r = min(1, target/source)`` as an exact fraction, or None when no conversion applies."""
    if source_fps is None or target_fps is None:
        return None
    r = Fraction(repr(float(target_fps))) / Fraction(repr(float(source_fps)))
    return None if r >= 1 else r


def keep_frame(i: int, ratio: Fraction | None) -> bool:
    """Product rule: keep source frame ``i`` iff ``floor((i+1)·r) > floor(i·r)`` (frames are only ever dropped)."""
    if ratio is None:
        return True
    return math.floor((i + 1) * ratio) > math.floor(i * ratio)


def kept_frame_indices(num_source_frames: int, ratio: Fraction | None) -> list[int]:
    """Indices of the source frames kept by ``keep_frame``."""
    return [i for i in range(num_source_frames) if keep_frame(i, ratio)]


def extract_clips(
    mode: str,
    num_frames: int,
    target_frames: tuple[int, ...] | list[int],
    *,
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[tuple[int, int]]:
    """Clips ``(start, length)`` of a video with ``num_frames`` frames (after fps conversion), spec §4.

    For ``head``/``chunk``/``slide``/``uniform`` the clips of every target length are concatenated in the order of
    ``target_frames``; duplicates are removed. ``full`` ignores ``target_frames``.
    """
    n = num_frames
    clips: list[tuple[int, int]] = []
    if mode == "full":
        length = round_to_4n1(min(n, max_frames))
        return [(0, length)] if length >= 1 else []
    for t in target_frames:
        if mode == "head":
            if n >= t:
                clips.append((0, t))
        elif mode == "chunk":
            clips.extend((k * t, t) for k in range(n // t))
        elif mode == "slide":
            clips.extend((s, t) for s in range(0, n - t + 1, frame_stride))
        elif mode == "uniform":
            if n >= t:
                starts = np.linspace(0, n - t, frame_sample, dtype=int)
                clips.extend((int(s), t) for s in starts)
        else:
            raise ValueError(f"unknown frame_extraction {mode!r}")
    return list(dict.fromkeys(clips))


def frames_needed(mode: str, target_frames: tuple[int, ...] | list[int]) -> int | None:
    """How many (converted) frames must be decoded: ``max(target_frames)`` for ``head``, else all (None)."""
    return max(target_frames) if mode == "head" else None
