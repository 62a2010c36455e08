"""Where to load a transformers model, its tokenizer and its processor from (architecture-independent).

A local HF snapshot directory, a diffusers pipeline directory (model in ``subfolder``, tokenizer in
``tokenizer_subfolder``), or a hub id. Local directories are always used with ``local_files_only=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from musubi_tuner.utils.errors import UserError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class HfSource:
    """``model``: the directory (or hub id) with config.json + weights; ``tokenizer``: where the tokenizer files are;
    ``root``: what the user named."""

    model: str
    tokenizer: str
    root: str
    local_files_only: bool


def resolve_hf_source(name_or_path: str | os.PathLike, *, subfolder: str, tokenizer_subfolder: str, flag: str) -> HfSource:
    """Resolve ``name_or_path`` (a ``UserError`` naming ``flag`` when it is a missing path or a single file)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if not _HUB_ID.fullmatch(text) or text.startswith((".", "/")):
            raise UserError(f"{text}: text encoder directory not found ({flag})")
        return HfSource(text, text, text, local_files_only=False)
    if path.is_file():
        raise UserError(
            f"{path}: {flag} needs a Hugging Face model directory (config.json + weights + tokenizer), not a single file"
        )
    model_dir = path
    if not (path / "config.json").is_file() and (path / subfolder / "config.json").is_file():
        model_dir = path / subfolder
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{path}: no config.json (nor {subfolder}/config.json) in the text encoder directory ({flag})")
    tok_dir = model_dir
    for cand in (model_dir, path, path / tokenizer_subfolder):
        if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
            tok_dir = cand
            break
    return HfSource(str(model_dir), str(tok_dir), str(path), local_files_only=True)


def find_processor_dir(candidates: list[str | os.PathLike]) -> Path | None:
    """The first existing directory among ``candidates`` holding a ``preprocessor_config.json``."""
    for cand in candidates:
        p = Path(cand)
        if (p / "preprocessor_config.json").is_file():
            return p
    return None
