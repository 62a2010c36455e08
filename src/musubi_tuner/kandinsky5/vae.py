"""Kandinsky 5 VAE wrappers (specs/kandinsky5.md §6, §9): HunyuanVideo VAE for video tasks, FLUX.1 VAE for Image Lite.

Both come from diffusers. This module loads them from what users have on disk (a diffusers directory, a pipeline
directory with ``vae/``, or a single ``.safetensors`` / ``.pt`` file), and does the Kandinsky 5 normalisation:

- HunyuanVideo: ``latents = latent_dist.sample() · 0.476986`` (sample, not mode — official and musubi), decode
  ``z / 0.476986`` (no shift). Pixel frame counts must be 4n+1 (causal ×4 temporal compression).
- FLUX.1: only ``scaling_factor`` (0.3611), **no** ``shift_factor``, as the official Image Lite code does; frames are
  encoded one by one.

Tensors are channels-first here: pixels ``(B, 3, F, H, W)`` in [-1, 1], latents ``(B, 16, F', H/8, W/8)`` — the
layout of the latent cache. The DiT works channels-last; permuting is the caller's business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import open_weights

logger = get_logger(__name__)

VaeKind = Literal["hunyuan_video", "flux1"]
VAE_KINDS: tuple[str, ...] = ("hunyuan_video", "flux1")

HUNYUAN_VAE_SCALING_FACTOR = 0.476986
FLUX_VAE_SCALING_FACTOR = 0.3611
LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 8
HUNYUAN_TEMPORAL_COMPRESSION = 4

VAE_CONFIG_METADATA_KEY = "vae_config"  # single files written by demo.bundles carry their config here

# The released FLUX.1 VAE (black-forest-labs/FLUX.1-dev, vae/config.json).
FLUX1_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

_DIFFUSERS_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")


def latent_frame_count(pixel_frames: int) -> int:
    """HunyuanVideo latent frames for ``pixel_frames`` (4n+1): ``(F − 1)//4 + 1``."""
    check_frame_count(pixel_frames)
    return (pixel_frames - 1) // HUNYUAN_TEMPORAL_COMPRESSION + 1


def pixel_frame_count(latent_frames: int) -> int:
    """Pixel frames decoded from ``latent_frames``: ``4·(F' − 1) + 1``."""
    return HUNYUAN_TEMPORAL_COMPRESSION * (latent_frames - 1) + 1


def check_frame_count(pixel_frames: int) -> None:
    """A ``UserError`` unless ``pixel_frames`` is 4n+1 (1, 5, 9, ..., 121)."""
    if pixel_frames < 1 or (pixel_frames - 1) % HUNYUAN_TEMPORAL_COMPRESSION != 0:
        lo = (max(pixel_frames, 1) - 1) // 4 * 4 + 1
        raise UserError(
            f"the Kandinsky 5 video VAE needs 4n+1 pixel frames (1, 5, 9, ..., 121), got {pixel_frames}; "
            f"use {lo} or {lo + 4} (target_frames / --video_length)"
        )


def _vae_class(kind: str) -> Any:
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo

    if kind == "hunyuan_video":
        return AutoencoderKLHunyuanVideo
    if kind == "flux1":
        return AutoencoderKL
    raise UserError(f"unknown VAE kind '{kind}'; valid: {', '.join(VAE_KINDS)}")


def _default_config(kind: str) -> dict[str, Any]:
    if kind == "flux1":
        return dict(FLUX1_VAE_CONFIG)
    return {}  # AutoencoderKLHunyuanVideo's defaults are the released HunyuanVideo VAE


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the VAE config ({e})") from None
    return {k: v for k, v in cfg.items() if k not in _DIFFUSERS_BOOKKEEPING}


def _vae_dir(path: Path) -> Path | None:
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    return None


