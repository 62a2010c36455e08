"""``--network_module networks.lora_qwen_image``: LoRA for the Qwen-Image DiT (specs/qwen_image.md §8, networks.md §3).

Targets the Linears of ``QwenImageTransformerBlock``: attention (8) and the two MLPs (4) = 12 modules per block. The
modulation Linears ``img_mod.1`` / ``txt_mod.1`` are excluded by default (musubi-tuner's ``.*(_mod_).*`` intended this
but never matches a dotted path); ``--network_args exclude_mod=False`` trains them too (14 per block).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

QWEN_IMAGE = TARGETS["qwen_image"]
QWEN_IMAGE_TARGET_REPLACE_MODULES = list(QWEN_IMAGE.target_modules or ())
MODULE_NAME = "networks.lora_qwen_image"


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
    """LoRA over the Qwen-Image transformer blocks."""
    return lora.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=QWEN_IMAGE.target_modules,
        targets=QWEN_IMAGE,
        neuron_dropout=neuron_dropout,
        module_name=MODULE_NAME,
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
    """Network from a kohya-format Qwen-Image state dict (LoRA and/or LoHa modules)."""
    return lora.create_arch_network_from_weights(
        multiplier, weights_sd, text_encoders, unet, for_inference, module_name=MODULE_NAME, **kwargs
    )
