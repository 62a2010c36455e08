"""Prompt lines and prompt files, shared by training samples and every generate script's batch/interactive modes.

Line syntax (specs/generation.md §8, specs/training.md §9): ``prompt text --w 512 --h 512 --d 42 --n blurry``.
The line is split on the two-character sequence space + ``--``; the first segment is the prompt, each further segment
is an option letter, whitespace and a value running to the next `` --``. A line whose first non-blank characters are
``--`` has no prompt (``PromptSpec.prompt is None``; the caller inherits the command-line ``--prompt``).

Only segments after the first are options (the reference also matched the prompt segment, so a prompt starting with
``w 512`` set the width). Letters are matched case-insensitively. A malformed value raises ``UserError`` naming the
source, the line and the option; an unknown letter is a warning, or a ``UserError`` with ``strict=True``.

String seeds: an integer-like string is that integer; any other string becomes the first 4 bytes of the SHA-256 of
its UTF-8 text, read big-endian (``seed_to_int``). ``PromptSpec.seed`` is always the integer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "OPTION_LETTERS",
    "PromptSpec",
    "load_prompt_file",
    "parse_bool",
    "parse_prompt_line",
    "seed_to_int",
    "spec_from_dict",
]


def seed_to_int(value: int | str) -> int:
    """An integer seed from an int or any string (§4): integer-like text is that integer, other text is hashed.

    The hash is ``int.from_bytes(sha256(text.encode("utf-8")).digest()[:4], "big")`` (a 32-bit value), so the same
    string gives the same seed on every machine and Python version.
    """
    if isinstance(value, bool):
        raise TypeError("a seed cannot be a boolean")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    if not text:
        raise ValueError("empty seed")
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str | bool | int) -> bool:
    """``1/true/yes/on`` → True, ``0/false/no/off`` → False (case-insensitive); anything else raises ``ValueError``."""
    if isinstance(text, bool):
        return text
    if isinstance(text, int):
        if text in (0, 1):
            return bool(text)
        raise ValueError(f"not a boolean: {text!r}")
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/true/yes or 0/false/no)")


def _positive_int(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError("expected an integer")
    if isinstance(text, float):
        if not text.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        text = int(text)
    v = int(str(text).strip()) if not isinstance(text, int) else text
    if v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError("expected an integer")
    v = int(str(text).strip()) if not isinstance(text, int) else text
    if v < 0:
        raise ValueError(f"must be >= 0, got {v}")
    return v


def _finite_float(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a number")
    v = float(str(text).strip()) if not isinstance(text, (int, float)) else float(text)
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {text!r}")
    return v


def _text(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    return text.strip()


def _path(text: Any) -> str:
    v = _text(text)
    if not v:
        raise ValueError("empty path")
    return v


def _seed(text: Any) -> int:
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    return seed_to_int(text)


@dataclass(frozen=True)
class _Option:
    key: str
    convert: Callable[[Any], Any]
    repeatable: bool = False
    description: str = ""


# Letter → field. The union of generation.md §8.2 and training.md §9.
OPTION_LETTERS: dict[str, _Option] = {
    "w": _Option("width", _positive_int, description="width in pixels"),
    "h": _Option("height", _positive_int, description="height in pixels"),
    "f": _Option("frame_count", _positive_int, description="video length in pixel frames"),
    "d": _Option("seed", _seed, description="seed (integer or any string)"),
    "s": _Option("sample_steps", _positive_int, description="sampling steps"),
    "g": _Option("guidance_scale", _finite_float, description="guidance scale"),
    "l": _Option("cfg_scale", _finite_float, description="true-CFG scale"),
    "fs": _Option("discrete_flow_shift", _finite_float, description="flow shift"),
    "n": _Option("negative_prompt", _text, description="negative prompt"),
    "i": _Option("image_path", _path, description="start / init image"),
    "ei": _Option("end_image_path", _path, description="end image"),
    "ci": _Option("control_image_path", _path, repeatable=True, description="control image (repeatable)"),
    "cim": _Option("control_image_mask_path", _path, repeatable=True, description="control image mask (repeatable)"),
    "cn": _Option("control_video_path", _path, description="control video"),
    "m": _Option("mask_path", _path, description="inpainting mask"),
    "cs": _Option("cfg_schedule", _text, description="CFG schedule"),
    "of": _Option("one_frame", _text, description="one-frame inference options"),
    "rcm_th": _Option("rcm_threshold", _finite_float, description="reference-consistency mask threshold"),
    "rcm_rel_th": _Option("rcm_relative_threshold", parse_bool, description="relative RCM threshold (1/true/yes)"),
    "rcm_ks": _Option("rcm_kernel_size", _positive_int, description="RCM kernel size"),
    "rcm_ds": _Option("rcm_dilate_size", _non_negative_int, description="RCM dilate size"),
}
_BY_KEY: dict[str, _Option] = {opt.key: opt for opt in OPTION_LETTERS.values()}
# Bookkeeping fields that are not generation settings.
_META_FIELDS = ("index", "source", "line_number")


@dataclass
class PromptSpec:
    """One prompt with its per-line settings; ``None`` (or an empty list) means "not given, use the default"."""

    prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frame_count: int | None = None
    seed: int | None = None
    sample_steps: int | None = None
    guidance_scale: float | None = None
    cfg_scale: float | None = None
    discrete_flow_shift: float | None = None
    negative_prompt: str | None = None
    image_path: str | None = None
    end_image_path: str | None = None
    control_image_path: list[str] = field(default_factory=list)
    control_image_mask_path: list[str] = field(default_factory=list)
    control_video_path: str | None = None
    mask_path: str | None = None
    cfg_schedule: str | None = None
    one_frame: str | None = None
    rcm_threshold: float | None = None
    rcm_relative_threshold: bool | None = None
    rcm_kernel_size: int | None = None
    rcm_dilate_size: int | None = None
    # Where the spec came from (position in its file, file name, 1-based line number); not a setting.
    index: int = 0
    source: str | None = None
    line_number: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings this spec gives explicitly (prompt included when present), without bookkeeping fields."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _META_FIELDS:
                continue
            v = getattr(self, f.name)
            if v is None or (isinstance(v, list) and not v):
                continue
            out[f.name] = list(v) if isinstance(v, list) else v
        return out

    @property
    def location(self) -> str:
        """``file:line`` (or what is known of it) for messages."""
        return _where(self.source, self.line_number)


def _where(source: str | None, line_number: int | None) -> str:
    if source and line_number is not None:
        return f"{source}:{line_number}"
    if source:
        return str(source)
    if line_number is not None:
        return f"line {line_number}"
    return "prompt line"


def _apply(spec: PromptSpec, opt: _Option, raw: Any, where: str, shown: str) -> None:
    try:
        value = opt.convert(raw)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: invalid value {raw!r} for {shown} ({opt.description}): {e}") from None
    if opt.repeatable:
        getattr(spec, opt.key).append(value)
    else:
        setattr(spec, opt.key, value)


UnknownHandler = Callable[[str, str], None]


def _report_unknown(name: str, where: str, strict: bool, handler: UnknownHandler | None, known: str) -> None:
    if handler is not None:
        handler(name, where)
        return
    msg = f"{where}: unknown option {name} (known: {known})"
    if strict:
        raise UserError(msg)
    logger.warning(msg + "; ignored")


def parse_prompt_line(
    line: str,
    *,
    source: str | None = None,
    line_number: int | None = None,
    strict: bool = False,
    unknown: UnknownHandler | None = None,
) -> PromptSpec:
    """Parse one prompt line (see the module docstring). Options-only lines give ``prompt=None``.

    ``unknown(name, where)``, when given, is called for an unknown option instead of the warning / strict error
    (a generate script uses it to reject per-line attempts to change command-line-only settings).
    """
    where = _where(source, line_number)
    stripped = line.strip()
    if not stripped:
        raise UserError(f"{where}: empty prompt line")
    # A leading space makes an options-only line split into an empty prompt segment first.
    segments = (" " + stripped).split(" --")
    head = segments[0].strip()
    spec = PromptSpec(prompt=head if head else None, source=source, line_number=line_number)
    for segment in segments[1:]:
        segment = segment.strip()
        if not segment:
            raise UserError(f"{where}: an option marker '--' without a letter")
        parts = segment.split(None, 1)
        letter = parts[0].lower()
        value = parts[1].strip() if len(parts) > 1 else ""
        opt = OPTION_LETTERS.get(letter)
        if opt is None:
            _report_unknown(f"--{parts[0]}", where, strict, unknown, ", ".join(f"--{k}" for k in OPTION_LETTERS))
            continue
        if value == "" and opt.convert is not _text:
            raise UserError(f"{where}: option --{letter} ({opt.description}) needs a value")
        _apply(spec, opt, value, where, f"--{letter}")
    return spec


def spec_from_dict(
    data: dict[str, Any],
    *,
    source: str | None = None,
    line_number: int | None = None,
    strict: bool = False,
    label: str = "",
    unknown: UnknownHandler | None = None,
) -> PromptSpec:
    """A ``PromptSpec`` from a TOML/JSON dict with the field names as keys (letters are accepted as aliases)."""
    where = _where(source, line_number) + (f" ({label})" if label else "")
    spec = PromptSpec(source=source, line_number=line_number)
    for key, raw in data.items():
        if key == "prompt":
            if raw is not None and not isinstance(raw, str):
                raise UserError(f"{where}: 'prompt' must be text, got {type(raw).__name__}")
            spec.prompt = raw.strip() if raw and raw.strip() else None
            continue
        if key in _META_FIELDS or key == "enum":
            continue
        opt = _BY_KEY.get(key) or OPTION_LETTERS.get(key.lower())
        if opt is None:
            _report_unknown(key, where, strict, unknown, ", ".join(sorted(_BY_KEY)))
            continue
        if raw is None:
            continue
        values = raw if (opt.repeatable and isinstance(raw, list)) else [raw]
        if isinstance(raw, list) and not opt.repeatable:
            raise UserError(f"{where}: key '{key}' takes one value, got a list")
        for v in values:
            _apply(spec, opt, v, where, f"'{key}'")
    return spec


def _load_txt(path: Path, strict: bool, unknown: UnknownHandler | None, errors: list[str] | None) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            specs.append(parse_prompt_line(stripped, source=str(path), line_number=number, strict=strict, unknown=unknown))
        except UserError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return specs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e})") from None


def _load_toml(path: Path, strict: bool, unknown: UnknownHandler | None) -> list[PromptSpec]:
    import toml

    try:
        data = toml.loads(_read_text(path))
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset")
    if subsets is None:
        subsets = [{}] if "prompt" in defaults else []
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"{path}: [[prompt.subset]] must be an array of tables")
    specs = []
    for i, subset in enumerate(subsets):
        merged = {**defaults, **subset}  # the subset value wins over the [prompt] default
        specs.append(spec_from_dict(merged, source=str(path), strict=strict, label=f"subset {i + 1}", unknown=unknown))
    return specs


def _load_json(path: Path, strict: bool, unknown: UnknownHandler | None) -> list[PromptSpec]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompt objects or strings")
    specs = []
    for i, item in enumerate(data):
        label = f"item {i + 1}"
        if isinstance(item, str):
            if not item.strip() or item.strip().startswith("#"):
                continue
            specs.append(parse_prompt_line(item, source=f"{path} {label}", strict=strict, unknown=unknown))
        elif isinstance(item, dict):
            specs.append(spec_from_dict(item, source=str(path), strict=strict, label=label, unknown=unknown))
        else:
            raise UserError(f"{path}: {label} must be an object or a string, got {type(item).__name__}")
    return specs


def load_prompt_file(
    path: str | Path, *, strict: bool = False, unknown: UnknownHandler | None = None, errors: list[str] | None = None
) -> list[PromptSpec]:
    """Every prompt of a ``.txt`` / ``.toml`` / ``.json`` prompt file, in order, each with its ``index`` (0-based).

    ``.txt``: one prompt line per line; blank lines and lines starting with ``#`` (after stripping) are skipped.
    ``.toml``: ``[prompt]`` defaults merged into each ``[[prompt.subset]]`` (the subset wins).
    ``.json``: a list of dicts (field names as keys) or strings (parsed as lines).
    ``strict`` turns unknown options/keys into errors; ``unknown`` overrides that handling (see ``parse_prompt_line``).
    With ``errors``, a bad ``.txt`` line is appended there and skipped instead of raised (report all at once).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".toml":
        specs = _load_toml(p, strict, unknown)
    elif suffix == ".json":
        specs = _load_json(p, strict, unknown)
    else:
        specs = _load_txt(p, strict, unknown, errors)
    for i, spec in enumerate(specs):
        spec.index = i
    return specs
