"""Kandinsky 5 LoRA training math: the DiT call of one cached batch (specs/kandinsky5.md §9, §10, §12.3).

One copy of the prompt tokens per sample (defect #1), the I2V layout of ``kandinsky5.conditioning`` (the function the
inference pipeline uses too, defect #2), ``time = 1000·t`` exactly (defect #15) and NABLA parameters built per batch
grid. The trainer script (``kandinsky5_train_network.py``) only wires these into the common loop.

Layouts: cached latents are channels-first ``(B, 16, F, H, W)``; the DiT is channels-last ``(B, F, H, W, C)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from musubi_tuner.kandinsky5.caching import text_batch
from musubi_tuner.kandinsky5.conditioning import I2VMode, build_dit_input, conditioned_frame_indices
from musubi_tuner.kandinsky5.configs import LATENT_CHANNELS, TaskConfig
from musubi_tuner.kandinsky5.models.nabla import DEFAULT_FORCED_P, NABLA_METHODS, TILE, NablaParams, build_sparse_params
from musubi_tuner.utils.errors import UserError

NABLA_PIXEL_MULTIPLE = TILE * 2 * 8  # 8 tokens per tile side x patch 2 x VAE 8 = 128 px


# ----------------------------------------------------------------------------------------------------------------------
# layouts


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` → ``(B, F, H, W, C)``."""
    return x.permute(0, 2, 3, 4, 1)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, F, H, W, C)`` → ``(B, C, F, H, W)``."""
    return x.permute(0, 4, 1, 2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# NABLA settings (§12.3: both upstream spellings enable it, default = the task's attention, --dense_attention opts out)


@dataclass(frozen=True)
class NablaSettings:
    """NABLA configuration of a run; ``task`` carries the effective P / windows / method / STA flag."""

    task: TaskConfig

    @property
    def P(self) -> float:
        return float(self.task.nabla_p if self.task.nabla_p is not None else DEFAULT_FORCED_P)

    def params(self, latent_shape: tuple[int, int, int], device: torch.device | str = "cpu") -> NablaParams | None:
        """Sparse parameters for a latent ``(F, H, W)``; a ``UserError`` when it is not 128-px aligned."""
        return build_sparse_params(self.task, tuple(latent_shape), force_nabla=True, nabla_p=self.P, device=device)

    def describe(self) -> str:
        t = self.task
        return f"NABLA P={self.P} wT={t.nabla_wT} wH={t.nabla_wH} wW={t.nabla_wW} method={t.nabla_method} add_sta={t.nabla_add_sta}"


def resolve_nabla_settings(
    task: TaskConfig,
    *,
    force: bool = False,
    dense: bool = False,
    P: float | None = None,
    wT: int | None = None,
    wH: int | None = None,
    wW: int | None = None,
    method: str | None = None,
    add_sta: bool | None = None,
) -> NablaSettings | None:
    """The run's NABLA settings, or ``None`` for dense attention.

    NABLA is on for tasks whose attention is NABLA and for any task with ``force`` (``--force_nabla_attention`` /
    ``--use_nabla_attention``); ``dense`` (``--dense_attention``) turns it off. Unset values come from the task (P
    from the task, 0.9 for a forced dense task; windows 11/3/3, ``topcdf``, STA on). A ``--nabla_*`` value without
    NABLA is an error rather than a silently ignored flag.
    """
    given = {
        "--nabla_P": P,
        "--nabla_wT": wT,
        "--nabla_wH": wH,
        "--nabla_wW": wW,
        "--nabla_method": method,
        "--nabla_add_sta/--no_nabla_add_sta": add_sta,
    }
    if force and dense:
        raise UserError("--force_nabla_attention/--use_nabla_attention and --dense_attention cannot be combined")
    enabled = (task.uses_nabla or force) and not dense
    if not enabled:
        used = [k for k, v in given.items() if v is not None]
        if used:
            why = "--dense_attention is set" if dense else f"task '{task.name}' uses dense attention"
            raise UserError(f"{', '.join(used)} only apply to NABLA attention, but {why}; add --force_nabla_attention or drop them")
        return None
    p = P if P is not None else (task.nabla_p if task.nabla_p is not None else DEFAULT_FORCED_P)
    m = method if method is not None else task.nabla_method
    if m not in NABLA_METHODS:
        raise UserError(f"--nabla_method {m!r}: valid methods are {', '.join(NABLA_METHODS)}")
    if not p > 0 or (m == "topcdf" and p > 1):
        raise UserError(f"--nabla_P must be in (0, 1] for topcdf (a count > 1 is allowed for topk), got {p}")
    for flag, value in (("--nabla_wT", wT), ("--nabla_wH", wH), ("--nabla_wW", wW)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    eff = dataclasses.replace(
        task,
        nabla_p=float(p),
        nabla_wT=wT if wT is not None else task.nabla_wT,
        nabla_wH=wH if wH is not None else task.nabla_wH,
        nabla_wW=wW if wW is not None else task.nabla_wW,
        nabla_method=m,
        nabla_add_sta=add_sta if add_sta is not None else task.nabla_add_sta,
    )
    return NablaSettings(eff)


def check_nabla_latent_sizes(sizes: Sequence[tuple[int, int]], source: str) -> None:
    """A ``UserError`` naming ``source`` when a cached latent size ``(H, W)`` is not 128-px aligned (NABLA tiles)."""
    need = NABLA_PIXEL_MULTIPLE // 8
    bad = sorted({(w * 8, h * 8) for h, w in sizes if h % need or w % need})
    if bad:
        shown = ", ".join(f"{w}x{h}" for w, h in bad[:6]) + (" ..." if len(bad) > 6 else "")
        raise UserError(
            f"{source}: NABLA attention needs frame sizes that are multiples of {NABLA_PIXEL_MULTIPLE} px, but these "
            f"cached buckets (W x H px) are not: {shown}. Re-cache with kandinsky5_cache_latents.py --nabla_resize, "
            f"use resolutions that are multiples of {NABLA_PIXEL_MULTIPLE} without bucketing, or train with --dense_attention"
        )


# ----------------------------------------------------------------------------------------------------------------------
# the DiT call of a training step


@dataclass
class DitInputs:
    """Keyword inputs of ``DiffusionTransformer3D.forward`` for one batch, plus the conditioned frame indices."""

    x: torch.Tensor
    text_embed: torch.Tensor
    pooled_text_embed: torch.Tensor
    time: torch.Tensor
    scale_factor: tuple[float, float, float]
    sparse_params: NablaParams | None
    text_mask: torch.Tensor
    indices: list[int]

    def call(self, dit: torch.nn.Module) -> torch.Tensor:
        """Run ``dit`` on these inputs: velocity ``(B, F, H, W, 16)`` channels-last."""
        return dit(
            self.x,
            self.text_embed,
            self.pooled_text_embed,
            self.time,
            scale_factor=self.scale_factor,
            sparse_params=self.sparse_params,
            text_mask=self.text_mask,
        )


def i2v_clean_frames(batch: dict[str, Any], indices: list[int]) -> torch.Tensor | None:
    """Clean conditioning latents ``(B, len(indices), H, W, 16)`` from the batch's ``latents_image`` (first, last)."""
    if not indices:
        return None
    image = batch.get("latents_image")
    if image is None:
        raise UserError(
            "I2V training needs the first/last-frame latents (latents_image_*) in the latent caches; "
            "re-run kandinsky5_cache_latents.py for this dataset config"
        )
    if image.dim() != 5 or image.shape[1] != LATENT_CHANNELS:
        raise UserError(f"latents_image has shape {tuple(image.shape)}, expected (B, 16, 2, H, W); re-run latent caching")
    # cache layout: frame 0 = first image, frame 1 = last image; index F-1 takes the last one
    picks = [0 if i == 0 else min(1, image.shape[2] - 1) for i in indices]
    return channels_last(image[:, :, picks])


