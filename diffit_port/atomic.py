"""Atomic file replacement: write a temporary file in the target's directory, fsync it, rename it over the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """A new, empty temporary file `.<name>.<random>.tmp` in `path`'s directory (which must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) data to the disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        if not Path(path).is_dir():
            raise                                # some filesystems refuse fsync on directories: not fatal
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() / mkdir() would give under the current umask (mkstemp / mkdtemp use 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync `tmp`, give it the usual file mode (mkstemp makes 0600), rename it over `path`, fsync the
    directory, so that after a crash `path` is either the old file or the complete new one."""
    fsync_path(tmp)
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file or directory left by a failed write (nothing if it is gone)."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of `path`; returns them, deepest first, for `remove_dirs`
    (on an error the ones made so far are removed again)."""
    missing, p = [], Path(path).parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
    except OSError:
        remove_dirs(missing)
        raise
    return missing


def remove_dirs(dirs: list[Path]) -> None:
    """Remove directories made by `make_parents` if they are (still) empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (its directory is created) for the caller to write; on a
    normal exit it is committed over `path`, on any exception (KeyboardInterrupt, a full disk) removed,
    leaving any previous `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` that writes a temporary file and renames it over `path` only once the block
    finished without an exception (see `replacing`). mode is "wb" or "w"."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    with replacing(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))
