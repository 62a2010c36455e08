"""Device selection for the command-line tools (architecture-independent)."""

from __future__ import annotations

import torch

from musubi_tuner.utils.errors import UserError


def resolve_device(name: str | None, *, flag: str = "--device") -> torch.device:
    """``--device``: None → ``cuda`` when available, else ``cpu``; an unusable device is a ``UserError``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{flag} {name!r}: not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
    return device
