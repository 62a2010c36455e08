"""Qwen-Image DiT and its loader."""
