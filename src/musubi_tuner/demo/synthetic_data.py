"""A tiny synthetic dataset for tests and the demo: short videos of moving coloured shapes, stills, captions, TOMLs.

Every clip shows one shape of one colour moving over a plain background; its caption says exactly that
(``"a red square moving right on a black background"``), so a LoRA has something learnable. Videos are MP4
(MPEG-4 Part 2, yuv420p) written with PyAV; stills are PNG. Deterministic for a seed; written atomically.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musubi_tuner.demo.tokenizer_corpus import BACKGROUNDS, COLORS, MOTIONS, SHAPES
from musubi_tuner.utils.atomic import make_temp_dir
from musubi_tuner.utils.errors import UserError

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "black": (0, 0, 0),
    "dark gray": (50, 50, 50),
    "navy": (10, 20, 80),
    "dark green": (10, 60, 20),
}
_VELOCITY = {
    "moving right": (1.0, 0.0),
    "moving left": (-1.0, 0.0),
    "moving up": (0.0, -1.0),
    "moving down": (0.0, 1.0),
    "bouncing": (0.0, 0.0),
    "standing still": (0.0, 0.0),
}


@dataclass(frozen=True)
class ShapeSpec:
    """What one clip shows."""

    color: str
    shape: str
    motion: str
    background: str

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {self.motion} on a {self.background} background"


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a synthetic dataset (all absolute).

    ``video_dir`` / ``image_dir``: media + ``.txt`` captions; ``video_cache_dir`` / ``image_cache_dir``: empty cache
    directories named in the TOMLs; ``video_toml`` / ``image_toml``: dataset configs; ``start_image`` /
    ``end_image``: first / last frame of the first video (PNG) for I2V; ``captions``: stem → caption;
    ``frames``: frames per video; ``size``: (W, H).
    """

    root: Path
    video_dir: Path
    image_dir: Path
    video_cache_dir: Path
    image_cache_dir: Path
    video_toml: Path
    image_toml: Path
    start_image: Path
    end_image: Path
    captions: dict[str, str]
    frames: int
    size: tuple[int, int]


