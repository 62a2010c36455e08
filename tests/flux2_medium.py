"""The medium FLUX.2 configuration of the memory tests (specs/memory_estimator.md §3.2, §10): the ``k5_medium``
interface (``write_checkpoint``, ``load``, ``add_network``, ``inputs``) for the klein layout (no guidance embedder).

hidden 256 (4 heads of 64), 2 double + 4 single blocks, text width 192 (64 tokens), LoRA rank 16; a latent ``(B, h, w)``
is ``h·w`` image tokens of 128 channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import medium_common
import torch

from musubi_tuner.flux_2.configs import get_model_version
from musubi_tuner.flux_2.models.loading import DIT_CONFIG_METADATA_KEY, MODEL_VERSION_METADATA_KEY, flux2_fp8_config, load_dit
from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids

VERSION = "klein-4b"
CONFIG = dict(
    in_channels=128,
    context_in_dim=192,
    hidden_size=256,
    num_heads=4,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[16, 16, 16, 16],
    theta=2000,
    mlp_ratio=3.0,
    guidance_embed=False,
)
TEXT_LEN = 64
RANK = 16
FEW_TOKENS = (1, 4, 4)  # B, h, w: 16 image tokens (bf16 matmuls are emulated on CPUs without bf16 units)
LATENT = (1, 16, 16)  # 256 image tokens


def write_checkpoint(path: Path, seed: int = 0, fp8: bool = False) -> Path:
    """A random bf16 official-layout DiT with its config in the metadata; ``fp8`` writes it pre-quantised."""
    from musubi_tuner.flux_2.models.dit import Flux2

    meta = {DIT_CONFIG_METADATA_KEY: json.dumps(CONFIG), MODEL_VERSION_METADATA_KEY: VERSION}
    return medium_common.write_random_checkpoint(path, lambda: Flux2(**CONFIG), seed, flux2_fp8_config() if fp8 else None, meta)


def load(path: Path, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16):
    """The DiT as the trainer loads it (``load_dit``), frozen."""
    return load_dit(get_model_version(VERSION), path, device="cpu", dtype=dtype, fp8_base=fp8, fp8_scaled=fp8)


def add_network(dit, module: str = "networks.lora_flux_2", dim: int = RANK):
    """The trainer's network: ``create_arch_network`` + ``apply_to``; returns it (fp32 parameters)."""
    return medium_common.add_network(dit, module, dim)


def inputs(latent=LATENT, dtype=torch.bfloat16, seed: int = 1):
    """DiT inputs of one batch: packed image tokens with their ids, text states with theirs, ``t`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = latent
    return dict(
        img=torch.randn(b, h * w, CONFIG["in_channels"], generator=g).to(dtype),
        img_ids=build_img_ids((h, w)).expand(b, -1, -1),
        txt=torch.randn(b, TEXT_LEN, CONFIG["context_in_dim"], generator=g).to(dtype),
        txt_ids=build_txt_ids(TEXT_LEN).expand(b, -1, -1),
        timesteps=torch.full((b,), 0.5),
    )
