"""Dtype names on the command line (``--dit_dtype bf16``, ``--vae_dtype float16`` ...) → torch dtypes."""

from __future__ import annotations

import torch

from musubi_tuner.utils.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str | None, default: torch.dtype | None, *, flag: str = "dtype") -> torch.dtype | None:
    """``"fp16"`` / ``"bfloat16"`` / ``"torch.float32"`` ... → dtype; None → ``default``; unknown → ``UserError`` naming ``flag``."""
    if name is None:
        return default
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise UserError(f"{flag} {name!r}: unknown dtype; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]