def _load_single_file(path: Path, kind: str, dtype: torch.dtype, device: torch.device) -> Any:
    """Build the VAE on ``meta`` and stream a single checkpoint file into it (strict)."""
    cls = _vae_class(kind)
    reader = open_weights(path)
    try:
        meta = reader.metadata()
        if VAE_CONFIG_METADATA_KEY in meta:
            config = json.loads(meta[VAE_CONFIG_METADATA_KEY])
        elif (path.parent / "config.json").is_file():
            config = _read_config_json(path.parent / "config.json")
        else:
            config = _default_config(kind)
        keys = reader.keys()
        if kind == "flux1" and any(k.startswith("encoder.down.") for k in keys):
            raise UserError(
                f"{path}: this is the original FLUX.1 'ae' layout; pass the diffusers VAE folder (flux/vae with config.json) instead"
            )
        # Original HunyuanVideo files (pytorch_model.pt) may nest the keys under "vae." inside a larger checkpoint.
        key_map = KeyMap(prefixes=(("vae.", ""),), dropped=(r"(?!vae\.).*",)) if any(k.startswith("vae.") for k in keys) else None
        try:
            with torch.device("meta"):
                model = cls(**config)
        except TypeError as e:
            raise UserError(f"{path}: unsupported VAE config ({e})") from None
        load_weights_into_model(model, reader, key_map=key_map, dtype=dtype, device=device, strict=True, progress=False)
    finally:
        reader.close()
    return model


