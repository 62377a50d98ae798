"""Where sampled images go: output paths checked before sampling, and writers that take finished batches as they
come (a PNG grid, an .npy array, a directory of PNGs) and appear under their names only once the run succeeded."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from . import atomic
from .images import PngStream, auto_scale, grid_shape, tiles_uint8


class OutputError(ValueError):
    """An output path that cannot be used (a usage error: nothing has been sampled or written yet)."""


class WriteError(RuntimeError):
    """The disk refused an output (full, over a size limit, an I/O error); the message names the file."""


# errno values that mean "the storage failed", not "the path is wrong"
_STORAGE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


def write_failure(e: OSError, what: str, path: Path) -> Exception:
    """The error to raise when opening or writing output `path` failed with `e`."""
    text = f"cannot write {what} {path}: {e.strerror or e}"
    return WriteError(text) if e.errno in _STORAGE_ERRORS else OutputError(text)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_parent(path: Path, what: str) -> None:
    """The directory of `path` exists or can be created: its nearest existing ancestor is a directory."""
    base = _nearest_existing(path.parent)                 # (a bare file name's parent is Path("."))
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory")


def check_output_file(path: Path, suffix: str, what: str) -> None:
    """Static checks (nothing is written): the extension, not an existing directory, a usable parent."""
    if path.suffix.lower() != suffix:
        raise OutputError(f"{what} {path}: the file name must end in {suffix}")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name ending in {suffix}")
    check_parent(path, what)


def check_output_dir(path: Path, what: str) -> None:
    """A directory that does not exist yet or is empty (it is filled in a staging directory, then renamed)."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise OutputError(f"{what} {path} is not empty; give a new or empty directory")
    check_parent(path, what)


def check_distinct(paths: dict[str, Path | None]) -> None:
    """No two outputs name the same file."""
    seen: dict[Path, str] = {}
    for what, p in paths.items():
        if p is None:
            continue
        key = Path(os.path.abspath(p))
        if key in seen:
            raise OutputError(f"{seen[key]} and {what} name the same file {p}")
        seen[key] = what


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until every byte is written: a write can be short (near a size limit, on a full disk), and the
    next one then raises the error (ENOSPC, EFBIG)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, f"short read: {len(data)} of {size} bytes")
    return data


