"""Seeds (specs/generation.md §4): string seeds, seeding every RNG, explicit noise generators.

``--seed`` accepts an integer or any string. Integer-like text is that integer; other text is hashed with
``int.from_bytes(sha256(text.encode("utf-8")).digest()[:4], "big")`` (so ``"kitty"`` always gives the same 32-bit
value on every machine). No seed gives a random 32-bit integer. The integer is what gets printed, recorded in
metadata (``bt_seeds``) and used in file names.
"""

from __future__ import annotations

import random
import secrets

import numpy as np
import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.prompt_lines import seed_to_int

_MASK64 = 2**64 - 1

__all__ = ["make_generator", "random_seed", "resolve_seed", "seed_everything", "seed_to_int"]


def random_seed() -> int:
    """A fresh random 32-bit seed (from the OS entropy pool, not from the seeded global RNGs)."""
    return secrets.randbits(32)


def resolve_seed(value: int | str | None, *, option: str = "--seed") -> int:
    """The integer seed for ``value``: int → itself, text → ``seed_to_int``, ``None``/empty → ``random_seed()``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return random_seed()
    try:
        return seed_to_int(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{option}: invalid seed {value!r} ({e})") from None


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy, torch CPU and every CUDA device with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed & _MASK64)  # also seeds all CUDA devices


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (use it for the initial noise).

    Reproducibility needs the same generator device and dtype: CPU and CUDA generators give different noise.
    """
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed) & _MASK64)
    return gen
