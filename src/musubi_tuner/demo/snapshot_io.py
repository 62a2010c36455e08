"""Small helpers every tiny-bundle writer shares: seeded module construction, the HF snapshot JSON files and the
bundle manifests."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (module default inits use it) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON with sorted keys (the same bytes for the same content)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(root: str | os.PathLike, name: str, what: str) -> tuple[Path, dict, dict[str, Path | None]]:
    """``(root, manifest, paths)`` of a bundle written by a tiny-bundle writer: its manifest ``name`` parsed, each
    ``paths`` entry resolved under ``root`` (None for an empty one). An unreadable manifest is a ``UserError``."""
    from musubi_tuner.utils.errors import UserError

    root = Path(root).resolve()
    try:
        data = json.loads((root / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{root / name}: not a tiny {what} bundle manifest ({e})") from None
    return root, data, {k: root / v if v else None for k, v in data["paths"].items()}


def added_tokens_decoder(tok: Any, names: tuple[str, ...]) -> dict[str, dict]:
    """The ``added_tokens_decoder`` entry of a ``tokenizer_config.json``: the special tokens ``names`` by their id."""
    return {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in names
    }
