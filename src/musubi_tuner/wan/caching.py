"""Wan caching callbacks for the shared drivers (specs/wan.md §8, §9).

Latents (``wan_cache_latents.py``): per item ``latents`` ``(C, F', H/s, W/s)`` (normalised), with ``--i2v`` the 20-channel
``latents_image`` (mask 4 + first-frame latent 16), with ``--clip`` the 2.1 ``clip`` tokens ``(257, 1280)`` of the first
frame, for Fun-Control datasets ``latents_control`` (the control video's latent). FLF2V (``--task flf2v-14B``): the
condition holds the clip's first and last frames (mask 1 on both) and ``clip`` is ``(2, 257, 1280)`` (first, last) —
the layout the FLF2V generator builds from a start and an end image. Text (``wan_cache_text_encoder_outputs.py``):
``varlen_t5`` ``(L, 4096)`` at each prompt's length; the trainer zero-pads to 512.

One-frame (``--one_frame``, image datasets with control images and ``fp_1f_*`` keys; ``wan.one_frame``): ``latents``
``(C, F, h, w)`` with the target image's latent at the target frame and the control latents at theirs,
``latents_image`` the one-frame condition, ``f_indices`` ``(F,)`` int32 (the RoPE time indices), ``clip`` the tokens of
the first control image (FLF2V: first and last control image).
"""

from __future__ import annotations

from typing import Any

import torch

from musubi_tuner.dataset.latent_caching import LatentBatch
from musubi_tuner.dataset.text_caching import TextItem
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.conditioning import clip_image_tokens, encode_image_condition


def encode_latent_batch(
    vae: Any, batch: LatentBatch, *, i2v: bool = False, clip: Any = None, flf2v: bool = False, one_frame: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The Wan ``encode`` for ``dataset.latent_caching.cache_latents`` (``flf2v``: first + last frame conditions;
    ``one_frame``: the one-frame training layout)."""
    if one_frame:
        return encode_one_frame_batch(vae, batch, clip=clip, flf2v=flf2v)
    pixels = batch.pixels
    frames = pixels.shape[2]
    if flf2v and frames < 2:
        raise UserError(
            f"{batch.items[0].source.path}: FLF2V conditions on a clip's first and last frames; this item has {frames} frame "
            "(use video datasets with --task flf2v-14B)"
        )
    last = pixels[:, :, -1] if flf2v else None
    latents = vae.encode(pixels)
    out = [{"latents": latents[i].to(vae.dtype)} for i in range(len(batch.items))]
    if i2v:
        cond = encode_image_condition(vae, pixels[:, :, 0], frames, last)
        for i, named in enumerate(out):
            named["latents_image"] = cond[i].to(vae.dtype)
    if clip is not None:
        tokens = clip_image_tokens(clip, pixels[:, :, 0], last)
        for i, named in enumerate(out):
            named["clip"] = tokens[i].to(torch.float16)
    if batch.controls:
        ctrl = batch.controls[0]
        if ctrl.shape[2] != frames:
            raise UserError(f"{batch.items[0].source.path}: control video has {ctrl.shape[2]} frames, the target {frames}")
        c_lat = vae.encode(ctrl)
        for i, named in enumerate(out):
            named["latents_control"] = c_lat[i].to(vae.dtype)
    return out


def encode_one_frame_batch(vae: Any, batch: LatentBatch, *, clip: Any = None, flf2v: bool = False) -> list[dict[str, torch.Tensor]]:
    """One-frame training caches of a batch of images with their control images (``wan.one_frame``)."""
    from musubi_tuner.wan.one_frame import dataset_one_frame_options, encode_one_frame

    item = batch.items[0]
    where = f"{item.source.path}"
    options = dataset_one_frame_options(batch.dataset)
    n = len(options.control_indices)
    if len(batch.controls) != n:
        raise UserError(
            f"{where}: fp_1f_clean_indices lists {n} clean frame(s) but the item has {len(batch.controls)} control image(s) "
            "(control_directory: one per clean index, numbered <stem>_0, <stem>_1, ... for several)"
        )
    size = tuple(batch.pixels.shape[-2:])
    for i, ctrl in enumerate(batch.controls):
        if tuple(ctrl.shape[-2:]) != size or ctrl.shape[2] != 1:
            raise UserError(
                f"{where}: control image {i} is {ctrl.shape[-1]}x{ctrl.shape[-2]}, the target {size[1]}x{size[0]}: one-frame "
                "training resizes controls to the target's bucket (drop no_resize_control / control_resolution)"
            )
    if flf2v and n < 2:
        raise UserError(f"{where}: FLF2V one-frame training needs two control images (first and last), got {n}")
    y, latents = encode_one_frame(vae, [c[:, :3] for c in batch.controls], options, target=batch.pixels[:, :3])
    assert latents is not None
    f_indices = torch.tensor(options.frame_indices, dtype=torch.int32)
    out = []
    for i in range(len(batch.items)):
        out.append({"latents": latents[i].to(vae.dtype), "latents_image": y[i].to(vae.dtype), "f_indices": f_indices.clone()})
    if clip is not None:
        first = batch.controls[0][:, :3, 0]
        tokens = clip_image_tokens(clip, first, batch.controls[-1][:, :3, 0] if flf2v else None)
        for i, named in enumerate(out):
            named["clip"] = tokens[i].to(torch.float16)
    return out


def encode_text_items(encoder: Any, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
    """The Wan ``encode`` for ``dataset.text_caching.cache_text_encoder_outputs``: ``varlen_t5`` per caption (bf16)."""
    states = encoder.encode([it.caption for it in items])
    return [{"varlen_t5": s.to(torch.bfloat16)} for s in states]


def text_from_batch(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The T5 states of a training batch, one ``(L_i, 4096)`` per item (our ``varlen_t5`` or upstream's ``t5``)."""
    t5 = batch.get("t5")
    if t5 is None:
        keys = sorted(k for k in batch if not k.startswith("latents"))
        raise UserError(
            f"{batch.get('item_keys', ['?'])[0]}: the matching text-encoder cache (*_wan_te.safetensors) has no Wan T5 states (varlen_t5); "
            f"batch keys: {keys} (cache written by another architecture or text encoder? re-run wan_cache_text_encoder_outputs.py)"
        )
    if isinstance(t5, torch.Tensor):
        return list(t5)
    return list(t5)
