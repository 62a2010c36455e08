"""``--network_module networks.lora_kandinsky``: LoRA for the Kandinsky 5 DiT (specs/networks.md §3.1).

Targets every Linear of ``TransformerEncoderBlock`` (text) and ``TransformerDecoderBlock`` (visual) except the
modulation (``.*modulation.*`` is always excluded): 6 modules per text block, 10 per visual block. The default
include list (attention and feed-forward Linears) applies when the user gives no ``include_patterns``.
"""

from __future__ import annotations

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

KANDINSKY5 = TARGETS["kandinsky5"]

create_arch_network, create_arch_network_from_weights = lora.arch_network_functions(KANDINSKY5, "networks.lora_kandinsky")
