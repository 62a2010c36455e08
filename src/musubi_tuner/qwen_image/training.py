"""Qwen-Image training step inputs (specs/qwen_image.md §8): pack the noisy target (and the clean controls), pad the
varlen text with its mask, σ = t/1000, Layered ``additional_t_cond`` zeros; the prediction is trimmed to the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musubi_tuner.qwen_image.caching import text_batch
from musubi_tuner.qwen_image.configs import ModelVersion
from musubi_tuner.qwen_image.packing import img_shapes_for, pack, unpack
from musubi_tuner.utils.errors import UserError


def control_latents(batch: dict[str, Any]) -> list[torch.Tensor]:
    """``latents_control_{i}`` of a batch in index order, each ``(B, 16, 1, h, w)``."""
    out = []
    i = 0
    while f"latents_control_{i}" in batch:
        out.append(batch[f"latents_control_{i}"])
        i += 1
    return out


@dataclass
class DitInputs:
    """Keyword arguments of one ``QwenImageTransformer`` call plus what is needed to read its output back."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_mask: torch.Tensor
    timestep: torch.Tensor
    img_shapes: list[tuple[int, int, int]]
    additional_t_cond: torch.Tensor | None
    target_tokens: int
    frames: int
    hw: tuple[int, int]

    def call(self, dit: Any) -> torch.Tensor:
        """Run the DiT and return the target prediction ``(B, 16, F, h, w)``."""
        out = dit(
            self.hidden_states,
            self.encoder_hidden_states,
            self.encoder_hidden_states_mask,
            self.timestep,
            self.img_shapes,
            additional_t_cond=self.additional_t_cond,
        )
        return unpack(out[:, : self.target_tokens], self.frames, *self.hw)


def build_training_inputs(
    version: ModelVersion,
    noisy: torch.Tensor,
    batch: dict[str, Any],
    timesteps: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> DitInputs:
    """DiT inputs for noisy latents ``(B, 16, F, h, w)`` and the batch's text / control caches."""
    b, _, frames, h, w = noisy.shape
    if not version.is_layered and frames != 1:
        raise UserError(f"Qwen-Image {version.name} trains on single images; the latent cache has {frames} frames")
    controls = [c.to(device=device, dtype=dtype) for c in control_latents(batch)]
    if version.is_edit and not controls:
        raise UserError(
            f"--model_version {version.name}: the latent caches have no control latents; re-run qwen_image_cache_latents.py "
            "with control images and the same --model_version"
        )
    if version.is_layered and len(controls) != 1:
        raise UserError(f"--model_version layered needs exactly one control image per item, the caches have {len(controls)}")
    tokens = [pack(noisy.to(device=device, dtype=dtype))] + [pack(c) for c in controls]
    shapes = img_shapes_for((h, w), frames, [tuple(c.shape[-2:]) for c in controls])
    embeds, mask = text_batch(batch)
    return DitInputs(
        hidden_states=torch.cat(tokens, dim=1),
        encoder_hidden_states=embeds.to(device=device, dtype=dtype),
        encoder_hidden_states_mask=mask.to(device),
        timestep=(timesteps.to(device).float() / 1000.0),
        img_shapes=shapes,
        additional_t_cond=torch.zeros(b, dtype=torch.long, device=device) if version.is_layered else None,
        target_tokens=tokens[0].shape[1],
        frames=frames,
        hw=(h, w),
    )
