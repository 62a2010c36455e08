"""Cache file format (spec §6): file names, tensor keys with dtype suffixes, metadata, header reading, batch keys.

Names and keys stay compatible with musubi-tuner v0.3.4 caches.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

FORMAT_VERSION = "1.0.1"
VARLEN_PREFIX = "varlen_"

# dtype names as they appear in keys; matched longest first so "float8_e4m3fn" wins over "float8"-like prefixes
DTYPE_NAMES = sorted(
    {str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)},
    key=len,
    reverse=True,
)
_SHAPE_TOKEN = re.compile(r"_\d+x\d+(?:x\d+)?$")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------- file names


def latent_cache_path(
    cache_dir: str | Path,
    stem: str,
    original_size: tuple[int, int],
    arch: str,
    *,
    clip: tuple[int, int] | None = None,
    section: int | None = None,
) -> Path:
    """``<stem>[_<start:05d>-<count:03d>[-<section>]]_<W:04d>x<H:04d>_<arch>.safetensors`` (original media size)."""
    w, h = original_size
    token = ""
    if clip is not None:
        token = f"_{clip[0]:05d}-{clip[1]:03d}" + (f"-{section}" if section is not None else "")
    return Path(cache_dir) / f"{stem}{token}_{w:04d}x{h:04d}_{arch}.safetensors"


def te_cache_path(cache_dir: str | Path, stem: str, arch: str) -> Path:
    """``<stem>_<arch>_te.safetensors`` (one per source item)."""
    return Path(cache_dir) / f"{stem}_{arch}_te.safetensors"


@dataclass(frozen=True)
class LatentCacheName:
    """A latent cache file name parsed back: stem, original size and (for video clips) start/count/section."""

    stem: str
    width: int
    height: int
    start: int | None = None
    count: int | None = None
    section: int | None = None


def parse_latent_cache_name(path: str | Path, arch: str, *, video: bool) -> LatentCacheName | None:
    """Parse ``latent_cache_path`` output back; None if the name does not match (e.g. another architecture's)."""
    name = Path(path).name
    clip = r"_(?P<start>\d{5,})-(?P<count>\d{3,})(?:-(?P<section>\d+))?" if video else ""
    m = re.fullmatch(rf"(?P<stem>.+){clip}_(?P<w>\d{{4,}})x(?P<h>\d{{4,}})_{re.escape(arch)}\.safetensors", name)
    if not m:
        return None
    g = m.groupdict()
    return LatentCacheName(
        stem=g["stem"],
        width=int(g["w"]),
        height=int(g["h"]),
        start=int(g["start"]) if g.get("start") else None,
        count=int(g["count"]) if g.get("count") else None,
        section=int(g["section"]) if g.get("section") else None,
    )


def latent_cache_glob(arch: str) -> str:
    return f"*_{arch}.safetensors"


def te_cache_glob(arch: str) -> str:
    return f"*_{arch}_te.safetensors"


# ---------------------------------------------------------------------------------------------------- tensor keys


def cache_key(name: str, tensor: torch.Tensor) -> str:
    """Key of a named tensor inside a cache file.

    ``latents*`` names get the latent size token (``FxHxW`` for ``(C, F, H, W)``, ``HxW`` for ``(C, H, W)``) and the
    dtype; ``*_mask`` names stay as they are; anything else gets ``_<dtype>``. Variable-length tensors are named
    ``varlen_<name>`` by the encoder.
    """
    if name.endswith("_mask"):
        return name
    if name.startswith("latents"):
        dims = tensor.shape[-3:] if tensor.dim() >= 4 else tensor.shape[-2:]
        return f"{name}_{'x'.join(str(int(d)) for d in dims)}_{dtype_name(tensor.dtype)}"
    return f"{name}_{dtype_name(tensor.dtype)}"


def strip_dtype(key: str) -> str:
    """Remove a trailing ``_<dtype>`` (longest dtype names first); keys without one are returned unchanged."""
    for d in DTYPE_NAMES:
        if key.endswith("_" + d):
            return key[: -len(d) - 1]
    return key


def batch_key(key: str) -> tuple[str, bool]:
    """Batch name of a cache key and whether it is variable-length (spec §6.4)."""
    varlen = key.startswith(VARLEN_PREFIX)
    name = key[len(VARLEN_PREFIX) :] if varlen else key
    if not name.endswith("_mask"):
        name = strip_dtype(name)
    if name.startswith("latents"):
        name = _SHAPE_TOKEN.sub("", name)
    return name, varlen


def sanitize_nans(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Replace NaNs by 0 in floating tensors, with a warning naming ``where`` and the key."""
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point():
            nan = torch.isnan(t.float()) if t.dtype.itemsize == 1 else torch.isnan(t)
            if bool(nan.any()):
                logger.warning(f"{where}: {int(nan.sum())} NaN values in {key!r} replaced by 0")
                t = torch.where(nan, torch.zeros((), dtype=torch.float32), t.float()).to(t.dtype)
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------------- metadata / I/O


def latent_metadata(arch_full: str, width: int, height: int, frame_count: int | None = None) -> dict[str, str]:
    """Latent cache metadata: architecture, original width/height, format_version, frame_count (video)."""
    md = {"architecture": arch_full, "width": str(width), "height": str(height), "format_version": FORMAT_VERSION}
    if frame_count is not None:
        md["frame_count"] = str(frame_count)
    return md


def te_metadata(arch_full: str, caption: str) -> dict[str, str]:
    """TE cache metadata: architecture, caption1 (UTF-8), format_version."""
    return {"architecture": arch_full, "caption1": caption, "format_version": FORMAT_VERSION}


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor entries (``{key: {"dtype", "shape", ...}}``) and metadata of a safetensors file, header only.

    A missing or truncated file (header cut, or tensor data past the end of the file) is a ``UserError`` naming it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"truncated: the tensors need {8 + n + max(ends)} bytes, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: unreadable cache file ({e}); delete it and re-run the caching script") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def metadata_mismatch(metadata: dict[str, str], arch_full: str) -> str | None:
    """Describe an ``architecture`` / ``format_version`` mismatch, or None when the cache matches."""
    problems = []
    if metadata.get("architecture") != arch_full:
        problems.append(f"architecture expected {arch_full!r}, found {metadata.get('architecture')!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version expected {FORMAT_VERSION!r}, found {metadata.get('format_version')!r}")
    return "; ".join(problems) or None


def save_cache(path: str | Path, named: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write named tensors (see ``cache_key``) atomically, NaNs replaced, CPU-contiguous."""
    # clone: encoders often return views of one batch tensor, which safetensors refuses to save as shared memory
    tensors = {cache_key(name, t): t.detach().to("cpu").clone() for name, t in named.items()}
    tensors = sanitize_nans(tensors, str(path))
    save_safetensors_atomic(tensors, path, metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a cache file (keys as stored)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: unreadable cache file ({e}); delete it and re-run the caching script") from None
