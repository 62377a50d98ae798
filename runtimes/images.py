"""Samples in [-1, 1] -> a near-square PNG grid (grayscale or RGB)."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float (..., ) in [-1, 1] -> uint8 in [0, 255]; values outside [-1, 1] are clipped."""
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid holding n tiles: cols = ceil(sqrt(n))."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad[, 3]) with black borders.

    C is 1 (grayscale) or 3 (RGB); other channel counts (latents without a decoder) show their first
    channel (C = 2) or first three channels (C > 3), so the grid still gives a rough look."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        images = images[:, :3] if c > 3 else images[:, :1]
        c = images.shape[1]
    rows, cols = grid_shape(n)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    tiles = to_uint8(images).transpose(0, 2, 3, 1)                     # (N, H, W, C)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = tile
    return grid[..., 0] if c == 1 else grid


def save_grid(images: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    grid = make_grid(images)
    Image.fromarray(grid).save(path)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
