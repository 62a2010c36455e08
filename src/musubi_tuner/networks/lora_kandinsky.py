"""``--network_module networks.lora_kandinsky``: LoRA for the Kandinsky 5 DiT (specs/networks.md §3.1).

Targets every Linear of ``TransformerEncoderBlock`` (text) and ``TransformerDecoderBlock`` (visual) except the
modulation (``.*modulation.*`` is always excluded): 6 modules per text block, 10 per visual block. The default
include list (attention and feed-forward Linears) applies when the user gives no ``include_patterns``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import KANDINSKY5

KANDINSKY5_TARGET_REPLACE_MODULES = list(KANDINSKY5.target_modules or ())
DEFAULT_EXCLUDE_PATTERNS = list(KANDINSKY5.default_excludes)
DEFAULT_INCLUDE_PATTERNS = list(KANDINSKY5.default_includes)


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
    """LoRA over the Kandinsky 5 transformer blocks."""
    return lora.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=KANDINSKY5.target_modules,
        targets=KANDINSKY5,
        neuron_dropout=neuron_dropout,
        module_name="networks.lora_kandinsky",
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
    """Network from a kohya-format Kandinsky 5 state dict (LoRA and/or LoHa modules)."""
    return lora.create_arch_network_from_weights(
        multiplier, weights_sd, text_encoders, unet, for_inference, module_name="networks.lora_kandinsky", **kwargs
    )
