"""``--network_module networks.lora_flux_2``: LoRA for the FLUX.2 DiT (specs/flux2.md §9, networks.md §3).

Targets every Linear of ``DoubleStreamBlock`` (img/txt ``attn.qkv``, ``attn.proj``, ``mlp.0``, ``mlp.2``: 8) and
``SingleStreamBlock`` (``linear1``, ``linear2``: 2) — 160 modules for dev. ``.*(norm).*`` is always excluded, the
modulation heads only when the user gives no exclude patterns (they are outside the blocks anyway).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

FLUX_2 = TARGETS["flux_2"]

FLUX_2_TARGET_REPLACE_MODULES = list(FLUX_2.target_modules or ())
DEFAULT_EXCLUDE_PATTERNS = list(FLUX_2.default_excludes)


def create_arch_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> lora.LoRANetwork:
    """LoRA over the FLUX.2 transformer blocks."""
    return lora.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=FLUX_2.target_modules,
        targets=FLUX_2,
        neuron_dropout=neuron_dropout,
        module_name="networks.lora_flux_2",
        **kwargs,
    )


def create_arch_network_from_weights(
    multiplier: float,
    weights_sd: dict[str, torch.Tensor],
    text_encoders: Any = None,
    unet: nn.Module | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> lora.LoRANetwork:
    """Network from a kohya-format FLUX.2 state dict (LoRA and/or LoHa modules)."""
    return lora.create_arch_network_from_weights(
        multiplier, weights_sd, text_encoders, unet, for_inference, module_name="networks.lora_flux_2", **kwargs
    )
