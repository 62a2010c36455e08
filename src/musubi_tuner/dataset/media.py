"""Reading media: images with PIL, videos with PyAV (first video stream, RGB), directories of frames as videos.

Unreadable or corrupt media raise ``MediaError`` (a ``UserError``) naming the file and the decoder message; the
caching drivers turn it into a warning + skip with ``--skip_corrupt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

from PIL import Image

from musubi_tuner.dataset.frames import keep_frame
from musubi_tuner.utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif", ".mpeg", ".mpg", ".wmv", ".flv")


class MediaError(UserError):
    """A media file could not be read or decoded."""


def is_image_file(path: Path) -> bool:
    """True for a file with an image extension (any case)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    """True for a file with a video extension (any case)."""
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def frame_files(directory: Path) -> list[Path]:
    """Image files of a frame directory, ordered by file name (product rule)."""
    return sorted((p for p in directory.iterdir() if is_image_file(p)), key=lambda p: p.name)


def is_frame_directory(path: Path) -> bool:
    """A directory holding at least one image is one video whose frames are its images."""
    return path.is_dir() and any(is_image_file(p) for p in path.iterdir())


def load_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Open and fully decode an image converted to ``mode``; ``MediaError`` naming the file on failure.

    ``mode="RGBA"`` requires an alpha channel in the file (multiple-target / layered datasets).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGBA" and not (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
                raise MediaError(f"{path}: an alpha channel is required (multiple_target), image mode is {im.mode}")
            return im.convert(mode)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise MediaError(f"{path}: cannot decode image: {e}") from None


def iter_video_frames(path: Path, *, ratio: Fraction | None = None, max_frames: int | None = None) -> Iterator[Image.Image]:
    """Yield the RGB frames of a video file or frame directory after frame-rate dropping (``frames.keep_frame``).

    Decoding stops once ``max_frames`` frames have been yielded (``head`` extraction decodes only what it needs).
    """
    if max_frames is not None and max_frames <= 0:
        return
    count = 0
    if path.is_dir():
        for i, frame_path in enumerate(frame_files(path)):
            if not keep_frame(i, ratio):
                continue
            yield load_image(frame_path)
            count += 1
            if max_frames is not None and count >= max_frames:
                return
        return
    import av

    try:
        container = av.open(str(path))
    except Exception as e:
        raise MediaError(f"{path}: cannot open video: {e}") from None
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if not keep_frame(i, ratio):
                    continue
                yield frame.to_image().convert("RGB")
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{path}: cannot decode video frame {count}: {e}") from None
        if count == 0:
            raise MediaError(f"{path}: no decodable frames")
    finally:
        container.close()


def probe_video(path: Path, *, ratio: Fraction | None = None, max_frames: int | None = None) -> tuple[int, tuple[int, int]]:
    """Frame count after fps dropping (capped at ``max_frames``) and the first frame's ``(W, H)``, from the decoded
    stream (never container metadata), without converting frames to RGB."""
    if path.is_dir():
        files = [f for i, f in enumerate(frame_files(path)) if keep_frame(i, ratio)]
        if not files:
            raise MediaError(f"{path}: no frames after frame-rate conversion")
        files = files[:max_frames] if max_frames is not None else files
        with Image.open(files[0]) as im:
            return len(files), im.size
    import av

    try:
        container = av.open(str(path))
    except Exception as e:
        raise MediaError(f"{path}: cannot open video: {e}") from None
    count, size = 0, None
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if not keep_frame(i, ratio):
                continue
            size = size or (frame.width, frame.height)
            count += 1
            if max_frames is not None and count >= max_frames:
                break
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{path}: cannot decode video frame {count}: {e}") from None
    finally:
        container.close()
    if size is None:
        raise MediaError(f"{path}: no decodable frames")
    return count, size
