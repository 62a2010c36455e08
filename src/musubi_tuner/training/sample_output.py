"""Minimal writers for training-time samples: PNG for single frames, MP4 (PyAV, libx264, yuv420p) for videos.

The trainer lives in ``musubi_tuner`` and must not import ``blissful_tuner.media_output`` (layering), hence this
small saver of its own. Generation metadata is embedded by the same carriers as the generate scripts' outputs
(``utils.generation_metadata``), so ``blissful-read-metadata`` reads samples and generated files alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musubi_tuner.utils.atomic import atomic_path
from musubi_tuner.utils.generation_metadata import MP4_OPTIONS, png_info, set_container_metadata


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(C, F, H, W)`` in [0, 1] → ``(F, H, W, C)`` uint8."""
    if video.ndim != 4:
        raise ValueError(f"expected a (C, F, H, W) sample, got shape {tuple(video.shape)}")
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def save_png(frame: np.ndarray, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """One ``(H, W, C)`` uint8 frame as PNG (written atomically; ``metadata`` as iTXt chunks)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        image = Image.fromarray(frame[..., :3] if frame.shape[-1] >= 3 else frame[..., 0])
        image.save(tmp, format="PNG", pnginfo=png_info(metadata))
    return path


def save_mp4(
    frames: np.ndarray, path: Path, fps: float = 24.0, bit_rate: int = 4_000_000, metadata: dict[str, str] | None = None
) -> Path:
    """``(F, H, W, 3)`` uint8 frames as H.264 MP4 (yuv420p; odd sizes are cropped to even; ``metadata`` as tags)."""
    import av

    f, h, w = frames.shape[:3]
    frames = frames[:, : h - h % 2, : w - w % 2, :3]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options=dict(MP4_OPTIONS)) as container:
            set_container_metadata(container, metadata, mp4=True)
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


def save_sample(video: torch.Tensor, base: Path, fps: float = 24.0, metadata: dict[str, str] | None = None) -> list[Path]:
    """Save one sample ``(C, F, H, W)`` (or ``(C, H, W)``) in [0, 1]: ``base.mp4`` when F > 1, else ``base.png``.

    ``metadata``: the ``bt_*`` generation metadata embedded in the file (see ``utils.generation_metadata``).
    """
    if video.ndim == 3:
        video = video.unsqueeze(1)
    frames = to_uint8_frames(video)
    if frames.shape[0] > 1:
        return [save_mp4(frames, base.with_name(base.name + ".mp4"), fps, metadata=metadata)]
    return [save_png(frames[0], base.with_name(base.name + ".png"), metadata)]
