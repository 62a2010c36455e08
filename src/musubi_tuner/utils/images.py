"""Reference / condition image helpers shared by the generators and the trainers' sample prompts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError


def load_image(path: str | os.PathLike, option: str = "--image") -> Any:
    """An RGB PIL image (EXIF orientation applied); a missing or unreadable file is a ``UserError`` naming ``option``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {p}: image not found")
    try:
        with Image.open(p) as im:
            im.load()
            img = ImageOps.exif_transpose(im) or im
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{option} {p}: cannot read the image ({e})") from None


def resize_cover(image: Any, width: int, height: int) -> Any:
    """Resize (Lanczos) so the image covers ``width × height``, then centre-crop to exactly that size."""
    from PIL import Image

    w0, h0 = image.size
    s = max(width / w0, height / h0)
    nw, nh = max(width, round(w0 * s)), max(height, round(h0 * s))
    img = image.resize((nw, nh), resample=Image.LANCZOS) if (nw, nh) != (w0, h0) else image
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def image_to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB image → ``(1, 3, H, W)`` float32 in [-1, 1] (``x / 127.5 − 1``)."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return (arr.permute(2, 0, 1).float() / 127.5 - 1.0)[None]
