"""Streaming weights reader: safetensors files (single, split ``-0000N-of-0000M``, index json, directory) and ``.pt``.

Tensors are read one at a time with positioned reads straight into a freshly allocated CPU tensor. We deliberately do
not keep a memory map of the file: pages of a mapping count toward the process RSS while it lives, so mapping the
checkpoint and then copying or converting each tensor costs file size + model size at peak (measured in
docs/performance.md, "Loading"). Reading into the destination buffer keeps the peak at the model size plus one tensor.
Headers are parsed here (8-byte little-endian length + JSON, the safetensors format) and validated against the file
size, so a truncated or foreign file is a ``UserError`` naming it. ``.pt/.pth`` files are opened only with
``torch.load(weights_only=True, mmap=True)``; each tensor read from such a mapping is copied into a fresh buffer and
its pages of the mapping are handed back chunk by chunk (``madvise(MADV_DONTNEED)``, Linux), so reading a ``.pth``
tensor by tensor costs about what a safetensors file costs: the destination plus one 16 MiB chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.utils.errors import UserError

PathLike = str | os.PathLike
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d+)-of-(?P<total>\d+)(?P<ext>\.safetensors)$")
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; returns (header dict, data offset). Errors name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(f"{path}: unreadable safetensors header (declared length {n}, file size {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable safetensors header ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: unreadable safetensors header (not a JSON object)")
    return header, 8 + n


def _parse_tensor_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    header, data_start = _read_header(path)
    size = path.stat().st_size
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: unreadable safetensors header entry for {key!r}") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise UserError(f"{path}: tensor {key!r} has dtype {dtype_name}, which this tool cannot load")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise UserError(f"{path}: tensor {key!r} lies outside the file or has a wrong size (truncated download?)")
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def load_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` of one safetensors file (header only; no tensor data is read)."""
    header, _ = _read_header(Path(path))
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def resolve_weight_files(path_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand the user's weights argument into the list of files to read.

    Accepts a file, any one shard of a ``name-0000N-of-0000M.safetensors`` set (all shards are used), a
    ``*.safetensors.index.json``, a directory (its index json if there is one, else all ``*.safetensors`` in it), or
    a list of these.
    """
    if not isinstance(path_or_paths, (str, os.PathLike)):
        files: list[Path] = []
        for p in path_or_paths:
            files.extend(f for f in resolve_weight_files(p) if f not in files)
        if not files:
            raise UserError("no weight files given")
        return files
    path = Path(path_or_paths)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _files_from_index(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{path}: directory contains no .safetensors files")
        return _dedupe_shard_sets(files)
    if path.name.endswith(".index.json"):
        return _files_from_index(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    m = SHARD_RE.match(path.name)
    if m:
        return _shard_set(path, m)
    return [path]


def _shard_set(path: Path, m: re.Match) -> list[Path]:
    width, total = len(m["idx"]), int(m["total"])
    files = [path.with_name(f"{m['stem']}-{i:0{width}d}-of-{m['total']}{m['ext']}") for i in range(1, total + 1)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"{missing[0]}: shard {missing[0].name} of the split checkpoint {path.name} is missing")
    return files


def _dedupe_shard_sets(files: list[Path]) -> list[Path]:
    out: list[Path] = []
    for f in files:
        m = SHARD_RE.match(f.name)
        for g in _shard_set(f, m) if m else [f]:
            if g not in out:
                out.append(g)
    return out


def _files_from_index(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except FileNotFoundError:
        raise UserError(f"{index}: file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    files: list[Path] = []
    for name in weight_map.values():
        f = index.parent / name
        if f not in files:
            files.append(f)
    for f in files:
        if not f.exists():
            raise UserError(f"{f}: shard listed in {index} is missing")
    return files


class WeightsReader:
    """Read tensors from one checkpoint (possibly several files) one at a time. Use as a context manager or ``close()``."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._infos: dict[str, TensorInfo] = {}
        self._pt: dict[str, torch.Tensor] = {}
        self._pt_origin: dict[str, Path] = {}
        self._pt_maps: dict[Path, list[tuple[int, int]]] = {}  # .pt files memory-mapped by torch.load: address ranges
        self._metadata: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            if f.suffix in PT_SUFFIXES:
                tensors, mapped = _torch_load(f)
                if mapped:
                    self._pt_maps[f] = _mapped_ranges(f)
                self._add_keys(tensors.keys(), f)
                self._pt.update(tensors)
                self._pt_origin.update(dict.fromkeys(tensors, f))
            else:
                infos, meta = _parse_tensor_infos(f)
                self._add_keys(infos.keys(), f)
                self._infos.update(infos)
                for k, v in meta.items():
                    self._metadata.setdefault(k, v)

    def _add_keys(self, keys: Iterable[str], f: Path) -> None:
        for k in keys:
            if k in self._infos or k in self._pt:
                raise UserError(f"{f}: tensor {k!r} also appears in {self.file_of(k)}")

    @property
    def name(self) -> str:
        """A short description for messages: the file, or the first file and the count."""
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} more files)"

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._infos) + list(self._pt)

    def __contains__(self, key: str) -> bool:
        return key in self._infos or key in self._pt

    def __len__(self) -> int:
        return len(self._infos) + len(self._pt)

    def metadata(self) -> dict[str, str]:
        """Safetensors ``__metadata__`` (merged over shards; the first file wins on conflicts)."""
        return dict(self._metadata)

    def file_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self._infos[key].path if key in self._infos else self._pt_origin[key]

    def _check(self, key: str) -> None:
        if key not in self:
            raise UserError(f"{self.name}: no tensor named {key!r}")

    def get_shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading it."""
        self._check(key)
        return self._infos[key].shape if key in self._infos else tuple(self._pt[key].shape)

    def get_dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key`` without reading it."""
        self._check(key)
        return self._infos[key].dtype if key in self._infos else self._pt[key].dtype

    def get_nbytes(self, key: str) -> int:
        """Stored size of ``key`` in bytes."""
        self._check(key)
        if key in self._infos:
            return self._infos[key].end - self._infos[key].start
        t = self._pt[key]
        return t.numel() * t.element_size()

    def get_tensor(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one tensor (converted to ``dtype`` when given, then moved to ``device``)."""
        self._check(key)
        if key in self._pt:
            t = self._pt[key]
            if self._pt_origin[key] in self._pt_maps:
                t = _copy_out_of_mapping(t, self._pt_maps[self._pt_origin[key]])
        else:
            t = self._read(self._infos[key])
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if torch.device(device).type != "cpu" else t

    def _read(self, info: TensorInfo) -> torch.Tensor:
        if _HEADER_ONLY.get():
            return torch.empty(info.shape, dtype=info.dtype)
        nbytes = info.end - info.start
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            f = self._handles.get(info.path)
            if f is None:
                f = self._handles[info.path] = open(info.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            view = memoryview(buf.numpy())
            done = 0
            while done < nbytes:
                n = (
                    os.preadv(f.fileno(), [view[done:]], info.start + done)
                    if hasattr(os, "preadv")
                    else _pread(f, view, info, done)
                )
                if n <= 0:
                    raise UserError(f"{info.path}: file ended early while reading (truncated?)")
                done += n
        return buf.view(info.dtype).reshape(info.shape)

    def iter_tensors(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        hook: TensorHook | None = None,
        keys: Iterable[str] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time; ``hook(key, tensor) -> tensor`` runs before the dtype conversion."""
        for key in self.keys() if keys is None else keys:
            t = self.get_tensor(key)
            if hook is not None:
                t = hook(key, t)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            yield key, t.to(device) if torch.device(device).type != "cpu" else t

    def close(self) -> None:
        """Close open file handles and drop ``.pt`` tensors."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._pt.clear()

    def __enter__(self) -> WeightsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread(f, view: memoryview, info: TensorInfo, done: int) -> int:
    f.seek(info.start + done)
    return f.readinto(view[done:])


@functools.cache
def _madvise() -> object | None:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_COPY_CHUNK_BYTES = 16 * 2**20


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is mapped into this process (``/proc/self/maps``; empty elsewhere)."""
    target = str(path.resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):  # one file can show as several adjacent entries
        if merged and lo == merged[-1][1]:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def _copy_out_of_mapping(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of ``t`` (a tensor inside ``torch.load(mmap=True)``'s private mapping) in fresh memory.

    The copy goes in 16 MiB chunks, and after each chunk the mapping's pages under it are dropped from this process
    (re-read from the file if touched again; nothing writes them), so at most one chunk of mapped pages is resident
    next to the destination: reading a ``.pth`` costs what a safetensors file costs."""
    madvise = _madvise()
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    inside = any(lo <= first - first % _PAGE and last <= hi for lo, hi in ranges)  # never drop pages of other memory
    if madvise is None or not inside or not t.is_contiguous() or t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    src, dst = t.reshape(-1), out.view(-1)
    step = max(1, _COPY_CHUNK_BYTES // t.element_size())
    base = t.data_ptr()
    for i in range(0, src.numel(), step):
        j = min(i + step, src.numel())
        dst[i:j].copy_(src[i:j])
        lo = base + i * t.element_size()
        lo -= lo % _PAGE
        madvise(lo, base + j * t.element_size() - lo, _MADV_DONTNEED)  # a failure only costs memory, never data
    return out


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``(state dict, memory-mapped?)`` of a ``.pt/.pth`` file, loaded with ``weights_only=True``."""
    if _HEADER_ONLY.get():
        raise UserError(
            f"{path}: only safetensors headers can be read without loading the weights; convert the file to .safetensors"
        )
    mapped = True
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            mapped = False
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format cannot be mapped
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:  # unpickling errors have many types; every one means "not a loadable weights file"
        raise UserError(f"{path}: cannot load as weights with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return obj, mapped


_HEADER_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("header_only_reads", default=False)


@contextlib.contextmanager
def header_only_reads() -> Iterator[None]:
    """Inside this block ``WeightsReader`` reads no tensor data: each tensor is ``torch.empty`` of its header's shape and
    dtype (a fake tensor under ``FakeTensorMode``). The memory estimator runs the real loaders this way."""
    token = _HEADER_ONLY.set(True)
    try:
        yield
    finally:
        _HEADER_ONLY.reset(token)


def open_weights(path_or_paths: PathLike | Iterable[PathLike]) -> WeightsReader:
    """Open a checkpoint for streaming; see ``resolve_weight_files`` for what the argument may be."""
    return WeightsReader(resolve_weight_files(path_or_paths))
