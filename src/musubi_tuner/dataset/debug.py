"""``--debug_mode`` of the latent cacher: show what would be cached instead of encoding (no GUI needed).

``console``: a table of every item (+ its first frame drawn in the terminal with half-block characters);
``image``: the resized frames as PNG files; ``video``: video clips as MP4 (images as PNG) under ``--debug_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text

from musubi_tuner.dataset.config import DatasetParams
from musubi_tuner.dataset.loading import ItemPlanner, LatentItem, LoadedItem
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def to_uint8_frames(pixels: torch.Tensor) -> list[np.ndarray]:
    """``(C, F, H, W)`` in [-1, 1] -> list of ``(H, W, C)`` uint8 frames."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return list(arr)


def render_console(frame: np.ndarray, width: int, background: str | None) -> Text:
    """A frame as rich text: one character per pixel column, two pixel rows per line (``▀`` fg top / bg bottom)."""
    image = Image.fromarray(frame)
    if image.mode == "RGBA":
        back = Image.new("RGBA", image.size, background or "black")
        image = Image.alpha_composite(back, image)
    image = image.convert("RGB")
    height = max(2, round(image.height * width / image.width / 2) * 2)
    arr = np.asarray(image.resize((width, height), Image.Resampling.BOX))
    text = Text()
    for y in range(0, height, 2):
        for x in range(width):
            top, bottom = arr[y, x], arr[y + 1, x]
            text.append("▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        text.append("\n")
    return text


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import av

    from musubi_tuner.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(round(fps)))
            stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
            stream.pix_fmt = "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[..., :3]), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def show_items(args: Any, params: DatasetParams, planner: ItemPlanner, groups: list[list[LatentItem]], mode: str) -> None:
    """Print or write the items of one dataset as ``--debug_mode`` asks."""
    console = Console()
    if mode == "console":
        table = Table(title=f"{params.table}: {params.source_path}")
        for col in ("item", "original WxH", "bucket WxH", "frames", "controls"):
            table.add_column(col)
        for it in (it for g in groups for it in g):
            controls = ", ".join(f"{w}x{h}" for w, h in it.control_sizes) or "-"
            table.add_row(it.key, "{}x{}".format(*it.original_size), "{}x{}".format(*it.bucket), str(it.frame_count), controls)
        console.print(table)
        limit = getattr(args, "console_num_images", None)
        shown = 0
        for group in groups:
            if limit is not None and shown >= limit:
                break
            for loaded in planner.load(group[:1]):
                console.print(loaded.item.key)
                console.print(render_console(to_uint8_frames(loaded.pixels)[0], args.console_width, args.console_back))
                shown += 1
        return
    out = Path(getattr(args, "debug_dir", "debug_dataset")) / f"datasets_{params.index}"
    out.mkdir(parents=True, exist_ok=True)
    for group in groups:
        for loaded in planner.load(group):
            _write_item(out, loaded, mode, planner.arch.target_fps or 24.0)
    logger.info(f"{params.table}: debug output written to {out}")


def _write_item(out: Path, loaded: LoadedItem, mode: str, fps: float) -> None:
    key = loaded.item.key
    streams = [("", loaded.pixels)] + [(f"_control{i}", c) for i, c in enumerate(loaded.controls)]
    for suffix, pixels in streams:
        frames = to_uint8_frames(pixels)
        if mode == "video" and loaded.item.clip is not None:
            _write_video(out / f"{key}{suffix}.mp4", frames, fps)
            continue
        for f, frame in enumerate(frames):
            name = f"{key}{suffix}.png" if len(frames) == 1 else f"{key}{suffix}_{f:04d}.png"
            Image.fromarray(frame).save(out / name)
