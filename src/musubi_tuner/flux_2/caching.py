"""The ``encode`` callbacks of the shared caching drivers for FLUX.2 and the TE-cache compatibility check.

Latent caches (suffix ``f2``): ``latents_{h}x{w}_{dtype}`` — normalised, patchified ``(128, H/16, W/16)`` — and one
``latents_control_{i}_{h}x{w}_{dtype}`` per reference image. TE caches: ``ctx_vec_{dtype}`` ``(512, 3·hidden)`` with
the encoder recorded in the metadata (``flux2_text_encoder`` = ``qwen3-2560`` / ``qwen3-4096`` / ``mistral3-5120``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from musubi_tuner.dataset.cache_format import read_header
from musubi_tuner.dataset.latent_caching import LatentBatch
from musubi_tuner.dataset.text_caching import TextItem
from musubi_tuner.flux_2.configs import ModelVersion
from musubi_tuner.flux_2.text_encoders import KIND_NAMES, Flux2TextEncoder
from musubi_tuner.flux_2.vae import Flux2Vae
from musubi_tuner.utils.errors import UserError

TE_ENCODER_KEY = "flux2_text_encoder"


def _rgb_frames(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, C, 1, H, W)`` in [-1, 1] → ``(B, 3, H, W)`` (alpha dropped)."""
    return pixels[:, :3, 0]


def encode_latent_batch(vae: Flux2Vae, batch: LatentBatch) -> list[dict[str, torch.Tensor]]:
    """Targets and reference images of one bucket → per item ``latents`` and ``latents_control_{i}``."""
    if batch.frame_count != 1:
        raise UserError(
            f"{batch.dataset.table} of {batch.dataset.config_path}: FLUX.2 trains on images; this dataset yields "
            f"{batch.frame_count}-frame clips"
        )
    dtype = vae.dtype
    target = vae.encode(_rgb_frames(batch.pixels)).to(dtype).cpu()
    controls = [vae.encode(_rgb_frames(c)).to(dtype).cpu() for c in batch.controls]
    out = []
    for i in range(target.shape[0]):
        item = {"latents": target[i]}
        for j, c in enumerate(controls):
            item[f"latents_control_{j}"] = c[i]
        out.append(item)
    return out


def encode_text_items(encoder: Flux2TextEncoder, items: list[TextItem]) -> list[dict[str, torch.Tensor]]:
    """Captions → ``ctx_vec`` ``(512, 3·hidden)`` per item."""
    ctx = encoder.encode([it.caption for it in items]).cpu()
    return [{"ctx_vec": ctx[i]} for i in range(len(items))]


def expected_encoder_prefix(version: ModelVersion) -> str:
    return f"{version.text_encoder}-"


def check_te_caches(paths: Iterable[Path], version: ModelVersion, context_dim: int | None = None) -> None:
    """Every TE cache must come from the encoder ``version`` needs (and fit the DiT's context width)."""
    for path in paths:
        _, md = read_header(path)
        enc = md.get(TE_ENCODER_KEY)
        if enc is None or not enc.startswith(expected_encoder_prefix(version)):
            made = f"with {enc}" if enc else "without a FLUX.2 encoder record (another tool or architecture)"
            raise UserError(
                f"{path}: text-encoder cache made {made}; --model_version {version.name} needs "
                f"{KIND_NAMES[version.text_encoder]} outputs: re-run flux_2_cache_text_encoder_outputs.py with its encoder"
            )
        if context_dim is not None:
            hidden = int(enc.rsplit("-", 1)[1])
            if 3 * hidden != context_dim:
                raise UserError(
                    f"{path}: text-encoder cache is {3 * hidden} wide ({enc}), the DiT takes {context_dim}; "
                    "re-cache with the encoder of this model version"
                )
