"""Qwen-Image (T2I, Edit, Edit-2509, Edit-2511, Layered): model, encoders, caching, training and generation."""
