"""Samples in [-1, 1] -> PNG grids (NumPy and Pillow only; shared by training, evaluation and diffit-run)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float values in [-1, 1] -> uint8 in [0, 255], elementwise; values outside [-1, 1] are clipped."""
    return np.rint(np.clip((np.asarray(x, dtype=np.float64) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def auto_scale(size: int, min_tile: int = 96) -> int:
    """Integer upscaling that makes a `size`-pixel tile at least `min_tile` pixels (1 for large images)."""
    return max(1, math.ceil(min_tile / size))


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 grid (H', W') or (H', W', 3), black borders.

    `nrow` images per row (default: a near-square grid); each tile is upscaled `scale` times with nearest
    neighbours, so small images stay sharp. C is 1 (grayscale) or 3 (RGB); other channel counts (latents
    without a decoder) show their first channel (C = 2) or first three channels (C > 3) as a rough look."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        images = images[:, :3] if c > 3 else images[:, :1]
        c = images.shape[1]
    cols = max(1, min(nrow, n)) if nrow else max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    tiles = to_uint8(images).transpose(0, 2, 3, 1)                                  # (N, H, W, C)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = tile
    return grid[..., 0] if c == 1 else grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> Path:
    """Write `make_grid(...)` as a PNG (grayscale "L" or "RGB"); creates the parent directory."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, pad, scale)).save(path)
    return path
