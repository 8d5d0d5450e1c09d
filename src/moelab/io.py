"""Atomic file writes: a crash never leaves a half-written file behind.

Everything moelab writes (checkpoints, tokenizers, reports, JSON results) goes
through these helpers: write to a temporary file in the same directory, flush
and fsync, then `os.replace` onto the final name (atomic on POSIX). A folder
written as one unit (`atomic_dir`) is assembled under a temporary name beside
it and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not safe to do
# while another thread may be creating files.
_UMASK = _read_umask()


class OutputError(OSError):
    """A file or folder cannot be written where the user asked; the message says why in
    words (no ``[Errno N]``, no temporary file name). An `OSError`, so callers that catch
    those (the CLI prints them as one line) still do."""


_WHY = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "it is a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the name is too long",
}


def why(e: OSError) -> str:
    """An OS error's reason in words, without ``[Errno N]`` or the (temporary) file names."""
    return _WHY.get(e.errno, (e.strerror or str(e)).lower()) if e.errno is not None else str(e)


def output_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """`e`, raised while writing `path`, as one line naming `path` (not a temporary name)."""
    return OutputError(f"cannot write {path}: {why(e)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    Use this for writers that want a filename (e.g. `safetensors.torch.save_file`).
    On an exception the temporary file is removed and `path` is untouched. Failing to
    create the temporary file or to rename it raises `OutputError` naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise output_error(path, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask),
        # so reports and checkpoints are readable by others as any written file is.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            raise output_error(path, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; rename it onto `path` when the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`.

    An existing `path` (the caller decided it may go) is moved aside first and removed
    only once the new folder is in place; on an exception the temporary folder is
    removed and `path` is untouched. Callers refuse an existing `path` themselves.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the mode a plain mkdir would
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (~1.4-1.6 GB/s on one core with
    SHA-NI, measured on the AMD EPYC of BENCHMARKS.md, 2026-12-02; the read itself is the
    cost on a cold page cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the quota) is full: an `OSError` with ENOSPC/EDQUOT,
    or a writer's own error carrying the OS message (safetensors raises ``SafetensorError(
    "... No space left on device (os error 28)")``, no errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def free_space_text(path: str | os.PathLike) -> str:
    """The free space of the file system holding `path` (or its nearest existing parent),
    in words: "12.3 MB free of 1.0 GB"."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{_bytes_text(usage.free)} free of {_bytes_text(usage.total)}"


def _bytes_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
