"""Qwen-Image VAE (``AutoencoderKLQwenImage`` from diffusers; RGB, or RGBA with ``input_channels=4`` for Layered).

Loads what users have on disk: a diffusers directory (or a pipeline directory with ``vae/``), a single file in the
diffusers layout, or the ComfyUI-repackaged ``qwen_image_vae.safetensors`` / ``qwen_image_layered_vae.safetensors``
in the original Wan-VAE layout (keys converted with diffusers' own single-file mapping). Images are encoded as
one-frame videos and normalised per channel ``(z − mean) / std`` (specs/qwen_image.md §4).

Tensors: pixels ``(B, C, H, W)`` in [-1, 1] (C = 3, or 4 for Layered) ↔ latents ``(B, 16, H/8, W/8)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.qwen_image.configs import LATENT_CHANNELS, PIXEL_STEP, VAE_SCALE
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

VAE_CONFIG_METADATA_KEY = "vae_config"
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")
WAN_LAYOUT_PROBE = "encoder.conv1.weight"  # the original (ComfyUI) layout; diffusers has encoder.conv_in


def _vae_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    for cand in (path, path / "vae"):
        if (cand / "config.json").is_file():
            return cand
    raise UserError(f"{path}: no config.json (nor vae/config.json) in the VAE directory (--vae)")


def _config_from_json(text: str, source: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: cannot read the VAE config ({e})") from None
    return {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}


def _build(config: dict[str, Any], source: str) -> Any:
    from diffusers import AutoencoderKLQwenImage

    try:
        with torch.device("meta"):
            return AutoencoderKLQwenImage(**config)
    except TypeError as e:
        raise UserError(f"{source}: unsupported VAE config ({e})") from None


def load_vae_model(path: str | os.PathLike, *, layered: bool, dtype: torch.dtype, device: torch.device | str) -> Any:
    """The diffusers ``AutoencoderKLQwenImage`` from a directory or single file, checked against RGB / RGBA."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: VAE not found (--vae)")
    vdir = _vae_dir(path)
    weights = vdir if vdir is not None else path
    reader = open_weights(weights)
    try:
        if vdir is not None:
            config = _config_from_json((vdir / "config.json").read_text(encoding="utf-8"), str(vdir / "config.json"))
        elif VAE_CONFIG_METADATA_KEY in reader.metadata():
            config = _config_from_json(reader.metadata()[VAE_CONFIG_METADATA_KEY], f"{path} metadata {VAE_CONFIG_METADATA_KEY}")
        else:
            config = {}  # released dims (the class defaults)
        keys = reader.keys()
        if "encoder.conv_in.weight" not in keys and WAN_LAYOUT_PROBE not in keys:
            raise UserError(f"{path}: not a Qwen-Image VAE (no encoder.conv_in / encoder.conv1 weights); check --vae")
        probe = "encoder.conv_in.weight" if "encoder.conv_in.weight" in keys else WAN_LAYOUT_PROBE
        in_ch = reader.get_shape(probe)[1]
        config.setdefault("input_channels", in_ch)
        want = 4 if layered else 3
        if in_ch != want:
            kind = "the RGBA Layered VAE" if in_ch == 4 else "an RGB VAE"
            need = "qwen_image_layered_vae.safetensors" if layered else "qwen_image_vae.safetensors"
            raise UserError(f"{path}: this is {kind} ({in_ch} input channels); this --model_version needs {need}")
        model = _build(config, str(path))
        if probe == WAN_LAYOUT_PROBE:
            # The VAE is small (~250 MB): convert in memory with diffusers' own mapping, then assign.
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

            sd = convert_wan_vae_to_diffusers({k: reader.get_tensor(k, dtype=dtype) for k in keys})
            try:
                model.load_state_dict(sd, strict=True, assign=True)
            except RuntimeError as e:
                raise UserError(f"{path}: VAE weights do not match the Qwen-Image VAE ({str(e).splitlines()[0]})") from None
            model.to(device)
        else:
            load_weights_into_model(model, reader, dtype=dtype, device=device, strict=True, progress=False)
    finally:
        reader.close()
    logger.info("loaded Qwen-Image VAE from %s", path)
    return model.eval().requires_grad_(False)


class QwenImageVae:
    """Encode / decode images with the Qwen-Image normalisation; ``layered`` VAEs take and give RGBA."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.channels = int(cfg.input_channels)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def load(cls, path: str | os.PathLike, *, layered: bool = False, dtype=torch.bfloat16, device="cpu") -> QwenImageVae:
        return cls(load_vae_model(path, layered=layered, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> QwenImageVae:
        self.model.to(device)
        return self

    def enable_tiling(self) -> None:
        self.model.enable_tiling()

    def cache_metadata(self) -> dict[str, str]:
        return {"qwen_image_vae_channels": str(self.channels)}

    def _check(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != self.channels:
            raise ValueError(f"pixels must be (B, {self.channels}, H, W), got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % PIXEL_STEP or w % PIXEL_STEP:
            raise UserError(f"image size {w}x{h} (W x H) is not a multiple of {PIXEL_STEP}")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` in [-1, 1] → normalised latents ``(B, 16, H/8, W/8)`` float32 (mode unless ``sample``)."""
        self._check(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)[:, :, None]
        dist = self.model.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = z[:, :, 0].float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, 16, h, w)`` → pixels ``(B, C, 8h, 8w)`` in [-1, 1] (float32, CPU)."""
        if latents.dim() != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"latents must be (B, {LATENT_CHANNELS}, h, w), got {tuple(latents.shape)}")
        z = latents.float().cpu() * self.std + self.mean
        out = self.model.decode(z.to(device=self.device, dtype=self.dtype)[:, :, None]).sample
        return out[:, :, 0].float().clamp(-1, 1).cpu()


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent ``(h, w)`` of a pixel size (÷8)."""
    return height // VAE_SCALE, width // VAE_SCALE