def shape_specs(n: int, seed: int) -> list[ShapeSpec]:
    """``n`` distinct clip descriptions drawn deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[ShapeSpec] = []
    seen: set[ShapeSpec] = set()
    while len(out) < n:
        spec = ShapeSpec(
            str(rng.choice(COLORS)), str(rng.choice(SHAPES)), str(rng.choice(MOTIONS[:5])), str(rng.choice(BACKGROUNDS))
        )
        if spec not in seen:
            seen.add(spec)
            out.append(spec)
    return out


def render_frame(spec: ShapeSpec, t: float, size: tuple[int, int]) -> np.ndarray:
    """Frame at time ``t`` in [0, 1] as ``(H, W, 3)`` uint8."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = RGB[spec.background]
    r = max(3, min(w, h) // 6)
    vx, vy = _VELOCITY[spec.motion]
    span_x, span_y = (w - 2 * r) / 2, (h - 2 * r) / 2
    cx = w / 2 + vx * span_x * (2 * t - 1)
    cy = h / 2 + vy * span_y * (2 * t - 1)
    if spec.motion == "bouncing":
        cy = h - r - abs(np.sin(np.pi * 2 * t)) * (h - 2 * r)
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - cx, yy - cy
    if spec.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif spec.shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif spec.shape == "rectangle":
        mask = (np.abs(dx) <= 1.5 * r) & (np.abs(dy) <= 0.7 * r)
    else:  # triangle, apex up
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    img[mask] = RGB[spec.color]
    return img


def write_video(path: Path, frames: list[np.ndarray], fps: int = 24) -> None:
    """Write RGB frames to an MP4 (MPEG-4 Part 2, yuv420p, near-lossless quantiser)."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _toml_str(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dataset_toml(media_dir: Path, cache_dir: Path, size: tuple[int, int], *, video: bool, frames: int = 17) -> str:
    """A dataset config for one directory source (``[general]`` + one ``[[datasets]]``)."""
    lines = [
        "[general]",
        f"resolution = [{size[0]}, {size[1]}]",
        'caption_extension = ".txt"',
        "batch_size = 1",
        "enable_bucket = true",
        "bucket_no_upscale = false",
        "",
        "[[datasets]]",
        f"{'video' if video else 'image'}_directory = {_toml_str(media_dir)}",
        f"cache_directory = {_toml_str(cache_dir)}",
        "num_repeats = 1",
    ]
    if video:
        lines += [f"target_frames = [{frames}]", 'frame_extraction = "head"']
    return "\n".join(lines) + "\n"


def write_synthetic_video_dataset(
    out_dir: str | os.PathLike,
    n_videos: int = 4,
    frames: int = 17,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    *,
    n_images: int = 4,
    fps: int = 24,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write ``n_videos`` clips of ``frames`` frames at ``size`` (W, H), ``n_images`` stills, captions and TOMLs.

    Layout under ``out_dir``: ``videos/clip_XXX.mp4`` + ``.txt``, ``images/still_XXX.png`` + ``.txt``,
    ``cache/videos``, ``cache/images``, ``video_dataset.toml``, ``image_dataset.toml``, ``start_image.png``,
    ``end_image.png``. An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    root = Path(out_dir).resolve()
    if size[0] % 16 or size[1] % 16:
        raise UserError(f"synthetic dataset size {size[0]}x{size[1]}: width and height must be multiples of 16")
    if frames < 1:
        raise UserError(f"synthetic dataset: frames must be >= 1, got {frames}")
    if root.exists() and (root.is_file() or any(root.iterdir())):
        if not overwrite:
            raise UserError(f"{root}: exists and is not empty (remove it or pass overwrite)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.")
    captions: dict[str, str] = {}
    try:
        vdir, idir = tmp / "videos", tmp / "images"
        for d in (vdir, idir, tmp / "cache" / "videos", tmp / "cache" / "images"):
            d.mkdir(parents=True)
        specs = shape_specs(n_videos + n_images, seed)
        times = [i / max(1, frames - 1) for i in range(frames)]
        first_clip: list[np.ndarray] = []
        for i, spec in enumerate(specs[:n_videos]):
            clip = [render_frame(spec, t, size) for t in times]
            first_clip = first_clip or clip
            stem = f"clip_{i:03d}"
            write_video(vdir / f"{stem}.mp4", clip, fps)
            (vdir / f"{stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
            captions[stem] = spec.caption
        for i, moving in enumerate(specs[n_videos:]):
            spec = ShapeSpec(moving.color, moving.shape, "standing still", moving.background)
            stem = f"still_{i:03d}"
            _save_png(idir / f"{stem}.png", render_frame(spec, 0.5, size))
            (idir / f"{stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
            captions[stem] = spec.caption
        cond = first_clip or [render_frame(specs[0], 0.0, size), render_frame(specs[0], 1.0, size)]
        _save_png(tmp / "start_image.png", cond[0])
        _save_png(tmp / "end_image.png", cond[-1])
        (tmp / "video_dataset.toml").write_text(
            dataset_toml(root / "videos", root / "cache" / "videos", size, video=True, frames=frames), encoding="utf-8"
        )
        (tmp / "image_dataset.toml").write_text(
            dataset_toml(root / "images", root / "cache" / "images", size, video=False), encoding="utf-8"
        )
        if root.exists():
            shutil.rmtree(root) if root.is_dir() else root.unlink()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SyntheticDataset(
        root=root,
        video_dir=root / "videos",
        image_dir=root / "images",
        video_cache_dir=root / "cache" / "videos",
        image_cache_dir=root / "cache" / "images",
        video_toml=root / "video_dataset.toml",
        image_toml=root / "image_dataset.toml",
        start_image=root / "start_image.png",
        end_image=root / "end_image.png",
        captions=captions,
        frames=frames,
        size=(int(size[0]), int(size[1])),
    )
