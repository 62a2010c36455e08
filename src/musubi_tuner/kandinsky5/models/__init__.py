"""Kandinsky 5 models: the DiT (``dit``), NABLA sparse attention (``nabla``) and checkpoint loading (``loading``)."""
