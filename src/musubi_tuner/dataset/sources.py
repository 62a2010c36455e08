"""Data sources (spec §3): directories of images / videos / frame folders with caption files, and JSONL files.

Each source item knows its stem (the cache name stem), media path, caption, control paths and extra targets.
Relative paths in a JSONL file are resolved against the JSONL file's directory (product rule).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from musubi_tuner.dataset.config import DatasetParams
from musubi_tuner.dataset.media import is_frame_directory, is_image_file, is_video_file
from musubi_tuner.utils.errors import UserError

_NUMBERED = re.compile(r"^(?P<base>.+)_(?P<num>\d+)$")


@dataclass
class SourceItem:
    """One source item: an image (with optional extra target layers) or a video (file or frame directory)."""

    stem: str
    path: Path
    caption: str | None
    is_video: bool
    controls: list[Path] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)  # extra targets of multiple_target items, in order
    origin: str = ""  # where the item was declared, for messages

    @property
    def name(self) -> str:
        return str(self.path)


def list_items(params: DatasetParams, *, require_captions: bool = True) -> list[SourceItem]:
    """All source items of a dataset, sorted by stem; stems must be unique (they name the cache files)."""
    items = _list_jsonl(params, require_captions) if params.is_jsonl else _list_directory(params, require_captions)
    seen: dict[str, SourceItem] = {}
    for item in items:
        if item.stem in seen:
            raise UserError(
                f"{params.config_path}: {params.table}: two items share the name {item.stem!r} "
                f"({seen[item.stem].origin} and {item.origin}); cache files would collide, rename one"
            )
        seen[item.stem] = item
    return sorted(items, key=lambda it: it.stem)


def _caption_ext(params: DatasetParams) -> str:
    ext = params.caption_extension
    if not ext:
        raise UserError(
            f'{params.config_path}: {params.table}: caption_extension is not set (e.g. caption_extension = ".txt"); '
            "directory sources read captions from files next to the media"
        )
    return ext if ext.startswith(".") else "." + ext


def _read_caption(media: Path, params: DatasetParams, required: bool) -> str | None:
    if not required and not params.caption_extension:
        return None
    ext = _caption_ext(params)
    caption_path = media.parent / (media.name + ext) if media.is_dir() else media.with_name(media.stem + ext)
    if not caption_path.is_file():
        if not required:
            return None
        raise UserError(
            f"{media}: caption file not found: {caption_path} (caption_extension = {params.caption_extension!r}, "
            f"{params.table} of {params.config_path})"
        )
    return caption_path.read_text(encoding="utf-8").strip()


def _list_directory(params: DatasetParams, require_captions: bool) -> list[SourceItem]:
    directory = params.source_path
    skip = {Path(d).resolve() for d in (params.cache_directory, params.control_directory) if d}
    entries = sorted(directory.iterdir(), key=lambda p: p.name)
    items: list[SourceItem] = []
    if params.is_video:
        media = [p for p in entries if is_video_file(p) or (p.resolve() not in skip and is_frame_directory(p))]
        stems = [p.name if p.is_dir() else p.stem for p in media]
        extra: dict[str, list[Path]] = {}
    else:
        media = [p for p in entries if is_image_file(p)]
        stems = [p.stem for p in media]
        extra = {}
        if params.multiple_target:
            media, stems, extra = _group_targets(media)
    control_index = _control_index(Path(params.control_directory), params.is_video) if params.control_directory else None
    for path, stem in zip(media, stems):
        controls: list[Path] = []
        if control_index is not None:
            controls = _match_controls(stem, control_index, Path(params.control_directory), params)
        items.append(
            SourceItem(
                stem=stem,
                path=path,
                caption=_read_caption(path, params, require_captions),
                is_video=params.is_video,
                controls=controls,
                targets=extra.get(stem, []),
                origin=str(path),
            )
        )
    return items


def _group_targets(media: list[Path]) -> tuple[list[Path], list[str], dict[str, list[Path]]]:
    """``image1.png, image1_1.png, image1_2.png`` -> one item ``image1`` with two extra targets (numeric order)."""
    by_stem = {p.stem: p for p in media}
    extra: dict[str, list[tuple[int, Path]]] = {}
    mains: list[Path] = []
    for p in media:
        m = _NUMBERED.match(p.stem)
        if m and m.group("base") in by_stem:
            extra.setdefault(m.group("base"), []).append((int(m.group("num")), p))
        else:
            mains.append(p)
    return mains, [p.stem for p in mains], {k: [p for _, p in sorted(v)] for k, v in extra.items()}


def _control_index(directory: Path, video: bool) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        if is_image_file(p):
            index.setdefault(p.stem, p)
        elif video and is_video_file(p):
            index.setdefault(p.stem, p)
        elif video and is_frame_directory(p):
            index.setdefault(p.name, p)
    return index


def _match_controls(stem: str, index: dict[str, Path], directory: Path, params: DatasetParams) -> list[Path]:
    """Control files of ``stem``: ``stem.*`` or numbered ``stem_0, stem_1, ...`` / ``stem_0000, ...`` (contiguous)."""
    if stem in index:
        return [index[stem]]
    numbered: dict[int, Path] = {}
    for name, path in index.items():
        m = _NUMBERED.match(name)
        if m and m.group("base") == stem:
            numbered[int(m.group("num"))] = path
    if not numbered:
        raise UserError(
            f"{params.config_path}: {params.table}: no control file for item {stem!r} in control directory {directory} "
            f"(expected {stem}.<ext> or {stem}_0.<ext>, {stem}_1.<ext>, ...)"
        )
    expected = list(range(len(numbered)))
    if sorted(numbered) != expected:
        raise UserError(
            f"{params.config_path}: {params.table}: control files of item {stem!r} in {directory} must be numbered "
            f"0..{len(numbered) - 1} without gaps; found numbers {sorted(numbered)} (expected {expected})"
        )
    return [numbered[i] for i in expected]


def _list_jsonl(params: DatasetParams, require_captions: bool) -> list[SourceItem]:
    jsonl = params.source_path
    base = jsonl.parent
    media_key = "video_path" if params.is_video else "image_path"
    items: list[SourceItem] = []
    has_control: list[bool] = []
    for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}: line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        for key in (media_key, "caption") if require_captions else (media_key,):
            if key not in row:
                raise UserError(f"{where}: missing field {key!r}")
            if not isinstance(row[key], str):
                raise UserError(f"{where}: field {key!r} must be a string")

        def resolve(value: object, key: str, where: str = where) -> Path:
            if not isinstance(value, str):
                raise UserError(f"{where}: field {key!r} must be a string path")
            p = Path(value)
            return p if p.is_absolute() else base / p

        path = resolve(row[media_key], media_key)
        controls = [resolve(row["control_path"], "control_path")] if "control_path" in row else []
        if not params.is_video:
            controls += _numbered_fields(row, "control_path", where, resolve)
        if not controls and params.control_directory:
            raise UserError(f"{where}: missing field 'control_path' (control_directory is set)")
        targets = _numbered_fields(row, "image_path", where, resolve) if not params.is_video else []
        if targets and not params.multiple_target:
            raise UserError(
                f"{where}: fields image_path_0, image_path_1, ... are extra target layers and need "
                f"multiple_target = true in {params.table} of {params.config_path}"
            )
        has_control.append(bool(controls))
        stem = path.name if path.is_dir() else path.stem
        items.append(
            SourceItem(
                stem=stem,
                path=path,
                caption=row.get("caption"),
                is_video=params.is_video,
                controls=controls,
                targets=targets,
                origin=where,
            )
        )
    if params.is_video and any(has_control) and not all(has_control):
        first_missing = next(it.origin for it, c in zip(items, has_control) if not c)
        raise UserError(f"{first_missing}: missing field 'control_path' (either every row has control_path or none has)")
    return items


def _numbered_fields(row: dict, prefix: str, where: str, resolve) -> list[Path]:
    """``<prefix>_0``, ``<prefix>_1``, ... of a JSONL row, contiguous from 0."""
    nums = sorted(int(k[len(prefix) + 1 :]) for k in row if re.fullmatch(rf"{prefix}_\d+", k))
    if nums != list(range(len(nums))):
        raise UserError(f"{where}: fields {prefix}_N must be numbered 0..{len(nums) - 1} without gaps, found {nums}")
    return [resolve(row[f"{prefix}_{n}"], f"{prefix}_{n}") for n in nums]
