"""Write a ``.safetensors`` file one tensor at a time.

The header (names, dtypes, shapes, offsets) is known before any data is produced, so it is written first and each
tensor is appended as soon as it exists: peak memory is one tensor, not the whole state dict that
``safetensors.torch.save_file`` needs. The file is written through ``atomic_path`` (temp file + rename).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from musubi_tuner.utils.atomic import atomic_path

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StreamingSafetensorsWriter:
    """Context manager: declare every tensor's ``(dtype, shape)`` up front, then ``write(key, tensor)`` in order."""

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self.order = list(layout)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._layout = {}
        for key, (dtype, shape) in layout.items():
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[key] = (dtype, tuple(shape), nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data section aligned to 8 bytes, as safetensors writes it
        self._header = len(raw).to_bytes(8, "little") + raw
        self._next = 0
        self._stack = ExitStack()
        self._file = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 - closed by the exit stack
        self._file.write(self._header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (must be the next declared key, with the declared dtype and shape)."""
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "<end>"
            raise ValueError(f"tensor {key!r} written out of order (expected {expected!r})")
        dtype, shape, nbytes = self._layout[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert data.numel() == nbytes
        if nbytes:
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._next != len(self.order):
            err = ValueError(f"{self.path}: tensor {self.order[self._next]!r} was declared but never written")
            self._stack.__exit__(ValueError, err, None)  # removes the temporary file
            raise err
        self._stack.__exit__(exc_type, exc, tb)
