"""Kandinsky 5 caching logic shared by the two caching scripts and the trainer (specs/kandinsky5.md §5, §6, §7, §9, §10).

Latents (``kandinsky5_cache_latents.py``): per item ``latents`` ``(16, F, H, W)`` already scaled, ``latents_image``
``(16, 2, H, W)`` (first and last *pixel* frames each encoded alone; an image's latent duplicated), optional
``latents_control_{i}`` and the ``vae_scaling_factor`` scalar. ``--nabla_resize`` bilinearly resizes frames up to the
next multiple of 128 px per side after bucketing.

Text (``kandinsky5_cache_text_encoder_outputs.py``): per caption ``varlen_text_embeds`` ``(L, 3584)`` at the valid
length, ``varlen_pooled_embed`` ``(768,)``, ``varlen_attention_mask`` ``(L,)`` (all True), with the template chosen per
dataset and the template / budget recorded in the cache metadata. ``text_from_batch`` reads both these keys and the
upstream musubi keys (``text_embeds`` / ``pooled_embed`` / ``attention_mask``) from a training batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from musubi_tuner.dataset.architectures import ArchInfo
from musubi_tuner.dataset.batching import pad_varlen
from musubi_tuner.dataset.buckets import BucketSelector
from musubi_tuner.dataset.cache_format import latent_cache_glob, parse_latent_cache_name, read_header
from musubi_tuner.dataset.config import DatasetParams
from musubi_tuner.dataset.latent_caching import LatentBatch
from musubi_tuner.dataset.text_caching import TextItem
from musubi_tuner.kandinsky5.configs import TaskConfig
from musubi_tuner.kandinsky5.text_encoders import CLIP_MAX_LENGTH, qwen_max_length_for, template_mode_for
from musubi_tuner.kandinsky5.vae import FLUX_VAE_SCALING_FACTOR, HUNYUAN_VAE_SCALING_FACTOR, SPATIAL_COMPRESSION, K5Vae
from musubi_tuner.utils.devices import resolve_device  # noqa: F401  (re-exported for the K5 scripts)
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

NABLA_ALIGN = 128  # NABLA tiles are 8x8 tokens of the 2x2-patchified x8 latent grid: 128 px
VAE_DTYPE_DEFAULTS = {"hunyuan_video": torch.float16, "flux1": torch.bfloat16}  # official dtypes (spec §6, §12.1)


# ------------------------------------------------------------------------------------------------------------ latents


def nabla_size(width: int, height: int) -> tuple[int, int]:
    """``(W, H)`` rounded **up** to multiples of 128 px (``--nabla_resize``, spec §5)."""
    return (math.ceil(width / NABLA_ALIGN) * NABLA_ALIGN, math.ceil(height / NABLA_ALIGN) * NABLA_ALIGN)


def nabla_resize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize every frame of ``(B, C, F, H, W)`` up to the next multiple of 128 per side (no-op if aligned).

    The aspect ratio drifts slightly (each side is rounded up on its own), as in musubi-tuner's ``--nabla_resize``.
    """
    b, c, f, h, w = pixels.shape
    new_w, new_h = nabla_size(w, h)
    if (new_w, new_h) == (w, h):
        return pixels
    frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    frames = frames.clamp(-1.0, 1.0).to(pixels.dtype)
    return frames.reshape(b, f, c, new_h, new_w).permute(0, 2, 1, 3, 4).contiguous()


def expected_latent_hw(bucket: tuple[int, int], *, nabla_resize: bool) -> tuple[int, int]:
    """Latent ``(H, W)`` of an item in ``bucket`` (W, H) pixels, after the optional NABLA resize."""
    w, h = nabla_size(*bucket) if nabla_resize else bucket
    return h // SPATIAL_COMPRESSION, w // SPATIAL_COMPRESSION


