"""Dataset-config schema: the allowed keys, their types and defaults, deprecated renames and the error messages.

Errors name the config file, the table (``general`` / ``datasets[i]``), the key, the line of the key in the file
(found by scanning the raw text inside the right table) and, for typos, the closest valid key.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")


@dataclass(frozen=True)
class KeySpec:
    """One config key: its value kind, default and where it may appear (``general`` / ``image`` / ``video``)."""

    name: str
    kind: str  # int | float | bool | str | resolution | int_list | choice
    default: Any
    scopes: frozenset[str]
    minimum: int | None = None
    choices: tuple[str, ...] | None = None


_G, _I, _V = "general", "image", "video"


def _spec(name: str, kind: str, default: Any, *scopes: str, minimum: int | None = None, choices=None) -> KeySpec:
    return KeySpec(name, kind, default, frozenset(scopes), minimum, choices)


KEY_SPECS: dict[str, KeySpec] = {
    s.name: s
    for s in (
        # common (general + every dataset)
        _spec("resolution", "resolution", (960, 544), _G, _I, _V, minimum=1),
        _spec("caption_extension", "str", None, _G, _I, _V),
        _spec("batch_size", "int", 1, _G, _I, _V, minimum=1),
        _spec("num_repeats", "int", 1, _G, _I, _V, minimum=1),
        _spec("enable_bucket", "bool", False, _G, _I, _V),
        _spec("bucket_no_upscale", "bool", False, _G, _I, _V),
        # sources and per-dataset locations (datasets only)
        _spec("image_directory", "str", None, _I),
        _spec("image_jsonl_file", "str", None, _I),
        _spec("video_directory", "str", None, _V),
        _spec("video_jsonl_file", "str", None, _V),
        _spec("cache_directory", "str", None, _I, _V),
        _spec("control_directory", "str", None, _I, _V),
        _spec("validation", "bool", False, _I, _V),
        # image parameters
        _spec("multiple_target", "bool", False, _G, _I),
        _spec("no_resize_control", "bool", False, _G, _I),
        _spec("control_resolution", "resolution", None, _G, _I, minimum=1),
        _spec("fp_1f_clean_indices", "int_list", None, _G, _I),
        _spec("fp_1f_target_index", "int", None, _G, _I),
        _spec("fp_1f_no_post", "bool", False, _G, _I),
        # image and video
        _spec("fp_latent_window_size", "int", 9, _G, _I, _V, minimum=1),
        # video parameters
        _spec("target_frames", "int_list", (1,), _G, _V),
        _spec("frame_extraction", "choice", "head", _G, _V, choices=FRAME_EXTRACTION_MODES),
        _spec("frame_stride", "int", 1, _G, _V, minimum=1),
        _spec("frame_sample", "int", 1, _G, _V, minimum=1),
        _spec("max_frames", "int", 129, _G, _V, minimum=1),
        _spec("source_fps", "float", None, _G, _V),
    )
}

DEPRECATED_KEYS = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}

_EXPECTED = {
    "int": "an integer",
    "float": "a number (e.g. 30.0)",
    "bool": "true or false",
    "str": "a string",
    "resolution": "an integer or a [width, height] list of integers",
    "int_list": "a list of integers (e.g. [1, 25, 45])",
}


class ConfigSource:
    """The config file being validated: its path, raw text and format, used to point errors at lines."""

    def __init__(self, path: Path, text: str, fmt: str):
        self.path = path
        self.text = text
        self.fmt = fmt

    def find_line(self, table: str, key: str) -> int | None:
        """Line number (1-based) of ``key`` inside ``table`` (``general`` or ``datasets[i]``), or None."""
        if self.fmt == "json":
            hits = [i for i, line in enumerate(self.text.splitlines(), 1) if re.search(rf'"{re.escape(key)}"\s*:', line)]
            if len(hits) == 1:
                return hits[0]
            if table.startswith("datasets[") and hits:
                # JSON gives no positions; assume keys appear once per dataset in order
                idx = int(table[len("datasets[") : -1])
                return hits[idx] if idx < len(hits) else None
            return None
        current: str | None = None
        ds_index = -1
        key_re = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
        for lineno, line in enumerate(self.text.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("[["):
                name = stripped[2:].split("]]", 1)[0].strip()
                if name == "datasets":
                    ds_index += 1
                    current = f"datasets[{ds_index}]"
                else:
                    current = name
            elif stripped.startswith("["):
                current = stripped[1:].split("]", 1)[0].strip()
            elif current == table and key_re.match(line):
                return lineno
        return None

    def where(self, table: str, key: str | None = None) -> str:
        """``<file>: <table>.<key> (line n)`` prefix for messages."""
        if key is None:
            return f"{self.path}: {table}"
        line = self.find_line(table, key)
        loc = f" (line {line})" if line else ""
        return f"{self.path}: {table}: key {key!r}{loc}"


def _check_value(spec: KeySpec, value: Any, src: ConfigSource, table: str) -> Any:
    """Validate and convert one value; raises UserError naming file, table, key, line and the expected type."""

    def bad(expected: str | None = None) -> UserError:
        exp = expected or _EXPECTED.get(spec.kind, "")
        return UserError(f"{src.where(table, spec.name)}: expected {exp}, got {json.dumps(value)}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    kind = spec.kind
    if kind == "int":
        if not is_int(value):
            raise bad()
        if spec.minimum is not None and value < spec.minimum:
            raise bad(f"an integer >= {spec.minimum}")
        return value
    if kind == "float":
        if is_int(value):  # product rule: TOML `30` is accepted as 30.0
            value = float(value)
        if not isinstance(value, float):
            raise bad()
        if not math.isfinite(value) or value <= 0:
            raise bad("a positive number (e.g. 30.0)")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    if kind == "choice":
        if not isinstance(value, str) or value not in (spec.choices or ()):
            raise bad("one of " + ", ".join(repr(c) for c in spec.choices or ()))
        return value
    if kind == "resolution":
        if is_int(value):
            value = [value, value]
        if not isinstance(value, list | tuple) or len(value) != 2 or not all(is_int(v) for v in value):
            raise bad()
        if min(value) < 1:
            raise bad("positive integers")
        return (int(value[0]), int(value[1]))
    if kind == "int_list":
        if not isinstance(value, list | tuple) or not value or not all(is_int(v) for v in value):
            raise bad()
        return tuple(value)
    raise AssertionError(kind)


def validate_table(raw: Any, *, table: str, scope: str, src: ConfigSource) -> dict[str, Any]:
    """Validate one config table (``scope`` = ``general``, ``image`` or ``video``) and return converted values.

    Deprecated keys are renamed with a warning (the new key wins when both are present); unknown keys and keys that
    belong to another dataset kind are errors.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{src.where(table)}: expected a table of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    allowed = [k for k, s in KEY_SPECS.items() if scope in s.scopes]
    renamed: dict[str, str] = {}
    for key in raw:
        if key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            if new in raw:
                logger.warning(f"{src.where(table, key)}: deprecated key ignored because {new!r} is also set; using {new!r}")
            elif new in renamed:
                logger.warning(
                    f"{src.where(table, key)}: deprecated key ignored because {renamed[new]!r} (also renamed to {new!r}) "
                    f"is set first; using {renamed[new]!r}"
                )
            else:
                logger.warning(f"{src.where(table, key)}: deprecated key, renamed to {new!r}; please use {new!r}")
                renamed[new] = key
    for key, value in raw.items():
        if key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            if renamed.get(new) != key:
                continue
            spec_key, origin = new, key
        else:
            spec_key, origin = key, key
        spec = KEY_SPECS.get(spec_key)
        if spec is None or scope not in spec.scopes:
            if spec is not None:
                where_ok = "[general]" if spec.scopes == {_G} else ("image" if _I in spec.scopes else "video") + " datasets"
                if scope == _G:
                    msg = "is not allowed in [general]; set it in each [[datasets]] entry"
                else:
                    msg = f"is not allowed in {scope} datasets (only in {where_ok})"
                raise UserError(f"{src.where(table, origin)}: {msg}")
            hint = difflib.get_close_matches(key, allowed + list(DEPRECATED_KEYS), n=1, cutoff=0.6)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            line = src.find_line(table, key)
            loc = f" (line {line})" if line else ""
            raise UserError(f"{src.path}: {table}: unknown key {key!r}{loc}{suggestion}")
        named = spec if origin == spec_key else replace(spec, name=origin)  # errors show the key as written
        values[spec_key] = _check_value(named, value, src, table)
    return values


def dataset_scope(raw: Any, index: int, src: ConfigSource) -> str:
    """``image`` or ``video`` for a raw ``[[datasets]]`` entry; exactly one source key is required (product rule)."""
    table = f"datasets[{index}]"
    if not isinstance(raw, dict):
        raise UserError(f"{src.where(table)}: expected a table of keys, got {type(raw).__name__}")
    present = [k for k in SOURCE_KEYS if k in raw]
    if len(present) != 1:
        found = ", ".join(present) if present else "none"
        raise UserError(f"{src.where(table)}: exactly one of {', '.join(SOURCE_KEYS)} is required (found: {found})")
    return "image" if present[0].startswith("image") else "video"
