"""The medium Kandinsky 5 configuration of the memory tests (specs/memory_estimator.md §3.2, §10).

Large enough that weights, activations and LoRA are all visible in allocator counts, small enough for a CPU step in
about a second: model_dim 512, 2 text + 4 visual blocks, 1024 visual + 64 text tokens, LoRA rank 16.
"""

from __future__ import annotations

from pathlib import Path

import medium_common
import torch

from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.models.loading import DIT_CONFIG_METADATA_KEY, load_dit

TASK = "k5-lite-t2v-5s-sd"
CONFIG = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=256,
    in_text_dim2=128,
    time_dim=128,
    model_dim=512,
    ff_dim=2048,
    num_text_blocks=2,
    num_visual_blocks=4,
    axes_dims=(16, 24, 24),
    visual_cond=True,
)
LATENT = (1, 16, 4, 64, 64)  # B, C, F, H, W -> 4 * 32 * 32 = 4096 visual tokens at patch (1, 2, 2)
SMALL_LATENT = (1, 16, 4, 32, 32)  # 1024 visual tokens
TEXT_LEN = 64
RANK = 16


# A quarter of the parameters, for tests that run several real CPU steps (bf16 matmuls are slow on CPUs)
SMALL_CONFIG = {**CONFIG, "model_dim": 256, "ff_dim": 1024, "axes_dims": (8, 12, 12)}


def write_checkpoint(path: Path, seed: int = 0, config: dict | None = None, fp8: bool = False) -> Path:
    """A random bf16 single-file DiT in the official layout, with its constructor arguments in the metadata;
    ``fp8`` writes it pre-quantised (block-scaled fp8 with ``scale_weight`` keys, the K5 targets)."""
    import json

    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D
    from musubi_tuner.kandinsky5.models.loading import k5_fp8_config

    config = config or CONFIG
    meta = {DIT_CONFIG_METADATA_KEY: json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})}
    return medium_common.write_random_checkpoint(
        path, lambda: DiffusionTransformer3D(**config), seed, k5_fp8_config() if fp8 else None, meta
    )


def load(path: Path, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16):
    """The DiT as the trainer loads it (``load_dit``), frozen."""
    return load_dit(get_task_config(TASK), path, device="cpu", dtype=dtype, fp8_base=fp8, fp8_scaled=fp8)


def add_network(dit, module: str = "networks.lora_kandinsky", dim: int = RANK):
    """The trainer's network: ``create_arch_network`` + ``apply_to``; returns it (fp32 parameters)."""
    return medium_common.add_network(dit, module, dim)


def inputs(latent=LATENT, dtype=torch.bfloat16, seed: int = 1):
    """DiT keyword inputs (channels-last 33-channel x, text, pooled, time) of one batch."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = latent
    return dict(
        x=torch.randn(b, f, h, w, 2 * c + 1, generator=g).to(dtype),
        text_embed=torch.randn(b, TEXT_LEN, CONFIG["in_text_dim"], generator=g).to(dtype),
        pooled_text_embed=torch.randn(b, CONFIG["in_text_dim2"], generator=g).to(dtype),
        time=torch.full((b,), 500.0),
    )
