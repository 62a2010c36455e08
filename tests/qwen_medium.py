"""The medium Qwen-Image configuration of the memory tests (specs/memory_estimator.md §3.2, §10): the ``k5_medium``
interface (``write_checkpoint``, ``load``, ``add_network``, ``inputs``) for the T2I / Edit layout.

inner dim 256 (4 heads of 64), 4 blocks, text width 64 (32 tokens), LoRA rank 16; a latent ``(B, 16, F, h, w)`` is
``F·h/2·w/2`` packed tokens of 64 channels. The text mask is left out (the traced step runs without it, spec §11).
"""

from __future__ import annotations

import json
from pathlib import Path

import medium_common
import torch

from musubi_tuner.qwen_image.configs import get_model_version
from musubi_tuner.qwen_image.models.loading import DIT_CONFIG_METADATA_KEY, load_dit, qwen_fp8_config
from musubi_tuner.qwen_image.packing import img_shapes_for, pack

VERSION = "original"
CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=64,
    guidance_embeds=False,
    axes_dims_rope=[16, 24, 24],
)
TEXT_LEN = 32
RANK = 16
FEW_TOKENS = (1, 16, 1, 8, 8)  # 16 tokens (bf16 matmuls are emulated on CPUs without bf16 units)
LATENT = (1, 16, 1, 32, 32)  # 256 tokens


def write_checkpoint(path: Path, seed: int = 0, fp8: bool = False) -> Path:
    """A random bf16 DiT with its config in the metadata; ``fp8`` writes it pre-quantised."""
    from musubi_tuner.qwen_image.models.dit import QwenImageTransformer

    meta = {DIT_CONFIG_METADATA_KEY: json.dumps(CONFIG, sort_keys=True)}
    return medium_common.write_random_checkpoint(
        path, lambda: QwenImageTransformer(**CONFIG), seed, qwen_fp8_config() if fp8 else None, meta
    )


def load(path: Path, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16):
    """The DiT as the trainer loads it (``load_dit``), frozen."""
    return load_dit(get_model_version(VERSION), path, device="cpu", dtype=dtype, fp8_base=fp8, fp8_scaled=fp8)


def add_network(dit, module: str = "networks.lora_qwen_image", dim: int = RANK):
    """The trainer's network: ``create_arch_network`` + ``apply_to``; returns it (fp32 parameters)."""
    return medium_common.add_network(dit, module, dim)


def inputs(latent=LATENT, dtype=torch.bfloat16, seed: int = 1):
    """DiT inputs of one batch: packed target tokens with their grids, text states (no mask), σ in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = latent
    return dict(
        hidden_states=pack(torch.randn(b, c, f, h, w, generator=g)).to(dtype),
        encoder_hidden_states=torch.randn(b, TEXT_LEN, CONFIG["joint_attention_dim"], generator=g).to(dtype),
        encoder_hidden_states_mask=None,
        timestep=torch.full((b,), 0.5),
        img_shapes=img_shapes_for((h, w), f, []),
    )
