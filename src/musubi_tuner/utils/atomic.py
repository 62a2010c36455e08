"""Atomic file writes: write to a temporary file in the destination directory, fsync, then rename over the target.

A process killed mid-write leaves the previous file (or nothing) in place, never a truncated one. Temporary names are
hidden and end in ``.tmp`` (``.<name>.<random>.tmp``), so no glob or loader looking for ``*.safetensors`` picks one
up. A full disk (or quota, or file-size limit) while writing is a ``UserError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

_OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# libraries that do their own I/O (safetensors' Rust writer, torch.save's zip writer) raise their own exception types;
# torch's zip writer reports a short write as "file write failed" or "unexpected pos <n> vs <m>"
_OUT_OF_SPACE_TEXT = (
    "no space left",
    "storagefull",
    "disk quota",
    "file too large",
    "filetoolarge",
    "file write failed",
    "unexpected pos",
)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the disk, the quota or the file-size limit is full."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        text = str(exc).lower().replace(" ", "")
        if any(t.replace(" ", "") in text for t in _OUT_OF_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def out_of_space_message(exc: BaseException) -> str:
    """A short reason for an ``is_out_of_space`` error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return "no space left on the device (or the file-size limit was reached)"


def check_writable_dir(directory: str | os.PathLike, flag: str) -> Path:
    """Prove that ``directory`` can be created (or exists) and is writable, without creating anything.

    The nearest existing ancestor is probed with a hidden temporary file, removed at once. Run before any model is
    loaded, so a read-only or uncreatable output location is one ``UserError`` naming the option and the path instead
    of a failure after minutes (or hours) of work; a run that stops early (``--estimate_memory``, a later error)
    leaves no empty directory behind.
    """
    from musubi_tuner.utils.errors import UserError

    path = Path(directory)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
        _create_temp_file(existing, ".write_probe.", ".tmp").unlink()
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {path} ({e.strerror or e}); choose a writable location") from None
    return path


def _create_temp_file(directory: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with a unique name, created with mode 0o666 so the process umask applies.

    ``tempfile.mkstemp`` creates 0o600 files, and the rename would leave outputs (videos, LoRAs, caches) readable only
    by their owner; a plain ``open`` would give the permissions users expect.
    """
    for _ in range(100):
        candidate = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, then the permissions a plain ``mkdir`` would give (umask applied)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~_umask())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error it is removed.

    ``suffix`` ends the temporary name (writers that choose the format from the extension need the real one).
    """
    from musubi_tuner.utils.errors import UserError

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_file(dest.parent, f".{dest.name}.", suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_umask())  # writers that recreate the file (safetensors) leave it 0o600
        os.replace(tmp, dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, Exception) and not isinstance(e, UserError) and is_out_of_space(e):
            raise UserError(f"writing {dest}: {out_of_space_message(e)}; nothing was written") from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file + rename. Tensors are made contiguous first."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