class K5Vae:
    """A loaded Kandinsky 5 VAE with the Kandinsky 5 normalisation (see module docstring)."""

    def __init__(self, model: Any, kind: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.kind = kind

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def temporal_compression(self) -> int:
        return HUNYUAN_TEMPORAL_COMPRESSION if self.kind == "hunyuan_video" else 1

    @property
    def spatial_compression(self) -> int:
        return SPATIAL_COMPRESSION

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> K5Vae:
        self.model.to(device)
        return self

    def cache_metadata(self) -> dict[str, str]:
        """Latent-cache metadata: which VAE and scaling produced the latents."""
        return {"vae_kind": self.kind, "vae_scaling_factor": repr(self.scaling_factor)}

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        """The ``vae_scaling_factor`` entry of the K5 latent cache (specs/dataset.md §6.3), a float32 scalar."""
        return {"vae_scaling_factor": torch.tensor(self.scaling_factor, dtype=torch.float32)}

    def enable_tiling(
        self, tile_size: int = 256, tile_stride: int = 192, tile_frames: int | None = 16, tile_frames_stride: int | None = 12
    ) -> None:
        """Spatial (and for HunyuanVideo temporal) tiling in pixel units; diffusers defaults 256/192, 16/12 frames."""
        if self.kind == "hunyuan_video":
            self.model.enable_tiling(
                tile_sample_min_height=tile_size,
                tile_sample_min_width=tile_size,
                tile_sample_min_num_frames=tile_frames,
                tile_sample_stride_height=tile_stride,
                tile_sample_stride_width=tile_stride,
                tile_sample_stride_num_frames=tile_frames_stride,
            )
        else:
            self.model.enable_tiling()
            self.model.tile_sample_min_size = tile_size
            self.model.tile_latent_min_size = tile_size // SPATIAL_COMPRESSION
            self.model.tile_overlap_factor = 1.0 - tile_stride / tile_size

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, F, H, W), got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % SPATIAL_COMPRESSION or w % SPATIAL_COMPRESSION:
            raise UserError(f"the Kandinsky 5 VAE needs height and width divisible by 8, got {w}x{h}")
        if self.kind == "hunyuan_video":
            check_frame_count(pixels.shape[2])

    def _posterior(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.model.encode(x).latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] → scaled latents ``(B, 16, F', H/8, W/8)`` float32.

        HunyuanVideo: F must be 4n+1, ``F' = (F − 1)//4 + 1``. FLUX.1: every frame is encoded on its own (``F' = F``).
        ``sample=False`` uses the posterior mode instead of a sample.
        """
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        if self.kind == "hunyuan_video":
            z = self._posterior(x, sample, generator)
        else:
            b, c, f, h, w = x.shape
            frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            z = self._posterior(frames, sample, generator)
            z = z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 16, F', H, W)`` → pixels ``(B, 3, F, 8H, 8W)`` float32 clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, F, H, W), got {tuple(latents.shape)}")
        z = (latents.float() / self.scaling_factor).to(device=self.device, dtype=self.dtype)
        if self.kind == "hunyuan_video":
            x = self.model.decode(z).sample
        else:
            b, c, f, h, w = z.shape
            frames = self.model.decode(z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)).sample
            x = frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        return x.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode_image_condition(
        self,
        first: torch.Tensor,
        last: torch.Tensor | None = None,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """I2V conditioning latents in the cache layout ``latents_image`` ``(B, 16, 2, H/8, W/8)``.

        ``first`` / ``last``: ``(B, 3, H, W)`` or ``(B, 3, 1, H, W)`` in [-1, 1], each encoded alone as a one-frame
        clip (specs/kandinsky5.md §9: a video's last latent frame summarises 4 pixel frames, a lone image does not).
        Without ``last`` the first latent is duplicated (the cache layout for F = 1).
        """
        first = first if first.dim() == 5 else first.unsqueeze(2)
        if last is None:
            z = self.encode_video(first[:, :, :1], sample=sample, generator=generator)
            return torch.cat([z, z], dim=2)
        last = last if last.dim() == 5 else last.unsqueeze(2)
        if last.shape != first.shape:
            raise ValueError(f"first and last images differ in shape: {tuple(first.shape)} vs {tuple(last.shape)}")
        b = first.shape[0]
        z = self.encode_video(torch.cat([first[:, :, :1], last[:, :, :1]], dim=0), sample=sample, generator=generator)
        return torch.cat([z[:b], z[b:]], dim=2)

    def encode_first_last_frames(
        self, pixels: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``latents_image`` for a training clip ``(B, 3, F, H, W)``: its first and last pixel frames, each encoded alone."""
        if pixels.shape[2] == 1:
            return self.encode_image_condition(pixels[:, :, :1], None, sample=sample, generator=generator)
        return self.encode_image_condition(pixels[:, :, :1], pixels[:, :, -1:], sample=sample, generator=generator)


def load_k5_vae(
    path: str | os.PathLike,
    kind: str = "hunyuan_video",
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    *,
    tiling: bool = False,
) -> K5Vae:
    """Load a Kandinsky 5 VAE.

    Args:
        path: a diffusers VAE directory (``config.json`` + weights), a pipeline directory with ``vae/``, or a single
            ``.safetensors`` / ``.pt`` / ``.pth`` file (``torch.load(weights_only=True)``; keys nested under ``vae.``
            and ``{"state_dict": ...}`` wrappers are accepted). A single file's config comes from its ``vae_config``
            metadata, else a ``config.json`` next to it, else the released model's config.
        kind: ``"hunyuan_video"`` (video tasks) or ``"flux1"`` (Image Lite).
        dtype / device: where the weights go.
        tiling: enable tiled encode/decode with the diffusers default tile sizes.
    """
    if kind not in VAE_KINDS:
        raise UserError(f"unknown VAE kind '{kind}'; valid: {', '.join(VAE_KINDS)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: VAE not found (--vae)")
    device = torch.device(device)
    if p.is_dir():
        vdir = _vae_dir(p)
        if vdir is None:
            raise UserError(f"{p}: no config.json (nor vae/config.json) in the VAE directory (--vae)")
        cls = _vae_class(kind)
        try:
            declared = json.loads((vdir / "config.json").read_text(encoding="utf-8")).get("_class_name", cls.__name__)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{vdir / 'config.json'}: cannot read the VAE config ({e})") from None
        if declared != cls.__name__:
            raise UserError(
                f"{vdir / 'config.json'}: is a {declared}, the {kind} VAE is a {cls.__name__} (wrong --vae for this task?)"
            )
        try:
            model = cls.from_pretrained(vdir, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{vdir}: cannot load the VAE ({e})") from None
        model = model.to(device)
    else:
        model = _load_single_file(p, kind, dtype, device)
    vae = K5Vae(model, kind)
    if tiling:
        vae.enable_tiling()
    logger.info("loaded %s VAE from %s (%s)", kind, p, dtype)
    return vae
