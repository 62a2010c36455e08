"""Writing generation outputs (specs/generation.md §6, §7): videos, PNGs, latents, names.

Videos are encoded in-process with PyAV (no ffmpeg binary, no temporary PNGs):

| ``--codec`` | encoder | pixel format | settings |
|---|---|---|---|
| ``h264`` (default) | libx264 | yuv420p | preset slow, CRF 12 (or ``bitrate``) |
| ``h265`` | libx265 | yuv420p | preset slow, CRF 12 (or ``bitrate``) |
| ``prores`` | prores_ks | yuv422p10le | profile 3 (HQ) |

RGB is converted with the BT.709 matrix and the streams are tagged BT.709 (primaries, transfer, matrix).
``prores`` with ``--container mp4`` switches to mkv with a warning; the file extension always follows the container.
4:2:0 formats need even sizes: odd widths/heights are padded by repeating the last row/column (and h265 frames
smaller than 64 pixels per side are padded to 64, working around a libx265 crash on tiny frames). A single frame is
written as PNG. Every file is written to a temporary name and renamed (atomic).

Names: ``<save_path>/<YYYYmmdd-HHMMSS-mmm>_<seed>.<ext>``, latents ``<stem>_latent.safetensors``, first/last frames
``<stem>_first.png`` / ``<stem>_last.png``, per-frame images ``<stem>_frame00000.png``. An existing file is never
replaced unless ``overwrite``; ``_`` is appended to the stem until the name is free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blissful_tuner.blissful_logger import get_logger
from musubi_tuner.utils.atomic import atomic_path, check_writable_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.generation_metadata import MP4_OPTIONS, png_info, set_container_metadata

logger = get_logger(__name__)

DEFAULT_FPS = 24
DEFAULT_CRF = 12
LATENT_KEY = "latent"
OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
CONTAINERS = ("mp4", "mkv")


@dataclass(frozen=True)
class CodecSpec:
    """How one ``--codec`` value is encoded."""

    encoder: str
    pix_fmt: str
    options: tuple[tuple[str, str], ...]
    uses_crf: bool


CODECS: dict[str, CodecSpec] = {
    "h264": CodecSpec("libx264", "yuv420p", (("preset", "slow"),), True),
    "h265": CodecSpec("libx265", "yuv420p", (("preset", "slow"), ("x265-params", "log-level=error")), True),
    "prores": CodecSpec("prores_ks", "yuv422p10le", (("profile", "3"),), False),
}
_BT709 = 1  # AVCOL_PRI_BT709 / AVCOL_TRC_BT709 / AVCOL_SPC_BT709


def to_uint8_frames(video: torch.Tensor | np.ndarray, *, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Frames as ``(F, H, W, 3)`` uint8.

    Accepts a uint8 array ``(F, H, W, C)`` / ``(H, W, C)`` (returned as is, grey expanded to RGB), or a float
    tensor/array ``(C, F, H, W)`` / ``(C, H, W)`` in ``value_range`` (e.g. ``(-1, 1)`` for raw VAE output).
    """
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        frames = video[None] if video.ndim == 3 else video
        if frames.ndim != 4:
            raise ValueError(f"expected (F, H, W, C) uint8 frames, got shape {video.shape}")
    else:
        t = torch.as_tensor(video).detach().float().cpu()
        if t.ndim == 3:
            t = t.unsqueeze(1)
        if t.ndim != 4:
            raise ValueError(f"expected a (C, F, H, W) or (C, H, W) video, got shape {tuple(t.shape)}")
        lo, hi = value_range
        t = ((t - lo) / (hi - lo)).clamp(0, 1)
        frames = (t * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def _pad_frames(frames: np.ndarray, *, even: bool, minimum: int = 0) -> np.ndarray:
    h, w = frames.shape[1:3]
    th, tw = max(h, minimum), max(w, minimum)
    if even:
        th, tw = th + th % 2, tw + tw % 2
    if (th, tw) == (h, w):
        return frames
    return np.pad(frames, ((0, 0), (0, th - h), (0, tw - w), (0, 0)), mode="edge")


def resolve_container(codec: str, container: str | None) -> str:
    """The container for ``codec``: prores needs mkv (mp4 is switched with a warning); default mp4."""
    if codec not in CODECS:
        raise UserError(f"--codec: unknown codec {codec!r} (choose from {', '.join(CODECS)})")
    container = (container or "mp4").lower().lstrip(".")
    if container not in CONTAINERS:
        raise UserError(f"--container: unknown container {container!r} (choose from {', '.join(CONTAINERS)})")
    if codec == "prores" and container == "mp4":
        logger.warning("--codec prores is written to mkv (mp4 does not carry our ProRes settings); switching container")
        container = "mkv"
    return container


def save_png(frame: np.ndarray | torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """One frame as PNG (``(H, W, 3)`` uint8 or a float ``(C, H, W)`` in [0, 1]); metadata as UTF-8 iTXt chunks."""
    from PIL import Image

    frames = to_uint8_frames(frame)
    if frames.shape[0] != 1:
        raise ValueError(f"save_png takes one frame, got {frames.shape[0]}")
    path = Path(path)
    info = png_info(metadata)
    with atomic_path(path) as tmp:
        Image.fromarray(frames[0]).save(tmp, format="PNG", pnginfo=info)
    return path


def save_video(
    video: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    *,
    fps: float = DEFAULT_FPS,
    codec: str = "h264",
    container: str | None = None,
    crf: int | None = None,
    bitrate: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Encode frames (see ``to_uint8_frames``) to ``path``; returns the written path (extension = container).

    ``container`` defaults to ``path``'s extension when it is ``.mp4``/``.mkv``, else mp4. A single frame is
    written as PNG instead. ``bitrate`` (bits/s) replaces the CRF for h264/h265.
    """
    import av
    from av.video.reformatter import Colorspace

    frames = to_uint8_frames(video)
    path = Path(path)
    if frames.shape[0] == 1:
        return save_png(frames[0], path.with_suffix(".png"), metadata)
    if container is None and path.suffix.lower().lstrip(".") in CONTAINERS:
        container = path.suffix.lower().lstrip(".")
    container = resolve_container(codec, container)
    path = path.with_suffix(f".{container}")
    spec = CODECS[codec]
    # libx265 (4.2, as bundled with PyAV) corrupts its heap on some frames smaller than 64×64 (e.g. 48×48):
    # tiny h265 videos are padded to 64 pixels per side instead of crashing the process.
    minimum = 64 if spec.encoder == "libx265" else 0
    frames = _pad_frames(frames, even=spec.pix_fmt.startswith("yuv420"), minimum=minimum)
    height, width = frames.shape[1:3]
    options = dict(MP4_OPTIONS) if container == "mp4" else {}
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        out = av.open(str(tmp), mode="w", format="mp4" if container == "mp4" else "matroska", options=options)
        try:
            set_container_metadata(out, metadata, mp4=container == "mp4")
            stream = out.add_stream(spec.encoder, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, spec.pix_fmt
            opts = dict(spec.options)
            if spec.uses_crf:
                if bitrate:
                    stream.bit_rate = int(bitrate)
                else:
                    opts["crf"] = str(DEFAULT_CRF if crf is None else int(crf))
            stream.options = opts
            cc = stream.codec_context
            cc.color_primaries, cc.color_trc, cc.colorspace = _BT709, _BT709, _BT709
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf = vf.reformat(format=spec.pix_fmt, dst_colorspace=Colorspace.ITU709)
                for packet in stream.encode(vf):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        finally:
            out.close()
    return path


def save_latent(latent: torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """The latent (model-native layout) as safetensors with one tensor ``latent`` plus string metadata."""
    path = Path(path)
    save_safetensors_atomic({LATENT_KEY: latent.detach().cpu()}, path, {str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def load_latent_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """A saved latent and its metadata (``--decode_from_latent`` / ``--latent_path``).

    safetensors: the ``latent`` tensor (or the only tensor); ``.pt``/``.pth``: ``torch.load(weights_only=True)`` of
    a tensor or a dict holding ``latent``. Metadata keys are normalised (musubi keys also under ``bt_*``).
    """
    from blissful_tuner.metadata import normalize_metadata

    p = Path(path)
    if not p.is_file():
        raise UserError(f"latent file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
                key = LATENT_KEY if LATENT_KEY in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise UserError(f"{p}: no 'latent' tensor (found {', '.join(keys) or 'nothing'})")
                return f.get_tensor(key), normalize_metadata(dict(f.metadata() or {}))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{p}: cannot read latent file ({e})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{p}: cannot read latent file ({e})") from None
    if isinstance(obj, dict):
        obj = obj.get(LATENT_KEY)
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{p}: expected a tensor or a dict with a 'latent' tensor")
    return obj, {}


def time_flag(now: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS-mmm`` (local time, milliseconds): the time part of output file names."""
    now = time.time() if now is None else now
    ms = int((now - int(now)) * 1000)
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{ms:03d}"


def output_stem(seed: int, now: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS-mmm_<seed>`` (local time, milliseconds)."""
    return f"{time_flag(now)}_{seed}"


def decoded_latent_stem(latent_path: str | os.PathLike) -> str:
    """The output stem for a decoded latent: its file name without extension and without ``_latent``."""
    stem = Path(latent_path).stem
    return stem[: -len("_latent")] if stem.endswith("_latent") else stem


def unique_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` itself when free (or ``overwrite``), else the stem with ``_`` appended until no file exists."""
    p = Path(path)
    if overwrite:
        return p
    while p.exists():
        p = p.with_name(f"{p.stem}_{p.suffix}")
    return p


def check_output_location(save_path: str | os.PathLike | None, output: str | os.PathLike | None, *, overwrite: bool) -> None:
    """Before any model loads: ``--save_path DIR`` / ``--output FILE``'s directory must be creatable and writable,
    and ``--output FILE`` must not exist unless ``--overwrite``. ``UserError`` naming the flag and path otherwise.

    Nothing is created: the nearest existing ancestor of the directory is probed with a hidden temporary file that is
    removed at once (so a run that stops early, e.g. ``--estimate_memory``, leaves no empty directory behind).
    """
    checks = []
    if save_path:
        checks.append(("--save_path", Path(save_path)))
    if output:
        out = Path(output)
        if out.is_dir():
            raise UserError(f"--output {out}: is a directory; give a file name (or use --save_path DIR)")
        if out.exists() and not overwrite:
            raise UserError(f"--output {out}: the file exists; pass --overwrite to replace it (or choose another name)")
        checks.append(("--output", out.parent))
    for flag, directory in checks:
        check_writable_dir(directory, flag)


def check_output_type(output_type: str, allowed: Sequence[str] | None = None) -> str:
    """Validate ``--output_type`` against the union and (optionally) what the model supports."""
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"--output_type: unknown value {output_type!r} (choose from {', '.join(OUTPUT_TYPES)})")
    if allowed is not None and output_type not in allowed:
        raise UserError(f"--output_type {output_type} is not available for this model (choose from {', '.join(allowed)})")
    return output_type


def save_generation(
    *,
    save_path: str | os.PathLike,
    stem: str,
    video: np.ndarray | torch.Tensor | None = None,
    latent: torch.Tensor | None = None,
    output_type: str = "video",
    codec: str = "h264",
    container: str | None = "mp4",
    fps: float = DEFAULT_FPS,
    metadata: dict[str, str] | None = None,
    save_first_frame: bool = False,
    save_last_frame: bool = False,
    overwrite: bool = False,
    value_range: tuple[float, float] = (0.0, 1.0),
    crf: int | None = None,
    bitrate: int | None = None,
) -> list[Path]:
    """Save one result according to ``output_type``; returns the written files.

    ``video``: decoded frames (see ``to_uint8_frames``; needed unless ``output_type == "latent"``); ``latent``:
    the model-native latent (needed for ``latent``/``both``/``latent_images``). ``video`` writes a video (a single
    frame as PNG) plus ``_first.png``/``_last.png`` on request; ``images`` writes one PNG per frame; ``both`` =
    video + latent; ``latent_images`` = images + latent. ``metadata`` (or ``None`` for ``--no_metadata``) goes into
    every file that can carry it. ``crf`` / ``bitrate`` (``--crf`` / ``--video_bitrate``) go to ``save_video``.
    """
    check_output_type(output_type)
    out_dir = Path(save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    wants_latent = output_type in ("latent", "both", "latent_images")
    wants_video = output_type in ("video", "both")
    wants_images = output_type in ("images", "latent_images")
    if wants_latent:
        if latent is None:
            raise ValueError(f"--output_type {output_type} needs the latent")
        written.append(save_latent(latent, unique_path(out_dir / f"{stem}_latent.safetensors", overwrite=overwrite), metadata))
    if not (wants_video or wants_images):
        return written
    if video is None:
        raise ValueError(f"--output_type {output_type} needs decoded frames")
    frames = to_uint8_frames(video, value_range=value_range)
    if wants_images:
        for i, frame in enumerate(frames):
            written.append(save_png(frame, unique_path(out_dir / f"{stem}_frame{i:05d}.png", overwrite=overwrite), metadata))
        return written
    if frames.shape[0] == 1:
        written.append(save_png(frames[0], unique_path(out_dir / f"{stem}.png", overwrite=overwrite), metadata))
        return written
    container = resolve_container(codec, container)
    target = unique_path(out_dir / f"{stem}.{container}", overwrite=overwrite)
    written.append(
        save_video(frames, target, fps=fps, codec=codec, container=container, crf=crf, bitrate=bitrate, metadata=metadata)
    )
    base = target.stem
    if save_first_frame:
        written.append(save_png(frames[0], unique_path(out_dir / f"{base}_first.png", overwrite=overwrite), metadata))
    if save_last_frame:
        written.append(save_png(frames[-1], unique_path(out_dir / f"{base}_last.png", overwrite=overwrite), metadata))
    return written


def save_rgba_png(image: torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """One RGBA image ``(4, H, W)`` float in [0, 1] as PNG with its alpha channel (``save_png`` keeps RGB only);
    metadata as UTF-8 iTXt chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    t = torch.as_tensor(image).detach().float().cpu()
    if t.ndim != 3 or t.shape[0] != 4:
        raise ValueError(f"save_rgba_png takes a (4, H, W) image, got shape {tuple(t.shape)}")
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    info = None
    if metadata:
        info = PngInfo()
        for k, v in metadata.items():
            info.add_itxt(str(k), str(v))
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr), mode="RGBA").save(tmp, format="PNG", pnginfo=info)
    return path
