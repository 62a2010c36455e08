"""Helpers for the dataset-layer tests: tiny media written with PIL / PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], color=(200, 30, 30), mode: str = "RGB") -> Path:
    """A solid image of ``size`` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else (*color, 128)).save(path)
    return path


def write_video(path: Path, num_frames: int, size: tuple[int, int] = (64, 48), fps: int = 24) -> Path:
    """An MP4 whose frame i has brightness 8*i (so frame order is observable after decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            arr = np.full((size[1], size[0], 3), min(255, 8 * i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
