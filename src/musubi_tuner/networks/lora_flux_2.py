"""``--network_module networks.lora_flux_2``: LoRA for the FLUX.2 DiT (specs/flux2.md §9, networks.md §3).

Targets every Linear of ``DoubleStreamBlock`` (img/txt ``attn.qkv``, ``attn.proj``, ``mlp.0``, ``mlp.2``: 8) and
``SingleStreamBlock`` (``linear1``, ``linear2``: 2) — 160 modules for dev. ``.*(norm).*`` is always excluded, the
modulation heads only when the user gives no exclude patterns (they are outside the blocks anyway).
"""

from __future__ import annotations

from musubi_tuner.networks import lora
from musubi_tuner.networks.arch_targets import TARGETS

FLUX_2 = TARGETS["flux_2"]

create_arch_network, create_arch_network_from_weights = lora.arch_network_functions(FLUX_2, "networks.lora_flux_2")
