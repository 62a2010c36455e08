"""Where a transformers text encoder and its tokenizer are loaded from (shared by every architecture's encoders).

A Hugging Face hub id, a local HF snapshot directory, or a diffusers pipeline directory (``text_encoder/`` +
``tokenizer/``). Local directories are checked before anything is loaded: a missing ``config.json`` or a directory
without tokenizer files is a ``UserError`` naming the directory (transformers would otherwise fail much later, e.g.
with a reshape error, or silently build a tokenizer from the model's vocabulary size).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from musubi_tuner.utils.errors import UserError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# files that hold a tokenizer's vocabulary (fast tokenizer.json, sentencepiece models, BPE vocab + merges, WordPiece)
TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


def has_tokenizer_files(directory: Path) -> bool:
    """Whether ``directory`` holds a tokenizer vocabulary (one of ``TOKENIZER_FILES``)."""
    return any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILES)


@dataclass(frozen=True)
class ModelSource:
    """Where to load a transformers model and its tokenizer from; ``root`` is what the user named."""

    model: str
    tokenizer: str
    local_files_only: bool
    root: str = ""


def resolve_model_source(name_or_path: str | os.PathLike, *, subfolder: str, tokenizer_subfolder: str, flag: str) -> ModelSource:
    """A hub id, a local HF snapshot directory, or a diffusers pipeline directory (``subfolder`` / ``tokenizer_subfolder``).

    Local directories are always loaded with ``local_files_only=True`` (never any network access).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if not _HUB_ID.fullmatch(text):
            raise UserError(f"{text}: text encoder directory not found ({flag})")
        return ModelSource(text, text, local_files_only=False, root=text)
    if path.is_file():
        raise UserError(
            f"{path}: {flag} needs a Hugging Face model directory (config.json + weights + tokenizer), not a single file"
        )
    model_dir = path
    if not (path / "config.json").is_file() and (path / subfolder / "config.json").is_file():
        model_dir = path / subfolder
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{path}: no config.json (nor {subfolder}/config.json) in the text encoder directory ({flag})")
    candidates = list(dict.fromkeys((model_dir, path, path / tokenizer_subfolder)))
    tok_dir = next((c for c in candidates if has_tokenizer_files(c)), None)
    if tok_dir is None:
        where = " / ".join(str(c) for c in candidates)
        wanted = ", ".join(" + ".join(names) for names in TOKENIZER_FILES)
        raise UserError(f"{path}: the tokenizer is missing from the text encoder directory ({flag}): none of {wanted} in {where}")
    return ModelSource(str(model_dir), str(tok_dir), local_files_only=True, root=str(path))


def find_processor_dir(candidates: list[str | os.PathLike]) -> Path | None:
    """The first existing directory among ``candidates`` holding a ``preprocessor_config.json``."""
    for cand in candidates:
        p = Path(cand)
        if (p / "preprocessor_config.json").is_file():
            return p
    return None


def single_file_tokenizer(weights: Path, tokenizer: str | None, flag: str, *, tokenizer_flag: str = "--tokenizer") -> Path:
    """The tokenizer directory of a text encoder given as one weights file (ComfyUI's bare files carry none).

    Search order: ``tokenizer`` (the directory the user passed with ``tokenizer_flag``, which must hold tokenizer
    files), the file's folder, ``<folder>/tokenizer``. ``flag`` names the weights' own option. Nothing found is one
    ``UserError`` naming every place looked at and what to pass.
    """
    weights = Path(weights)
    wanted = ", ".join(" + ".join(names) for names in TOKENIZER_FILES)
    if tokenizer:
        tok = Path(tokenizer).expanduser()
        if not tok.is_dir():
            raise UserError(f"{tok}: tokenizer directory not found ({tokenizer_flag})")
        if not has_tokenizer_files(tok):
            raise UserError(f"{tokenizer_flag} {tok}: no tokenizer files there (none of {wanted}); needed for {flag} {weights}")
        return tok
    candidates = [weights.parent, weights.parent / "tokenizer"]
    found = next((c for c in candidates if has_tokenizer_files(c)), None)
    if found is None:
        where = " or ".join(str(c) for c in candidates)
        raise UserError(
            f"{weights}: no tokenizer for this single text-encoder file ({flag}): none of {wanted} in {where}; "
            f"pass {tokenizer_flag} DIR (the tokenizer folder of the model's Hugging Face repository), or use the full "
            "Hugging Face model directory"
        )
    return found
