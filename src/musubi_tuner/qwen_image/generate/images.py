"""Control images, inpainting masks and the Reference Consistency Mask of Qwen-Image edit generation (§7).

Control sizes: ``--resize_control_to_image_size`` → the output size; ``--resize_control_to_official_size`` → the
release's ~1024² area (multiples of 32); default → about 1 MP keeping the aspect ratio (multiples of 16). The first
control is always brought to the output size when a mask or RCM blends it back into the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musubi_tuner.qwen_image.configs import EDIT_PLUS_VAE_AREA, PIXEL_STEP, VAE_SCALE, ModelVersion
from musubi_tuner.utils.errors import UserError

DEFAULT_CONTROL_AREA = 1024 * 1024


def open_image(path: str | Path, mode: str = "RGB") -> Any:
    """A PIL image in ``mode`` (a ``UserError`` naming the file when it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except Exception as e:  # PIL raises many types for corrupt files
        raise UserError(f"{path}: cannot read the image ({e})") from None


def area_size(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """``(W, H)`` with about ``area`` pixels, the aspect ratio of ``width × height``, multiples of ``step``."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    return max(step, round(w / step) * step), max(step, round(w / ratio / step) * step)


def control_size(image_wh: tuple[int, int], out_wh: tuple[int, int], *, to_image_size: bool, to_official: bool) -> tuple[int, int]:
    """The pixel size a control image is VAE-encoded at."""
    if to_image_size:
        return out_wh
    if to_official:
        return area_size(*image_wh, EDIT_PLUS_VAE_AREA, 32)
    return area_size(*image_wh, DEFAULT_CONTROL_AREA, PIXEL_STEP)


def to_pixels(img: Any, size: tuple[int, int]) -> torch.Tensor:
    """PIL → ``(1, C, H, W)`` in [-1, 1] at ``size`` (W, H), resized with Lanczos."""
    arr = np.asarray(img.resize(size, resample=1), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def encode_control_images(
    vae: Any,
    paths: Sequence[str],
    version: ModelVersion,
    out_wh: tuple[int, int],
    *,
    to_image_size: bool = True,
    to_official: bool = False,
    first_at_output_size: bool = False,
) -> list[torch.Tensor]:
    """VAE latents ``(1, 16, h, w)`` of each control (Layered: RGBA through the RGBA VAE)."""
    mode = "RGBA" if version.is_layered else "RGB"
    out = []
    for i, path in enumerate(paths):
        img = open_image(path, mode)
        exact = to_image_size or version.is_layered or (i == 0 and first_at_output_size)
        size = control_size(img.size, out_wh, to_image_size=exact, to_official=to_official)
        out.append(vae.encode(to_pixels(img, size)))
    return out


def load_mask(path: str, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Inpainting mask ``(1, 1, 1, h, w)`` in [0, 1] at latent size (white = regenerate)."""
    img = open_image(path, "L")
    h, w = latent_hw
    arr = np.asarray(img.resize((w * VAE_SCALE, h * VAE_SCALE), resample=1), dtype=np.float32) / 255.0
    m = torch.from_numpy(arr)[None, None]
    return F.interpolate(m, size=(h, w), mode="area")[:, :, None]


def _gaussian_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 1:
        return x
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's default sigma for a kernel size
    ax = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))


def rcm_mask(
    x: torch.Tensor, reference: torch.Tensor, *, threshold: float, relative: bool, kernel_size: int, dilate_size: int
) -> torch.Tensor:
    """Reference Consistency Mask ``(B, 1, 1, h, w)``: 1 where the latent changed (keep the generation), 0 where it
    matches the noised reference (blend the reference back).

    The channel-mean absolute difference is blurred (``kernel_size``), thresholded (absolute, or relative to the
    largest difference with ``relative``) and dilated by max-pooling (``dilate_size``).
    """
    diff = (x - reference).abs().mean(dim=1)[:, 0:1]  # (B, 1, h, w) of frame 0
    diff = _gaussian_blur(diff, kernel_size)
    limit = threshold * diff.amax(dim=(-2, -1), keepdim=True) if relative else torch.tensor(threshold)
    changed = (diff > limit).float()
    if dilate_size > 0:
        changed = F.max_pool2d(changed, kernel_size=2 * dilate_size + 1, stride=1, padding=dilate_size)
    return changed[:, :, None]


class ControlBlend:
    """``latent_blend_fn`` of ``pipeline.sample_latents``: after each step, where the mask is 0 the result is the
    control latent noised to the next sigma (inpainting with a fixed mask, or the RCM recomputed per step)."""

    def __init__(self, control: torch.Tensor, noise: torch.Tensor, *, mask: torch.Tensor | None = None, rcm: dict | None = None,
                 debug_dir: Path | None = None) -> None:  # fmt: skip
        self.control = control.float()[:, :, None] if control.dim() == 4 else control.float()
        self.noise = noise.float()
        self.mask = mask
        self.rcm = rcm
        self.debug_dir = debug_dir
        self.masks: list[torch.Tensor] = []

    def __call__(self, step: int, sigma_next: float, x: torch.Tensor) -> torch.Tensor:
        reference = (1.0 - sigma_next) * self.control + sigma_next * self.noise
        if self.rcm is not None:
            mask = rcm_mask(x, reference, **self.rcm)
            self.masks.append(mask)
            if self.debug_dir is not None:
                self._save(step, mask)
        else:
            mask = self.mask
        if sigma_next == 0.0 and self.rcm is None:
            reference = self.control
        return mask * x + (1.0 - mask) * reference

    def _save(self, step: int, mask: torch.Tensor) -> None:
        from blissful_tuner.media_output import save_png

        self.debug_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        img = (mask[0, 0, 0] * 255).to(torch.uint8)[None].expand(3, -1, -1)
        save_png(img.permute(1, 2, 0).numpy(), self.debug_dir / f"rcm_mask_step{step + 1:03d}.png")  # type: ignore[operator]