def encode_latent_batch(
    vae: K5Vae,
    batch: LatentBatch,
    *,
    nabla_resize: bool = False,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The K5 ``encode`` for ``dataset.latent_caching.cache_latents``: one dict of named tensors per item.

    ``latents`` ``(16, F', H/8, W/8)`` (scaled by the VAE's scaling factor; F' = (F − 1)//4 + 1 for the HunyuanVideo
    VAE, F for the FLUX.1 VAE), ``latents_image`` ``(16, 2, H/8, W/8)``: the first and last pixel frames each encoded
    as a one-frame clip (spec §9; an image's latent is duplicated), ``latents_control_{i}`` for every control of the
    dataset, ``vae_scaling_factor`` (float32 scalar). Tensors are stored in the VAE dtype.
    ``sample=False`` takes the posterior mode instead of a sample (official and musubi sample).
    """
    pixels = batch.pixels
    if nabla_resize:
        pixels = nabla_resize_pixels(pixels)
    latents = vae.encode_video(pixels, sample=sample, generator=generator)
    if pixels.shape[2] == 1:
        image = torch.cat([latents[:, :, :1], latents[:, :, :1]], dim=2)
    else:
        image = vae.encode_first_last_frames(pixels, sample=sample, generator=generator)
    controls = []
    for c in batch.controls:
        controls.append(vae.encode_video(nabla_resize_pixels(c) if nabla_resize else c, sample=sample, generator=generator))
    store = vae.dtype
    out = []
    for i in range(len(batch.items)):
        named = {"latents": latents[i].to(store), "latents_image": image[i].to(store)}
        for j, c in enumerate(controls):
            named[f"latents_control_{j}"] = c[i].to(store)
        named.update(vae.cache_tensors())
        out.append(named)
    return out


def _latent_key(entries: dict[str, dict], prefix: str) -> str | None:
    for key in entries:
        rest = key[len(prefix) :]
        if key.startswith(prefix) and rest[:1].isdigit():
            return key
    return None


def invalidate_mismatched_latent_caches(
    datasets: Sequence[DatasetParams], arch: ArchInfo, *, nabla_resize: bool, vae_kind: str
) -> int:
    """For ``--skip_existing``: delete existing latent caches written with other K5 settings, so they are re-encoded.

    A cache is stale when its latent height/width differ from the bucket (recomputed from the original size in the
    file name, like training does) after the current ``--nabla_resize`` setting, when ``latents_image`` is missing, or
    when its ``vae_scaling_factor`` belongs to the other VAE (``--image_model_training`` switched). Returns the count.
    """
    from safetensors import safe_open

    expected_factor = FLUX_VAE_SCALING_FACTOR if vae_kind == "flux1" else HUNYUAN_VAE_SCALING_FACTOR
    removed = 0
    for params in datasets:
        directory = Path(params.cache_directory)
        if not directory.is_dir():
            continue
        selector = BucketSelector(
            params.resolution, enable_bucket=params.enable_bucket, no_upscale=params.bucket_no_upscale, step=arch.resolution_step
        )
        for path in sorted(directory.glob(latent_cache_glob(arch.short))):
            name = parse_latent_cache_name(path, arch.short, video=params.is_video)
            if name is None:
                continue
            try:
                entries, _ = read_header(path)
            except UserError:
                continue  # unreadable: the driver re-encodes it anyway
            reason = None
            key = _latent_key(entries, "latents_")
            if key is None or _latent_key(entries, "latents_image_") is None:
                reason = "latents or latents_image missing"
            else:
                shape = tuple(entries[key]["shape"])
                want = expected_latent_hw(selector.select((name.width, name.height)), nabla_resize=nabla_resize)
                if tuple(shape[-2:]) != want:
                    reason = f"latent size {shape[-1]}x{shape[-2]} != {want[1]}x{want[0]} (--nabla_resize {'on' if nabla_resize else 'off'})"
                else:
                    factor_key = next((k for k in entries if k.startswith("vae_scaling_factor")), None)
                    if factor_key is not None:
                        with safe_open(str(path), framework="pt") as f:
                            factor = float(f.get_tensor(factor_key))
                        if abs(factor - expected_factor) > 1e-6:
                            reason = f"vae_scaling_factor {factor:g} != {expected_factor:g} (other VAE)"
            if reason:
                logger.info(f"{path}: cache written with other settings ({reason}); re-encoding")
                path.unlink()
                removed += 1
    return removed


# ------------------------------------------------------------------------------------------------------------ text


def is_multi_frame(params: DatasetParams) -> bool:
    """Whether a dataset yields clips of more than one frame (a video dataset not limited to ``target_frames = [1]``)."""
    return params.is_video and (params.frame_extraction == "full" or max(params.target_frames) > 1)


def template_mode_for_dataset(params: DatasetParams, *, image_edit: bool = False) -> str:
    """Template of a dataset's captions (defect #5): ``image_edit`` when editing, ``video`` for a video dataset whose
    clips have more than one frame, else ``image`` (images, or video datasets with ``target_frames = [1]`` only, which
    are single-frame samples and use the image template at inference too)."""
    if image_edit:
        return template_mode_for(False, image_edit=True)
    return template_mode_for(is_multi_frame(params))


def qwen_max_length_for_run(mode: str, *, task: TaskConfig | None = None, override: int | None = None) -> int:
    """Qwen token budget after the template: ``--qwen_max_length``, else the task's (256 video / 512 image tasks),
    else the template's (256 video / 512 image)."""
    if override is not None:
        return int(override)
    if task is not None:
        return task.qwen_max_length
    return qwen_max_length_for(mode)


def te_cache_metadata(mode: str, qwen_max_length: int, crop_start: int, clip_max_length: int = CLIP_MAX_LENGTH) -> dict[str, str]:
    """The TE-cache metadata of ``Kandinsky5TextEncoder.cache_metadata`` (template, budget, crop, CLIP length)."""
    return {
        "k5_template": mode,
        "k5_qwen_max_length": str(qwen_max_length),
        "k5_crop_start": str(crop_start),
        "k5_clip_max_length": str(clip_max_length),
    }


def load_control_images(item: TextItem) -> list[Any]:
    """RGB PIL images of an item's controls (the source image shown to Qwen with the image_edit template)."""
    from PIL import Image

    if not item.control_paths:
        raise UserError(
            f"{item.media_path}: --image_edit_training needs a control (source) image for every item; "
            f"set control_directory (or control_path in the JSONL) in {item.dataset.table} of {item.dataset.config_path}"
        )
    images = []
    for p in item.control_paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # PIL raises many types for corrupt files
            raise UserError(f"{p}: cannot read the control image ({e})") from None
    return images


def encode_text_items(encoder: Any, items: Sequence[TextItem], mode: str) -> list[dict[str, torch.Tensor]]:
    """The K5 ``encode`` for ``dataset.text_caching.cache_text_encoder_outputs`` (``encoder``: a ``Kandinsky5TextEncoder``).

    Per caption ``varlen_text_embeds`` ``(L, D)`` at the valid length (prompt tokens + ``<|im_end|>`` after the
    template crop, truncated to the budget), ``varlen_pooled_embed`` ``(D2,)`` and ``varlen_attention_mask``
    ``(L,)`` bool (all True; Blissful's key set). ``image_edit`` shows each item's control images to Qwen.
    """
    prompts = [it.caption for it in items]
    images = [load_control_images(it) for it in items] if mode == "image_edit" else None
    out = []
    for enc in encoder.encode(prompts, mode, images=images):
        emb = enc["text_embeds"]
        out.append(
            {
                "varlen_text_embeds": emb,
                "varlen_pooled_embed": enc["pooled_embed"],
                "varlen_attention_mask": torch.ones(emb.shape[0], dtype=torch.bool),
            }
        )
    return out


def text_from_batch(batch: dict[str, Any], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ``i``'s text of a training batch: ``(text_embeds (L, D), pooled (D2,))`` at the valid length.

    Reads our / Blissful caches (``varlen_*`` keys: lists in the batch) and upstream musubi caches (``text_embeds``,
    ``pooled_embed``, ``attention_mask`` stacked; pad rows, if any, are dropped with the mask).
    """
    if "text_embeds" not in batch or "pooled_embed" not in batch:
        raise UserError(
            f"{_item_name(batch, i)}: no Kandinsky 5 text embeddings (text_embeds / pooled_embed) in the TE cache; "
            "run kandinsky5_cache_text_encoder_outputs.py with this dataset config"
        )
    emb = batch["text_embeds"][i]
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    mask = batch.get("attention_mask")
    if mask is not None:
        m = mask[i].reshape(-1).bool()
        if m.shape[0] != emb.shape[0]:
            raise UserError(
                f"{_item_name(batch, i)}: attention_mask length {m.shape[0]} != text_embeds length {emb.shape[0]}; "
                "re-run the text-encoder caching script"
            )
        if not bool(m.all()):
            emb = emb[m]
    pooled = batch["pooled_embed"][i].reshape(-1)
    return emb, pooled


def text_batch(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All items' text padded: ``(text_embeds (B, Lmax, D), key mask (B, Lmax) bool, pooled (B, D2))``."""
    n = len(batch["pooled_embed"])
    pairs = [text_from_batch(batch, i) for i in range(n)]
    embeds, mask = pad_varlen([e for e, _ in pairs])
    return embeds, mask, torch.stack([p for _, p in pairs])


def _item_name(batch: dict[str, Any], i: int) -> str:
    keys = batch.get("item_keys")
    return str(keys[i]) if keys and i < len(keys) else f"batch item {i}"
