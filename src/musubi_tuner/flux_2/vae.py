"""FLUX.2 VAE (diffusers ``AutoencoderKLFlux2``) with the FLUX.2 latent normalisation (specs/flux2.md §6).

Loads a BFL ``ae.safetensors`` (its keys converted to diffusers names while streaming), a diffusers VAE directory
or a pipeline directory with ``vae/``. Encoding takes the posterior mean, patchifies 2×2 to 128 channels
(index ``c·4 + pi·2 + pj``) and normalises with the non-affine batch-norm running statistics; decoding inverts it.
Pixels ``(B, 3, H, W)`` in [-1, 1], H and W multiples of 16; latents ``(B, 128, H/16, W/16)`` — the cache layout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.flux_2.models.keys import ConvertedReader, Recipe
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import WeightsReader, open_weights

logger = get_logger(__name__)

VAE_CONFIG_METADATA_KEY = "vae_config"  # single files written by demo.bundles carry their config here
SPATIAL_COMPRESSION = 16  # 8x VAE, then 2x2 patchify
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")

# BFL -> diffusers renames inside one resnet / attention / sampler (the block indices are handled by bfl_to_diffusers_key)
_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
_ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def bfl_to_diffusers_key(key: str, num_up: int) -> str:
    """The diffusers name of a BFL ``ae.safetensors`` key (``num_up`` = number of decoder up levels)."""
    k = key
    k = re.sub(r"^(encoder)\.down\.(\d+)\.block\.(\d+)\.", r"\1.down_blocks.\2.resnets.\3.", k)
    k = re.sub(r"^(encoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0.", k)
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", k)
    if m:
        i = num_up - 1 - int(m.group(1))
        rest = m.group(3)
        k = f"decoder.up_blocks.{i}.resnets.{rest}" if m.group(2) == "block" else f"decoder.up_blocks.{i}.upsamplers.0.{rest}"
    k = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.", lambda mm: f"{mm.group(1)}.mid_block.resnets.{int(mm.group(2)) - 1}.", k)
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
    if m:
        k = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_RENAMES[m.group(2)]}.{m.group(3)}"
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"^encoder\.quant_conv\.", "quant_conv.", k)
    k = re.sub(r"^decoder\.post_quant_conv\.", "post_quant_conv.", k)
    for a, b in _RESNET_RENAMES.items():
        k = k.replace(f".{a}.", f".{b}.")
    return k


def diffusers_to_bfl_key(key: str, num_up: int) -> str:
    """Inverse of ``bfl_to_diffusers_key`` (used to write BFL-format test bundles)."""
    k = key.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3.", k)
    k = re.sub(r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample.", k)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", k)
    if m:
        i = num_up - 1 - int(m.group(1))
        k = f"decoder.up.{i}.block.{m.group(3)}" if m.group(2) == "resnets" else f"decoder.up.{i}.upsample.{m.group(3)}"
    k = re.sub(
        r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.", lambda mm: f"{mm.group(1)}.mid.block_{int(mm.group(2)) + 1}.", k
    )
    inv = {v: a for a, v in _ATTN_RENAMES.items()}
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
    if m:
        k = f"{m.group(1)}.mid.attn_1.{inv[m.group(2)]}.{m.group(3)}"
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"^quant_conv\.", "encoder.quant_conv.", k)
    k = re.sub(r"^post_quant_conv\.", "decoder.post_quant_conv.", k)
    return k


def _is_attn_linear(diffusers_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def _squeeze_conv(ts: list[torch.Tensor]) -> torch.Tensor:
    t = ts[0]
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def _bfl_view(reader: WeightsReader) -> WeightsReader:
    keys = reader.keys()
    ups = {int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up\.(\d+)\.", k))}
    num_up = max(ups) + 1 if ups else 0
    recipes = {}
    for k in keys:
        if k == "bn.num_batches_tracked":
            recipes[k] = Recipe((k,))
            continue
        dk = bfl_to_diffusers_key(k, num_up)
        attn = _is_attn_linear(dk)
        recipes[dk] = Recipe((k,), _squeeze_conv if attn else None, (lambda s: s[:2]) if attn else None)
    return ConvertedReader(reader, recipes, "BFL ae")


def _config_from_bfl_keys(reader: WeightsReader) -> dict[str, Any]:
    """The ``AutoencoderKLFlux2`` config of a BFL file: block widths, layers, latent channels from the shapes."""
    keys = reader.keys()
    levels = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    widths = [int(reader.get_shape(f"encoder.down.{i}.block.0.conv1.weight")[0]) for i in levels]
    layers = len({m.group(1) for k in keys if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = int(reader.get_shape("decoder.conv_in.weight")[1])
    return {
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "layers_per_block": layers,
        "latent_channels": latent,
    }


def _vae_dir(path: Path) -> Path | None:
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    return None


def _load_single_file(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from diffusers import AutoencoderKLFlux2

    raw = open_weights(path)
    try:
        keys = raw.keys()
        if not any(k.startswith("decoder.") for k in keys) or "bn.running_mean" not in raw:
            raise UserError(
                f"{path}: not a FLUX.2 VAE (expected encoder/decoder weights and the 'bn.running_mean' latent statistics); "
                "pass the FLUX.2 ae.safetensors with --vae"
            )
        bfl = any(k.startswith("encoder.down.") for k in keys)
        reader = _bfl_view(raw) if bfl else raw
        meta = raw.metadata()
        if VAE_CONFIG_METADATA_KEY in meta:
            config = json.loads(meta[VAE_CONFIG_METADATA_KEY])
        elif bfl:
            config = _config_from_bfl_keys(raw)
        else:
            config = {}
        try:
            with torch.device("meta"):
                model = AutoencoderKLFlux2(**config)
        except TypeError as e:
            raise UserError(f"{path}: unsupported VAE config ({e})") from None
        # running statistics and the counter stay float32 / int64 (normalisation precision)
        load_weights_into_model(model, reader, dtype=dtype, device=device, strict=True, keep_in_fp32=("bn.",), progress=False)
    finally:
        raw.close()
    return model


def load_flux2_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Flux2Vae:
    """Load the FLUX.2 VAE from a BFL ``ae.safetensors``, a diffusers VAE directory or a pipeline directory."""
    from diffusers import AutoencoderKLFlux2

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: VAE not found (--vae)")
    device = torch.device(device)
    if p.is_dir():
        vdir = _vae_dir(p)
        if vdir is None:
            raise UserError(f"{p}: no config.json (nor vae/config.json) in the VAE directory (--vae)")
        try:
            model = AutoencoderKLFlux2.from_pretrained(vdir, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{vdir}: cannot load the FLUX.2 VAE (--vae): {e}") from None
        model.bn.float()
        model = model.to(device)
    else:
        model = _load_single_file(p, dtype, device)
    logger.info("loaded FLUX.2 VAE from %s", p)
    return Flux2Vae(model.eval().requires_grad_(False))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, 4C, H/2, W/2)`` with channel index ``c·4 + pi·2 + pj``."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class Flux2Vae:
    """A loaded ``AutoencoderKLFlux2`` with the FLUX.2 normalisation (module docstring)."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str) -> Flux2Vae:
        self.model.to(device)
        return self

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.model.bn
        mean = bn.running_mean.float().view(1, -1, 1, 1).to(device)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.model.config.batch_norm_eps).to(device)
        return mean, std

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → normalised latents ``(B, 128, H/16, W/16)`` float32."""
        if pixels.ndim != 4 or pixels.shape[-1] % SPATIAL_COMPRESSION or pixels.shape[-2] % SPATIAL_COMPRESSION:
            raise UserError(f"FLUX.2 images must be (B, 3, H, W) with H and W multiples of 16, got {tuple(pixels.shape)}")
        x = pixels.to(self.device, self.dtype)
        z = self.model.encode(x).latent_dist.mode().float()
        mean, std = self._stats(z.device)
        return (patchify(z) - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, 128, h, w)`` → pixels ``(B, 3, 16h, 16w)`` in [-1, 1] float32."""
        z = latents.to(self.device).float()
        mean, std = self._stats(z.device)
        z = unpatchify(z * std + mean)
        return self.model.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)
