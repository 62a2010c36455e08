"""What the ``<arch>_medium`` test configurations share: a random checkpoint writer and the trainer's network setup."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from musubi_tuner.utils.atomic import save_safetensors_atomic


def write_random_checkpoint(
    path: Path, build: Callable[[], torch.nn.Module], seed: int, fp8_config, metadata: dict[str, str]
) -> Path:
    """``build()`` under ``torch.manual_seed(seed)``, every tensor redrawn as N(0, 0.02²) bf16, saved with ``metadata``;
    ``fp8_config`` (the architecture's fp8 config, or None) writes the Linear weights pre-quantised (``scale_weight``)."""
    from musubi_tuner.modules.fp8_optimization import quantize_state_dict

    torch.manual_seed(seed)
    model = build()
    sd = {k: (torch.randn_like(v) * 0.02).to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if fp8_config is not None:
        linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        sd = quantize_state_dict(sd, fp8_config, linear)
    save_safetensors_atomic(sd, path, metadata)
    return path


def add_network(dit, module: str, dim: int):
    """The trainer's network: ``create_arch_network`` + ``apply_to``; returns it (fp32 parameters)."""
    net = importlib.import_module(f"musubi_tuner.{module}").create_arch_network(1.0, dim, dim, None, None, dit)
    net.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    net.prepare_grad_etc(dit)
    return net