def control_latents(batch: dict[str, Any]) -> torch.Tensor:
    """The I2I source latents ``(B, F, H, W, 16)`` channels-last (``latents_control_0`` / ``latents_control``)."""
    for key in ("latents_control_0", "latents_control"):
        if key in batch:
            return channels_last(batch[key])
    raise UserError(
        "image-edit (k5-lite-i2i-hd) training needs source-image latents (latents_control_*) in the latent caches; "
        "give the dataset control images and re-run kandinsky5_cache_latents.py"
    )


def build_training_dit_inputs(
    task: TaskConfig,
    noisy_model_input: torch.Tensor,
    batch: dict[str, Any],
    timesteps: torch.Tensor,
    *,
    visual_cond: bool,
    i2v_mode: I2VMode = "none",
    nabla: NablaSettings | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> DitInputs:
    """Assemble the DiT inputs of one training step.

    Args:
        task: the task (RoPE scale factors; I2I instruct layout).
        noisy_model_input: ``x_t`` ``(B, 16, F, H, W)``.
        batch: the cached batch (text embeddings, ``latents_image`` for I2V, control latents for I2I).
        timesteps: ``(B,)`` on the 0..1000 scale, passed unchanged (``1000·t``, no +1).
        visual_cond: the model takes 33 channels (every video model, T2V included).
        i2v_mode: ``"none"`` (T2V), ``"first"`` or ``"first_last"``; the clean latents replace those frames of
            ``x_t``, the mask is 1 there and ``visual_cond`` stays zero (``conditioning.build_dit_input``).
        nabla: NABLA settings or None (dense).
        device / dtype: where and in which dtype the visual input is built (``None`` keeps ``x_t``'s dtype).
    """
    if noisy_model_input.dim() != 5 or noisy_model_input.shape[1] != LATENT_CHANNELS:
        raise UserError(
            f"latents of shape {tuple(noisy_model_input.shape)} are not Kandinsky 5 latents (B, 16, F, H, W); "
            "re-run kandinsky5_cache_latents.py"
        )
    noisy = channels_last(noisy_model_input).to(device)
    if dtype is not None:
        noisy = noisy.to(dtype)
    b, f, h, w, _ = noisy.shape
    if task.is_i2i:
        source = control_latents(batch).to(device=device, dtype=noisy.dtype)
        if source.shape != noisy.shape:
            raise UserError(f"control latents {tuple(source.shape)} do not match the target latents {tuple(noisy.shape)}")
        x = torch.cat([noisy, source, torch.ones_like(noisy[..., :1])], dim=-1)
        indices: list[int] = []
    else:
        indices = conditioned_frame_indices(f, i2v_mode)
        clean = i2v_clean_frames(batch, indices)
        if clean is not None:
            clean = clean.to(device=device, dtype=noisy.dtype)
            if clean.shape[2:4] != noisy.shape[2:4]:
                raise UserError(
                    f"latents_image {tuple(clean.shape)} does not match the latents {tuple(noisy.shape)}; re-run latent caching"
                )
        x = build_dit_input(noisy, clean, indices, visual_cond)
    text, mask, pooled = text_batch(batch)
    if text.shape[0] != b:
        raise UserError(f"batch has {b} latents but {text.shape[0]} text embeddings; re-run the caching scripts")
    sparse = nabla.params((f, h, w), device) if nabla is not None else None
    return DitInputs(
        x=x,
        text_embed=text.to(device),
        pooled_text_embed=pooled.to(device),
        time=timesteps.to(device=device, dtype=torch.float32).reshape(-1),
        scale_factor=tuple(float(s) for s in task.rope_scale),
        sparse_params=sparse,
        text_mask=mask.to(device),
        indices=indices,
    )


def frame_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor, frame_weights: Sequence[float] | None
) -> torch.Tensor:
    """``mean(w_t · w_f · (pred − target)²) / mean(w_f)`` over ``(B, C, F, H, W)``: the mean over the frames that count."""
    err = (pred.float() - target.float()) ** 2
    w = sample_weight.to(err.device).float().view(-1, 1, 1, 1, 1)
    if frame_weights is None:
        return (w * err).mean()
    fw = torch.as_tensor(list(frame_weights), dtype=torch.float32, device=err.device)
    if fw.numel() != err.shape[2]:
        raise ValueError(f"{fw.numel()} frame weights for {err.shape[2]} frames")
    return (w * fw.view(1, 1, -1, 1, 1) * err).mean() / fw.mean().clamp_min(1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# DiT parameters (--override_dit)


def dit_constructor_fields() -> list[str]:
    """The DiT config fields ``--override_dit`` may set."""
    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D

    names = list(inspect.signature(DiffusionTransformer3D.__init__).parameters)
    return [n for n in names if n not in ("self", "attn_mode")]


def parse_override_dit(text: str | None) -> dict[str, Any]:
    """``--override_dit '{"attention_type": "nabla"}'`` → dict; bad JSON or unknown fields are ``UserError``s."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--override_dit: not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"--override_dit: expected a JSON object of DiT config fields, got {text!r}")
    valid = dit_constructor_fields()
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise UserError(f"--override_dit: unknown DiT field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    for key in ("patch_size", "axes_dims"):
        if key in value:
            value[key] = tuple(value[key])
    return value
