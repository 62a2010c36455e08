"""Qwen-Image ``encode`` callbacks of the shared caching drivers (specs/qwen_image.md §8) and batch readers.

Latent caches: ``latents`` ``(16, F, H/8, W/8)`` (F = 1; Layered: composite + each layer, RGBA VAE) and
``latents_control_{i}`` per control image. TE caches: ``varlen_vl_embed`` ``(L, 3584)``; edit models see the item's
control images together with the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from musubi_tuner.dataset.batching import pad_varlen
from musubi_tuner.dataset.latent_caching import LatentBatch
from musubi_tuner.dataset.text_caching import TextItem
from musubi_tuner.qwen_image.configs import ModelVersion
from musubi_tuner.qwen_image.vae import QwenImageVae
from musubi_tuner.utils.errors import UserError

TE_KEY = "vl_embed"  # cache key varlen_vl_embed_{dtype} (musubi-tuner's name)


def _with_alpha(pixels: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, ...)`` → RGBA with an opaque alpha (the Layered VAE takes four channels)."""
    if pixels.shape[1] == 4:
        return pixels
    return torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)


def encode_frames(vae: QwenImageVae, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` → ``(B, 16, F, H/8, W/8)``, every frame encoded as its own image (mode)."""
    b, _, f, _, _ = pixels.shape
    flat = pixels.permute(0, 2, 1, 3, 4).flatten(0, 1)
    z = vae.encode(flat)
    return z.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)


def encode_latent_batch(vae: QwenImageVae, batch: LatentBatch, version: ModelVersion) -> list[dict[str, torch.Tensor]]:
    """The Qwen-Image ``encode`` of ``dataset.latent_caching.cache_latents``: one dict of named tensors per item."""
    ds = batch.dataset
    where = f"{ds.table} of {ds.config_path}"
    pixels = batch.pixels
    if version.is_layered:
        if not ds.multiple_target:
            raise UserError(f"{where}: --model_version layered trains on RGBA layers; set multiple_target = true")
        pixels = _with_alpha(pixels)
    elif pixels.shape[2] != 1:
        raise UserError(f"{where}: Qwen-Image trains on images; this dataset yields {pixels.shape[2]}-frame items")
    if version.is_edit and not batch.controls:
        raise UserError(f"{where}: --model_version {version.name} needs control images (control_directory / control_path)")
    if version.is_layered and len(batch.controls) > 1:
        raise UserError(f"{where}: Layered takes exactly one control image per item, got {len(batch.controls)}")
    latents = encode_frames(vae, pixels)
    controls = [encode_frames(vae, _with_alpha(c) if version.is_layered else c[:, :3]) for c in batch.controls]
    out = []
    for i in range(len(batch.items)):
        named = {"latents": latents[i].to(vae.dtype)}
        for j, c in enumerate(controls):
            named[f"latents_control_{j}"] = c[i].to(vae.dtype)
        out.append(named)
    return out


def load_control_images(item: TextItem) -> list[Any]:
    """RGB PIL images of an item's controls (shown to Qwen2.5-VL with edit models)."""
    from PIL import Image

    if not item.control_paths:
        raise UserError(
            f"{item.media_path}: edit models need a control image for every item; set control_directory (or "
            f"control_path in the JSONL) in {item.dataset.table} of {item.dataset.config_path}"
        )
    images = []
    for p in item.control_paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # PIL raises many types for corrupt files
            raise UserError(f"{p}: cannot read the control image ({e})") from None
    return images


def encode_text_items(encoder: Any, items: Sequence[TextItem], version: ModelVersion) -> list[dict[str, torch.Tensor]]:
    """The Qwen-Image ``encode`` of ``dataset.text_caching``: ``varlen_vl_embed`` ``(L, D)`` per caption."""
    images = [load_control_images(it) for it in items] if version.is_edit else None
    embeds = encoder.encode([it.caption for it in items], version, images=images)
    return [{f"varlen_{TE_KEY}": e} for e in embeds]


def text_batch(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's text: zero-padded ``(B, L, D)`` and its bool mask ``(B, L)`` (always used: §3)."""
    embeds = batch.get(TE_KEY)
    if embeds is None:
        name = (batch.get("item_keys") or ["this batch"])[0]
        raise UserError(
            f"{name}: no Qwen-Image text embeddings (varlen_vl_embed) in the TE cache; run "
            "qwen_image_cache_text_encoder_outputs.py with this dataset config"
        )
    if isinstance(embeds, torch.Tensor):
        embeds = list(embeds)
    return pad_varlen(list(embeds))
