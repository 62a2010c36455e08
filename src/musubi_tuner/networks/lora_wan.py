"""``--network_module networks.lora_wan``: LoRA for the Wan DiT (specs/networks.md §3.4, specs/wan.md §9).

Targets the Linears of ``WanAttentionBlock``: ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``cross_attn.{k_img,v_img}``
(2.1 I2V / FLF2V) and ``ffn.{0,2}``; embeddings, norms and the head are always excluded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

WAN = TARGETS["wan"]
WAN_TARGET_REPLACE_MODULES = list(WAN.target_modules or ())
DEFAULT_EXCLUDE_PATTERNS = list(WAN.default_excludes)


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
    """LoRA over the Wan transformer blocks."""
    return lora.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=WAN.target_modules,
        targets=WAN,
        neuron_dropout=neuron_dropout,
        module_name="networks.lora_wan",
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
    """Network from a kohya-format Wan state dict."""
    return lora.create_arch_network_from_weights(
        multiplier, weights_sd, text_encoders, unet, for_inference, module_name="networks.lora_wan", **kwargs
    )