class Writer:
    """Base of the streaming writers: a temporary file (or directory) next to the target, created when the
    writer is opened (so an unwritable destination fails before sampling), filled by `write(start, images)`,
    then `finish()` (flush and fsync) and `commit()` (rename into place); `discard()` removes every trace,
    including parent directories it created. `write` is thread-safe."""

    what = "output"

    def __init__(self, path: Path, num_images: int):
        self.path, self.num_images = Path(path), int(num_images)
        self._lock = threading.Lock()
        try:
            self._created = atomic.make_parents(self.path)
        except OSError as e:
            raise OutputError(f"{self.what} {self.path}: cannot create {e.filename}: {e.strerror}") from None
        try:
            self.tmp = self._open_temp()
        except OSError as e:
            atomic.remove_dirs(self._created)
            raise write_failure(e, self.what, self.path) from None

    def _open_temp(self) -> Path:
        return atomic.temp_path(self.path)

    def write(self, start: int, images: np.ndarray) -> None:
        if start < 0 or start + len(images) > self.num_images:
            raise ValueError(f"images {start}..{start + len(images) - 1} outside 0..{self.num_images - 1}")
        with self._lock:
            try:
                self._write(start, images)
            except OSError as e:
                raise write_failure(e, self.what, self.path) from None

    def _write(self, start: int, images: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        atomic.fsync_path(self.tmp)

    def commit(self) -> None:
        os.chmod(self.tmp, atomic.default_mode())
        os.replace(self.tmp, self.path)
        atomic.fsync_path(self.path.parent)

    def discard(self) -> None:
        atomic.discard(self.tmp)
        atomic.remove_dirs(self._created)


class FileWriter(Writer):
    """A writer whose temporary file stays open while batches arrive; `_start(f)` writes its beginning."""

    def _open_temp(self) -> Path:
        tmp = atomic.temp_path(self.path)
        try:
            self._f = open(tmp, "r+b")
            self._start(self._f)
        except BaseException:
            if hasattr(self, "_f"):
                self._f.close()
            atomic.discard(tmp)
            raise
        return tmp

    def _start(self, f: BinaryIO) -> None:
        pass

    def finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().discard()


class NpyWriter(FileWriter):
    """float32 (N, *shape) in an .npy file, each batch written at its offset (nothing held in memory); the file
    is allocated in full when opened, so a disk without room for it fails before sampling."""

    what = "--save-npy"

    def __init__(self, path: Path, num_images: int, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        super().__init__(path, num_images)

    def _start(self, f: BinaryIO) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.num_images, *self.shape)}
        np.lib.format.write_array_header_1_0(f, header)
        self._offset = f.tell()
        self._row = int(np.prod(self.shape)) * 4
        total = self._offset + self.num_images * self._row
        try:
            os.posix_fallocate(f.fileno(), 0, total)
        except (AttributeError, OSError) as e:   # no posix_fallocate here, or a filesystem without it
            if not isinstance(e, AttributeError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            f.truncate(total)

    def _write(self, start: int, images: np.ndarray) -> None:
        data = np.ascontiguousarray(images, dtype=np.float32)
        if data.shape[1:] != self.shape:
            raise ValueError(f"images of shape {data.shape[1:]}, expected {self.shape}")
        pwrite_all(self._f.fileno(), data.tobytes(), self._offset + start * self._row)


class GridWriter(FileWriter):
    """A PNG grid (black 2-pixel borders, `nrow` tiles per row) written band by band while batches arrive:
    each image's uint8 tile goes to an anonymous scratch file, and every grid row whose images are all
    there is encoded at once, so memory holds one band, whatever the number of images or their order."""

    what = "--output"

    def __init__(self, path: Path, num_images: int, shape: tuple[int, ...], *, scale: int = 0,
                 nrow: int | None = None, pad: int = 2):
        c, h, w = shape
        self.scale = scale or auto_scale(w)
        self.channels = 1 if c in (1, 2) else 3
        self.tile = (h * self.scale, w * self.scale)
        self.rows, self.cols = grid_shape(num_images, nrow)
        self.pad = pad
        self._done = np.zeros(num_images, dtype=bool)
        self._next_band = 0
        super().__init__(path, num_images)

    def _start(self, f: BinaryIO) -> None:
        th, tw = self.tile
        width = self.cols * (tw + self.pad) + self.pad
        height = self.rows * (th + self.pad) + self.pad
        self._png = PngStream(f, width, height, self.channels)
        self._scratch = tempfile.TemporaryFile(dir=self.path.parent)   # unlinked at once: never left behind

    @property
    def _tile_bytes(self) -> int:
        return self.tile[0] * self.tile[1] * self.channels

    def _write(self, start: int, images: np.ndarray) -> None:
        tiles = tiles_uint8(images, self.scale)
        pwrite_all(self._scratch.fileno(), tiles.tobytes(), start * self._tile_bytes)
        self._done[start:start + len(images)] = True
        while self._next_band < self.rows:
            lo = self._next_band * self.cols
            hi = min(lo + self.cols, self.num_images)
            if not self._done[lo:hi].all():
                break
            self._emit_band(lo, hi)
            self._next_band += 1

    def _emit_band(self, lo: int, hi: int) -> None:
        th, tw = self.tile
        raw = pread_exact(self._scratch.fileno(), (hi - lo) * self._tile_bytes, lo * self._tile_bytes)
        tiles = np.frombuffer(raw, dtype=np.uint8).reshape(hi - lo, th, tw, self.channels)
        if self._next_band == 0:
            self._png.write_rows(np.zeros((self.pad, self._png.width * self.channels), np.uint8))
        band = np.zeros((th + self.pad, self._png.width, self.channels), dtype=np.uint8)
        for q, tile in enumerate(tiles):
            x0 = self.pad + q * (tw + self.pad)
            band[:th, x0:x0 + tw] = tile
        self._png.write_rows(band)

    def finish(self) -> None:
        if not self._done.all():
            raise ValueError(f"{int((~self._done).sum())} images were never written to the grid")
        self._png.close()
        self._scratch.close()
        super().finish()

    def discard(self) -> None:
        if hasattr(self, "_scratch") and not self._scratch.closed:
            self._scratch.close()
        super().discard()


class ImageDirWriter(Writer):
    """One PNG per image (`000000.png`, ...), written into a hidden staging directory next to the target as
    batches arrive, fsynced, and renamed to the target directory at the end (which must be new or empty)."""

    what = "--output-dir"

    def __init__(self, path: Path, num_images: int):
        self.digits = max(6, len(str(max(num_images - 1, 0))))
        super().__init__(path, num_images)

    def _open_temp(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))

    def _write(self, start: int, images: np.ndarray) -> None:
        from PIL import Image

        for i, tile in enumerate(tiles_uint8(images)):
            target = self.tmp / f"{start + i:0{self.digits}d}.png"
            with open(target, "wb") as f:
                Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile).save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())

    def commit(self) -> None:
        os.chmod(self.tmp, atomic.default_mode(directory=True))
        if self.path.is_dir():
            self.path.rmdir()                    # checked empty before sampling; rename cannot replace a full one
        os.replace(self.tmp, self.path)
        atomic.fsync_path(self.path.parent)


def finish_all(writers: Sequence[Writer]) -> None:
    """Flush every writer (any may fail: a full disk), then rename them all into place."""
    for w in writers:
        try:
            w.finish()
        except OSError as e:
            raise write_failure(e, w.what, w.path) from None
    for w in writers:
        w.commit()


def discard_all(writers: Sequence[Writer]) -> None:
    for w in writers:
        w.discard()
