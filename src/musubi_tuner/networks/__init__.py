"""Adapter networks (LoRA, LoHa), their per-architecture targets, merging and format conversion.

``networks.lora`` and ``networks.loha`` hold the architecture-independent math; ``arch_targets`` maps a model class
to the blocks and default filters of its architecture; ``lora_<arch>`` modules are the ``--network_module`` entry
points; ``formats`` parses adapter files; ``merge`` and ``convert`` back the ``merge_lora`` / ``convert_lora`` tools.
"""
