"""Device selection shared by the scripts (architecture-independent)."""

from __future__ import annotations

import os

import torch

from musubi_tuner.utils.errors import UserError


def resolve_device(name: str | None, *, flag: str = "--device") -> torch.device:
    """``--device``: None → ``cuda`` when available, else ``cpu``; an unusable device is a ``UserError``.

    Under a launcher with several processes (``WORLD_SIZE`` > 1, e.g. caching with ``accelerate launch``), None and
    ``cuda`` mean this process's own GPU, ``cuda:<LOCAL_RANK>``.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and name in (None, "cuda") and torch.cuda.is_available():
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{flag} {name!r}: not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
    return device
