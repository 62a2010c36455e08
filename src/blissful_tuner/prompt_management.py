"""Prompt wildcards (``--prompt_wildcards DIR``, specs/generation.md §3).

``__name__`` in a prompt is replaced by a weighted random line of ``DIR/name.txt``; ``__sub/name__`` reads
``DIR/sub/name.txt``. Names are one or more non-underscore characters. Files: UTF-8, one option per line, blank
lines and ``#`` comments skipped, an optional weight after the first colon (``red:2.0``; the text after the colon
must be a number, so options cannot contain ``:``). Options may contain wildcards themselves; expansion repeats in
passes until none is left (at most 50 passes).

Draws come from a dedicated ``random.Random`` seeded from the generation seed — never the global RNG — so one seed
always gives the same expansion, whatever else consumed random numbers. Names are confined to DIR: absolute names,
``..`` components and symlinks leading outside DIR are rejected.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from blissful_tuner.blissful_logger import get_logger
from musubi_tuner.utils.errors import UserError

logger = get_logger(__name__)

WILDCARD_RE = re.compile(r"__([^_]+?)__")
MAX_PASSES = 50


@dataclass(frozen=True)
class WildcardOption:
    """One option of a wildcard file and its relative weight."""

    text: str
    weight: float


def parse_wildcard_file(path: Path) -> list[WildcardOption]:
    """The options of one wildcard file (``UserError`` naming the file and line for a bad weight or no options)."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"wildcard file {path} is not valid UTF-8 ({e})") from None
    options = []
    for number, raw in enumerate(content.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        text, weight = line, 1.0
        if ":" in line:
            text, weight_text = line.split(":", 1)
            text = text.strip()
            try:
                weight = float(weight_text.strip())
            except ValueError:
                raise UserError(
                    f"{path}:{number}: weight {weight_text.strip()!r} is not a number (options cannot contain ':')"
                ) from None
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"{path}:{number}: weight must be a finite number >= 0, got {weight_text.strip()!r}")
        if not text:
            continue
        options.append(WildcardOption(text, weight))
    if not options:
        raise UserError(f"wildcard file {path} has no options")
    if sum(o.weight for o in options) <= 0:
        raise UserError(f"wildcard file {path}: all weights are zero")
    return options


class WildcardExpander:
    """Expands ``__name__`` tokens from the files of one wildcard directory (files are read once and cached)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        root = Path(directory)
        if not root.is_dir():
            raise UserError(f"--prompt_wildcards: directory not found: {root}")
        self.root = root.resolve(strict=True)
        self._cache: dict[str, list[WildcardOption]] = {}

    def resolve(self, name: str) -> Path:
        """The file of wildcard ``name``, confined to the wildcard directory."""
        parts = re.split(r"[\\/]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
            raise UserError(f"wildcard __{name}__: absolute names are not allowed")
        if any(p == ".." for p in parts):
            raise UserError(f"wildcard __{name}__: '..' is not allowed in wildcard names")
        if any(p in ("", ".") for p in parts):
            raise UserError(f"wildcard __{name}__: empty or '.' path components are not allowed")
        candidate = self.root.joinpath(*parts[:-1], parts[-1] + ".txt")
        if not candidate.is_file():
            raise UserError(f"wildcard __{name}__: file not found: {candidate}")
        real = candidate.resolve(strict=True)  # follows symlinks
        if not real.is_relative_to(self.root):
            raise UserError(f"wildcard __{name}__: {candidate} resolves to {real}, outside {self.root}")
        return real

    def options(self, name: str) -> list[WildcardOption]:
        """The parsed options of wildcard ``name``."""
        if name not in self._cache:
            self._cache[name] = parse_wildcard_file(self.resolve(name))
        return self._cache[name]

    def expand(self, text: str, rng: random.Random) -> str:
        """Replace every wildcard in ``text`` (each occurrence drawn independently from ``rng``)."""
        for _ in range(MAX_PASSES):
            if not WILDCARD_RE.search(text):
                return text

            def draw(match: re.Match) -> str:
                name = match.group(1)
                opts = self.options(name)
                choice = rng.choices(opts, weights=[o.weight for o in opts], k=1)[0].text
                logger.info(f"wildcard __{name}__ -> {choice!r}")
                return choice

            text = WILDCARD_RE.sub(draw, text)
        if WILDCARD_RE.search(text):
            raise UserError(f"wildcards still unresolved after {MAX_PASSES} passes (a wildcard that includes itself?)")
        return text


def wildcard_rng(seed: int) -> random.Random:
    """The dedicated RNG for one job's wildcard draws (seeded from the job's integer seed)."""
    return random.Random(f"wildcards:{int(seed)}")


def expand_prompts(
    directory: str | os.PathLike | None, seed: int, *texts: str | None, expander: WildcardExpander | None = None
) -> list[str | None]:
    """Expand the wildcards of ``texts`` (e.g. prompt then negative prompt) with one RNG seeded from ``seed``.

    ``None`` entries stay ``None``. Without a directory (and expander) the texts are returned unchanged.
    """
    if expander is None and directory is None:
        return list(texts)
    exp = expander or WildcardExpander(directory)  # type: ignore[arg-type]
    rng = wildcard_rng(seed)
    return [None if t is None else exp.expand(t, rng) for t in texts]
