"""Image / video conditions of a Wan generation or training sample (specs/wan.md §8): start / end images, V2V and
Fun-Control videos, read from disk, fitted to the output size and encoded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.conditioning import clip_image_tokens, encode_image_condition, fun_control_y
from musubi_tuner.wan.configs import TaskConfig
from musubi_tuner.wan.one_frame import OneFrameOptions, check_one_frame_task, encode_one_frame


def load_image(path: str | Path, width: int, height: int, flag: str) -> torch.Tensor:
    """An RGB image scaled to cover ``width``×``height`` and centre-cropped: ``(3, H, W)`` in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError  # noqa: F401

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: cannot read the image ({flag}): {e}") from None
    return _fit(img, width, height)


def load_video(path: str | Path, width: int, height: int, frames: int, flag: str) -> torch.Tensor:
    """The first ``frames`` frames of a video (or a directory of images), fitted like ``load_image``: ``(3, F, H, W)``."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        imgs = [load_image(f, width, height, flag) for f in files[:frames]]
    else:
        import av

        imgs = []
        try:
            with av.open(str(p)) as container:
                for frame in container.decode(video=0):
                    imgs.append(_fit(frame.to_image(), width, height))
                    if len(imgs) >= frames:
                        break
        except (OSError, av.error.FFmpegError) as e:  # type: ignore[attr-defined]
            raise UserError(f"{p}: cannot read the video ({flag}): {e}") from None
    if len(imgs) < frames:
        raise UserError(f"{p}: {len(imgs)} frames, {frames} needed ({flag})")
    return torch.stack(imgs, dim=1)


def _fit(img: Any, width: int, height: int) -> torch.Tensor:
    from PIL import Image

    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
    return t.float() / 127.5 - 1.0


def image_condition(
    task: TaskConfig,
    vae: Any,
    clip: Any,
    first: str | Path,
    last: str | Path | None,
    frames: int,
    width: int,
    height: int,
    device: torch.device | str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(y, clip_fea, ti2v_latent)`` for a start (and end) image.

    I2V / FLF2V: ``y = cat(mask 4, latent of [first, 0…, last or 0])`` ``(20, F', h, w)``; 2.1 tasks also the CLIP
    tokens of the image(s) (``clip`` is an encoder or a path). TI2V-5B: the first frame's latent ``(48, 1, h, w)``.
    """
    img = load_image(first, width, height, "--image_path")
    end = load_image(last, width, height, "--end_image_path") if last is not None else None
    if task.ti2v:
        if end is not None:
            raise UserError("--end_image_path: TI2V-5B conditions on the first frame only")
        return None, None, vae.encode(img[None, :, None])[0].cpu()
    if not task.i2v:
        raise UserError(f"--image_path: task {task.name} is not image-to-video (use i2v-14B, flf2v-14B, i2v-A14B or ti2v-5B)")
    y = encode_image_condition(vae, img[None], frames, end[None] if end is not None else None)[0].cpu()
    return y, _clip_condition(task, clip, img, end, device), None


def _clip_condition(task: TaskConfig, clip: Any, img: torch.Tensor, end: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    """``(N, 257, 1280)`` CLIP tokens of the start image (and the end image for FLF2V) for 2.1 tasks, else None."""
    if not task.clip:
        return None
    if clip is None:
        raise UserError(f"task {task.name} needs the CLIP image encoder (--clip)")
    if end is not None and not task.flf2v:
        raise UserError(f"--end_image_path: task {task.name} takes one image; use flf2v-14B for first + last frames")
    from musubi_tuner.wan.text_encoders import WanClipEncoder

    enc = clip if isinstance(clip, WanClipEncoder) else WanClipEncoder.load(clip, dtype=torch.float32, device=device)
    # (N, 257, 1280): one image (I2V) or first + last (FLF2V), the DiT's layout for one sample
    return clip_image_tokens(enc, img[None], end[None] if end is not None else None).flatten(0, -3)


def one_frame_condition(
    task: TaskConfig,
    vae: Any,
    clip: Any,
    first: str | Path,
    last: str | Path | None,
    control_paths: list[str] | None,
    options: OneFrameOptions,
    width: int,
    height: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y (20, F, h, w), clip_fea)`` of a one-frame generation (``wan.one_frame``).

    The control images are ``control_paths`` (``--control_image_path`` / ``--ci``), by default the start image (and
    the end image for FLF2V); CLIP sees the start (and end) image, as in training where the cache holds the CLIP tokens
    of the first (and last) control image.
    """
    check_one_frame_task(task, "--one_frame_inference")
    img = load_image(first, width, height, "--image_path")
    end = load_image(last, width, height, "--end_image_path") if last is not None else None
    paths = list(control_paths) if control_paths else [first, *([last] if last is not None else [])]
    controls = [load_image(cp, width, height, "--control_image_path")[None] for cp in paths]
    y, _ = encode_one_frame(vae, controls, options)
    return y[0].cpu(), _clip_condition(task, clip, img, end, device)


def control_condition(
    vae: Any, control: str | Path, image_y: torch.Tensor | None, frames: int, width: int, height: int
) -> torch.Tensor:
    """Fun-Control ``y`` ``(32, F', h, w)`` of a generation or sample: the control video (``--control_path`` / ``--cn``;
    its first ``frames`` frames, fitted to the output size) VAE-encoded, then the start image's latent on frame 0
    (``image_y``: the I2V condition of ``image_condition``, mask channels first; None: no start image)."""
    ctrl = vae.encode(load_video(control, width, height, frames, "--control_path")[None])[0].cpu()
    return fun_control_y(ctrl, image_y[4:] if image_y is not None else None)
