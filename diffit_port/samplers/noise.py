"""Per-image random streams, so a run's images do not depend on how it is split into batches."""

from __future__ import annotations

import numpy as np


class NoiseSource:
    """Per-image random streams: image i of a run with seed S always gets the same noise, whatever the batch
    split (EDM's StackedRandomGenerator idea), so runs split across batches / GPUs / runtimes agree."""

    def __init__(self, seed: int, num_images: int, first: int = 0):
        self.seed, self.num_images, self.first = int(seed), int(num_images), int(first)
        if self.seed < 0 or self.num_images < 0 or self.first < 0:
            raise ValueError("seed, num_images and first must be non-negative")
        self._generators = [np.random.default_rng([self.seed, self.first + i]) for i in range(self.num_images)]

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """float64 `shape` with shape[0] == num_images; row i continues image (first + i)'s own stream."""
        shape = tuple(int(n) for n in shape)
        if not shape or shape[0] != self.num_images:
            raise ValueError(f"shape[0] must be num_images={self.num_images}, got shape {shape}")
        out = np.empty(shape, dtype=np.float64)
        for row, g in zip(out, self._generators):
            row[...] = g.standard_normal(shape[1:])
        return out

    def split(self, start: int, stop: int) -> "NoiseSource":
        """Images start..stop-1 (relative); a view that shares those images' streams with this source."""
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"split({start}, {stop}) outside 0..{self.num_images}")
        sub = NoiseSource(self.seed, 0, self.first + start)
        sub.num_images, sub._generators = stop - start, self._generators[start:stop]
        return sub


Noise = NoiseSource | np.random.Generator
