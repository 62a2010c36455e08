"""``--network_module networks.lora_wan``: LoRA for the Wan DiT (specs/networks.md §3.4, specs/wan.md §9).

Targets the Linears of ``WanAttentionBlock``: ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``cross_attn.{k_img,v_img}``
(2.1 I2V / FLF2V) and ``ffn.{0,2}``; embeddings, norms and the head are always excluded.
"""

from __future__ import annotations

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

WAN = TARGETS["wan"]

create_arch_network, create_arch_network_from_weights = lora.arch_network_functions(WAN, "networks.lora_wan")
