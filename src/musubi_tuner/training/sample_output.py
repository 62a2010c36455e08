"""Minimal writers for training-time samples: PNG for single frames, MP4 (PyAV, libx264, yuv420p) for videos.

The trainer lives in ``musubi_tuner`` and must not import ``blissful_tuner.media_output`` (layering), hence this
small saver of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musubi_tuner.utils.atomic import atomic_path


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(C, F, H, W)`` in [0, 1] → ``(F, H, W, C)`` uint8."""
    if video.ndim != 4:
        raise ValueError(f"expected a (C, F, H, W) sample, got shape {tuple(video.shape)}")
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def save_png(frame: np.ndarray, path: Path) -> Path:
    """One ``(H, W, C)`` uint8 frame as PNG (written atomically)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(frame[..., :3] if frame.shape[-1] >= 3 else frame[..., 0]).save(tmp, format="PNG")
    return path


def save_mp4(frames: np.ndarray, path: Path, fps: float = 24.0, bit_rate: int = 4_000_000) -> Path:
    """``(F, H, W, 3)`` uint8 frames as H.264 MP4 (yuv420p; odd sizes are cropped to even)."""
    import av

    f, h, w = frames.shape[:3]
    frames = frames[:, : h - h % 2, : w - w % 2, :3]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(round(fps)))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = bit_rate
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def save_sample(video: torch.Tensor, base: Path, fps: float = 24.0) -> list[Path]:
    """Save one sample ``(C, F, H, W)`` (or ``(C, H, W)``) in [0, 1]: ``base.mp4`` when F > 1, else ``base.png``."""
    if video.ndim == 3:
        video = video.unsqueeze(1)
    frames = to_uint8_frames(video)
    if frames.shape[0] > 1:
        return [save_mp4(frames, base.with_name(base.name + ".mp4"), fps)]
    return [save_png(frames[0], base.with_name(base.name + ".png"))]
