"""The medium Wan configuration of the memory tests (specs/memory_estimator.md §3.2, §10): the ``k5_medium``
interface (``write_checkpoint``, ``load``, ``add_network``, ``inputs``) for a 2.1 T2V layout.

dim 256 (4 heads of 64), FFN 1024, 4 blocks, text width 64 (zero-padded to 512 tokens by the model), LoRA rank 16; a
latent ``(B, 16, F, H, W)`` is ``F·H/2·W/2`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import medium_common
import torch

from musubi_tuner.wan.configs import dit_params_for, get_task_config
from musubi_tuner.wan.models.loading import load_dit, wan_fp8_config

TASK = "t2v-1.3B"
CONFIG = {**dit_params_for(get_task_config(TASK)), "dim": 256, "ffn_dim": 1024, "num_heads": 4, "num_layers": 4, "text_dim": 64}
CONFIG["patch_size"] = list(CONFIG["patch_size"])
TEXT_LEN = 32
RANK = 16
FEW_TOKENS = (1, 16, 1, 8, 8)  # 16 tokens (bf16 matmuls are emulated on CPUs without bf16 units)
LATENT = (1, 16, 1, 32, 32)  # 256 tokens


def write_checkpoint(path: Path, seed: int = 0, fp8: bool = False) -> Path:
    """A random bf16 official-layout DiT with its config in the metadata; ``fp8`` writes it pre-quantised."""
    from musubi_tuner.wan.models.dit import WanModel

    meta = {"wan_dit_config": json.dumps(CONFIG, sort_keys=True)}
    return medium_common.write_random_checkpoint(path, lambda: WanModel(**CONFIG), seed, wan_fp8_config() if fp8 else None, meta)


def load(path: Path, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16):
    """The DiT as the trainer loads it (``load_dit``), frozen."""
    return load_dit(get_task_config(TASK), path, device="cpu", dtype=dtype, fp8_base=fp8, fp8_scaled=fp8)


def add_network(dit, module: str = "networks.lora_wan", dim: int = RANK):
    """The trainer's network: ``create_arch_network`` + ``apply_to``; returns it (fp32 parameters)."""
    return medium_common.add_network(dit, module, dim)


def inputs(latent=LATENT, dtype=torch.bfloat16, seed: int = 1):
    """DiT inputs of one batch: the noisy latent, ``t`` on the 0..1000 scale, per-item text states."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = latent
    return dict(
        x=torch.randn(b, c, f, h, w, generator=g).to(dtype),
        timestep=torch.full((b,), 500.0),
        context=[torch.randn(TEXT_LEN, CONFIG["text_dim"], generator=g).to(dtype) for _ in range(b)],
    )
