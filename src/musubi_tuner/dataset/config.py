"""Load a dataset config (TOML or JSON): ``[general]`` + ``[[datasets]]``, precedence, validation rules.

Precedence of every dataset parameter: the ``[[datasets]]`` entry, then ``[general]``, then the command line
(attributes of ``args`` sharing the key's name, when not None), then the architecture's runtime parameters, then
the default of ``schema.KEY_SPECS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from musubi_tuner.dataset.architectures import ArchInfo, arch_info
from musubi_tuner.dataset.frames import round_to_4n1
from musubi_tuner.dataset.schema import KEY_SPECS, SOURCE_KEYS, ConfigSource, dataset_scope, validate_table
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

if TYPE_CHECKING:
    from musubi_tuner.dataset.group import DatasetGroup

logger = get_logger(__name__)

# keys that only ever come from the file (never from the command line or runtime parameters)
_FILE_ONLY = set(SOURCE_KEYS) | {"cache_directory", "control_directory", "validation"}


@dataclass
class DatasetParams:
    """The resolved parameters of one ``[[datasets]]`` entry (every key of the schema, defaults filled in)."""

    index: int
    kind: str  # "image" | "video"
    config_path: Path
    resolution: tuple[int, int] = (960, 544)
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    image_directory: str | None = None
    image_jsonl_file: str | None = None
    video_directory: str | None = None
    video_jsonl_file: str | None = None
    cache_directory: str = ""
    control_directory: str | None = None
    validation: bool = False
    multiple_target: bool = False
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None
    fp_1f_clean_indices: tuple[int, ...] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    fp_latent_window_size: int = 9
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def is_video(self) -> bool:
        return self.kind == "video"

    @property
    def is_validation(self) -> bool:
        return self.validation

    @property
    def source_key(self) -> str:
        for key in SOURCE_KEYS:
            if getattr(self, key):
                return key
        raise AssertionError("dataset without source")

    @property
    def source_path(self) -> Path:
        return Path(getattr(self, self.source_key))

    @property
    def is_jsonl(self) -> bool:
        return self.source_key.endswith("_jsonl_file")


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], ConfigSource]:
    """Parse a ``.toml`` or ``.json`` config; syntax errors name the file, line, column and the parser message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config not found: {path.resolve()}")
    text = path.read_text(encoding="utf-8")
    fmt = "json" if path.suffix.lower() == ".json" else "toml"
    try:
        data = json.loads(text) if fmt == "json" else _parse_toml(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # tomllib.TOMLDecodeError / toml.TomlDecodeError are ValueErrors
        raise UserError(f"{path}: TOML syntax error: {_toml_error_text(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a table with [general] and [[datasets]]")
    return data, ConfigSource(path, text, fmt)


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.loads(text)
    return tomllib.loads(text)


def _toml_error_text(e: ValueError) -> str:
    """The parser message with line and column (tomllib embeds them; toml exposes ``lineno`` / ``colno``)."""
    if hasattr(e, "lineno") and hasattr(e, "colno") and "line" not in str(e):
        return f"{getattr(e, 'msg', e)} (at line {e.lineno}, column {e.colno})"
    return str(e)


def resolve_datasets(
    config_path: str | os.PathLike,
    *,
    architecture: str | ArchInfo,
    args: Any = None,
    runtime_params: dict[str, Any] | None = None,
    check_sources: bool = True,
) -> list[DatasetParams]:
    """Load, validate and resolve every dataset of a config file.

    ``check_sources`` verifies that source directories / JSONL files exist (caching); training reads only caches
    and passes False.
    """
    arch = architecture if isinstance(architecture, ArchInfo) else arch_info(architecture)
    data, src = read_config_file(config_path)
    for key in data:
        if key not in ("general", "datasets"):
            line = next((n for n, text in enumerate(src.text.splitlines(), 1) if key in text), None)
            loc = f" (line {line})" if line else ""
            raise UserError(f"{src.path}: unknown top-level key {key!r}{loc}; expected [general] and [[datasets]]")
    general = validate_table(data.get("general", {}), table="general", scope="general", src=src)
    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise UserError(f"{src.path}: at least one [[datasets]] entry is required")
    runtime_params = runtime_params or {}
    result: list[DatasetParams] = []
    for i, raw in enumerate(raw_datasets):
        scope = dataset_scope(raw, i, src)
        own = validate_table(raw, table=f"datasets[{i}]", scope=scope, src=src)
        params = DatasetParams(index=i, kind=scope, config_path=src.path)
        for key, spec in KEY_SPECS.items():
            if scope not in spec.scopes:
                continue
            value = own.get(key)
            if value is None and "general" in spec.scopes:
                value = general.get(key)
            if value is None and key not in _FILE_ONLY:
                cli = getattr(args, key, None) if args is not None else None
                value = cli if cli is not None else runtime_params.get(key)
                if value is not None and spec.kind == "resolution" and isinstance(value, int):
                    value = (value, value)
            if value is None:
                value = spec.default
            setattr(params, key, value)
        _check_dataset(params, arch, src, check_sources)
        result.append(params)
    _check_unique_cache_dirs(result, src)
    return result


def _check_dataset(p: DatasetParams, arch: ArchInfo, src: ConfigSource, check_sources: bool) -> None:
    table = p.table
    if p.is_video and not arch.supports_video:
        raise UserError(
            f"{src.path}: {table}: Unsupported architecture {arch.short!r} ({arch.full}) for a video dataset; "
            "this architecture trains on images only (use image_directory or image_jsonl_file)"
        )
    if p.is_jsonl and not p.cache_directory:
        raise UserError(f"{src.where(table, p.source_key)}: cache_directory is required with a JSONL source")
    if not p.cache_directory:
        p.cache_directory = str(p.source_path)
    for key in ("resolution", "control_resolution"):
        p_value = getattr(p, key)
        if p_value is None:
            continue
        step = arch.resolution_step
        fixed = tuple(max(step, int(v) // step * step) for v in p_value)
        if fixed != tuple(p_value):
            logger.warning(
                f"{src.where(table, key)}: {key} {list(p_value)} is not a multiple of {step} ({arch.full}'s step); "
                f"using {list(fixed)}"
            )
            setattr(p, key, fixed)
    if p.is_video:
        rounded = []
        for t in p.target_frames:
            if t < 1:
                raise UserError(f"{src.where(table, 'target_frames')}: values must be >= 1, got {t}")
            r = round_to_4n1(t)
            if r != t:
                logger.warning(f"{src.path}: {table}: target_frames {t} rounded down to {r} (lengths must be 4n+1)")
            if r not in rounded:
                rounded.append(r)
        p.target_frames = tuple(rounded)
        if p.frame_extraction in ("chunk", "slide") and 1 in p.target_frames:
            logger.warning(
                f"{src.path}: {table}: target_frames contains 1 with frame_extraction {p.frame_extraction!r}: "
                "every frame becomes its own single-frame item; remove 1 unless that is intended"
            )
        if p.frame_extraction == "uniform" and p.frame_sample == 1:
            logger.warning(f"{src.path}: {table}: frame_extraction 'uniform' with frame_sample 1 is changed to 'head'")
            p.frame_extraction = "head"
    if check_sources:
        path = p.source_path
        ok = path.is_file() if p.is_jsonl else path.is_dir()
        if not ok:
            what = "JSONL file" if p.is_jsonl else "directory"
            raise UserError(f"{src.where(table, p.source_key)}: {what} not found: {path.resolve()}")
        if p.control_directory and not Path(p.control_directory).is_dir():
            raise UserError(f"{src.where(table, 'control_directory')}: directory not found: {Path(p.control_directory).resolve()}")


def _check_unique_cache_dirs(datasets: list[DatasetParams], src: ConfigSource) -> None:
    seen: dict[Path, int] = {}
    for p in datasets:
        key = Path(p.cache_directory).resolve()
        if key in seen:
            raise UserError(
                f"{src.path}: datasets[{seen[key]}] and datasets[{p.index}] share the cache directory {key}; "
                "give each dataset its own cache_directory"
            )
        seen[key] = p.index


def load_dataset_group(
    config_path: str | os.PathLike,
    *,
    architecture: str,
    args: Any = None,
    training: bool,
    validation: bool = False,
    num_timestep_buckets: int | None = None,
    seed: int = 0,
    runtime_params: dict[str, Any] | None = None,
) -> DatasetGroup:
    """Build the training-time ``DatasetGroup`` over the caches of a dataset config.

    ``validation=False`` keeps the datasets that are not marked ``validation = true``; ``validation=True`` keeps
    only the marked ones. ``training=True`` shuffles per epoch (``seed + epoch``); ``training=False`` keeps a fixed
    sorted order (evaluation). Raises ``UserError`` when no cached item is found.
    """
    from musubi_tuner.dataset.group import DatasetGroup

    arch = arch_info(architecture)
    params = resolve_datasets(config_path, architecture=arch, args=args, runtime_params=runtime_params, check_sources=False)
    selected = [p for p in params if p.validation == validation]
    if not selected:
        kind = "validation" if validation else "training"
        raise UserError(f"{config_path}: no {kind} datasets (datasets with validation = {str(validation).lower()})")
    return DatasetGroup(selected, arch, shuffle=training, seed=seed, num_timestep_buckets=num_timestep_buckets)
