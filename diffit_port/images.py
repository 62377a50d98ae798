"""Samples in [-1, 1] -> PNG grids (NumPy and Pillow only; shared by training, evaluation and diffit-run), and a
row-by-row PNG encoder for grids too large to hold in memory."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .atomic import replacing


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float values in [-1, 1] -> uint8 in [0, 255], elementwise; values outside [-1, 1] are clipped."""
    return np.rint(np.clip((np.asarray(x, dtype=np.float64) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def auto_scale(size: int, min_tile: int = 96) -> int:
    """Integer upscaling that makes a `size`-pixel tile at least `min_tile` pixels (1 for large images)."""
    return max(1, math.ceil(min_tile / size))


def grid_shape(n: int, nrow: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a grid of `n` tiles: `nrow` tiles per row, or a near-square grid."""
    cols = max(1, min(nrow, n)) if nrow else max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def display_channels(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> the 1 or 3 channels a PNG shows: C = 1 or 3 as given; other channel counts (latents
    without a decoder) show their first channel (C = 2) or first three channels (C > 3) as a rough look."""
    c = images.shape[1]
    if c in (1, 3):
        return images
    return images[:, :3] if c > 3 else images[:, :1]


def tiles_uint8(images: np.ndarray, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (N, H * scale, W * scale, 1 or 3) tiles, nearest-neighbour upscaled."""
    tiles = to_uint8(display_channels(images)).transpose(0, 2, 3, 1)               # (N, H, W, C)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    return tiles


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 grid (H', W') or (H', W', 3), black borders.

    `nrow` images per row (default: a near-square grid); each tile is upscaled `scale` times with nearest
    neighbours, so small images stay sharp. C is 1 (grayscale) or 3 (RGB); see `display_channels` for others."""
    n = images.shape[0]
    rows, cols = grid_shape(n, nrow)
    tiles = tiles_uint8(images, scale)
    _, h, w, c = tiles.shape
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = tile
    return grid[..., 0] if c == 1 else grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> Path:
    """Write `make_grid(...)` as a PNG (grayscale "L" or "RGB") atomically (a complete new file or the old one);
    creates the parent directory."""
    from PIL import Image

    path = Path(path)
    with replacing(path) as tmp:
        Image.fromarray(make_grid(images, nrow, pad, scale)).save(tmp, format="PNG")
    return path


class PngStream:
    """An 8-bit grayscale or RGB PNG written to `f` band by band, so the whole image never has to be in
    memory (PNG spec: signature, IHDR, zlib-compressed scanlines in IDAT chunks, IEND; filter type 0)."""

    SIGNATURE = b"\x89PNG\r\n\x1a\n"

    def __init__(self, f: BinaryIO, width: int, height: int, channels: int, level: int = 6):
        if channels not in (1, 3):
            raise ValueError(f"PngStream writes 1 or 3 channels, got {channels}")
        self.f, self.width, self.height, self.channels = f, int(width), int(height), channels
        self.rows_written = 0
        self._z = zlib.compressobj(level)
        f.write(self.SIGNATURE)
        # IHDR: width, height, bit depth 8, colour type 0 (grey) or 2 (RGB), deflate, filter 0, no interlace.
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 0 if channels == 1 else 2, 0, 0, 0))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.f.write(struct.pack(">I", len(data)) + kind + data
                     + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF))

    def write_rows(self, rows: np.ndarray) -> None:
        """uint8 (k, width) or (k, width, channels): the next k rows of the image."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), -1)
        if rows.shape[1] != self.width * self.channels:
            raise ValueError(f"rows of {rows.shape[1]} bytes, expected {self.width * self.channels}")
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"more than {self.height} rows written")
        filtered = np.concatenate([np.zeros((len(rows), 1), np.uint8), rows], axis=1)   # filter byte 0 per row
        data = self._z.compress(filtered.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.rows_written += len(rows)

    def close(self) -> None:
        """Finish the zlib stream and write IEND; every row must have been written."""
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} of {self.height} rows written")
        self._chunk(b"IDAT", self._z.flush())
        self._chunk(b"IEND", b"")
