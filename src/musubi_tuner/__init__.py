"""Blissful Tuner: LoRA/LoHa training and generation for video and image diffusion transformers."""

__version__ = "0.1.0"
