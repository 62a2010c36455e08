"""``--network_module networks.lora_qwen_image``: LoRA for the Qwen-Image DiT (specs/qwen_image.md §8, networks.md §3).

Targets the Linears of ``QwenImageTransformerBlock``: attention (8) and the two MLPs (4) = 12 modules per block. The
modulation Linears ``img_mod.1`` / ``txt_mod.1`` are excluded by default (musubi-tuner's ``.*(_mod_).*`` intended this
but never matches a dotted path); ``--network_args exclude_mod=False`` trains them too (14 per block).
"""

from __future__ import annotations

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

QWEN_IMAGE = TARGETS["qwen_image"]

create_arch_network, create_arch_network_from_weights = lora.arch_network_functions(QWEN_IMAGE, "networks.lora_qwen_image")
