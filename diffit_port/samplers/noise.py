"""Per-image random streams, so a run's images do not depend on how it is split into batches."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.random.bit_generator import ISeedSequence

PARALLEL_VALUES = 1 << 16      # values per thread at least, when a draw is spread over threads
WORKERS = min(8, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _draw_pool() -> ThreadPoolExecutor:
    """The threads that fill the rows of large draws (NumPy's generators release the GIL while filling)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="diffit-noise")
        return _pool


class NoiseSource:
    """Per-image random streams: image i of a run with seed S always gets the same noise, whatever the batch
    split (EDM's StackedRandomGenerator idea), so runs split across batches / GPUs / runtimes agree. Each image's
    generator is made when its image is first drawn (a run of many batches seeds each batch where it is drawn:
    1,024 streams took 3-5 ms to seed, on whatever thread made the source)."""

    def __init__(self, seed: int, num_images: int, first: int = 0):
        self.seed, self.num_images, self.first = int(seed), int(num_images), int(first)
        if self.seed < 0 or self.num_images < 0 or self.first < 0:
            raise ValueError("seed, num_images and first must be non-negative")
        self._streams, self._offset = _Streams(self.seed, self.first, self.num_images), 0

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """float64 `shape` with shape[0] == num_images; row i continues image (first + i)'s own stream."""
        shape = tuple(int(n) for n in shape)
        if not shape or shape[0] != self.num_images:
            raise ValueError(f"shape[0] must be num_images={self.num_images}, got shape {shape}")
        out = np.empty(shape, dtype=np.float64)
        gens = self._streams.get(self._offset, self._offset + self.num_images)
        # each thread fills at least PARALLEL_VALUES values: on a 16-core GPU host a 256 x 1024 draw took 7-8 ms on
        # 8 threads and 3.4-4.5 ms on 4 (the row loop holds the GIL between fills)
        workers = max(1, min(WORKERS, self.num_images, out.size // PARALLEL_VALUES))
        if workers <= 1:
            self._fill(gens, out, 0, self.num_images)
            return out
        bounds = np.linspace(0, self.num_images, workers + 1).astype(int)
        for f in [_draw_pool().submit(self._fill, gens, out, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
            f.result()
        return out

    @staticmethod
    def _fill(gens: list[np.random.Generator], out: np.ndarray, start: int, stop: int) -> None:
        # each stream is read by one thread only, in order: the values do not depend on the split
        for i in range(start, stop):
            gens[i].standard_normal(out=out[i])

    def split(self, start: int, stop: int) -> "NoiseSource":
        """Images start..stop-1 (relative); a view that shares those images' streams with this source."""
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"split({start}, {stop}) outside 0..{self.num_images}")
        sub = NoiseSource(self.seed, 0, self.first + start)
        sub.num_images, sub._streams, sub._offset = stop - start, self._streams, self._offset + start
        return sub


class _Streams:
    """The generators of images first..first+n-1 of one seed, each made on first use and kept (a source and its
    splits share them, so a draw through either continues the same streams)."""

    def __init__(self, seed: int, first: int, n: int):
        self.seed, self.first = seed, first
        self._gens: list[np.random.Generator | None] = [None] * n
        self._lock = threading.Lock()     # a split may be drawn on another thread (DeviceLoop's batch ahead)

    def get(self, start: int, stop: int) -> list[np.random.Generator]:
        """The generators of images start..stop-1 (relative), seeding in one pass those not made yet."""
        with self._lock:
            missing = [i for i in range(start, stop) if self._gens[i] is None]
            if missing:
                lo, hi = missing[0], missing[-1] + 1
                for i, g in zip(range(lo, hi), stream_generators(self.seed, self.first + lo, hi - lo)):
                    if self._gens[i] is None:      # a made generator may have been drawn from: never replace it
                        self._gens[i] = g
            return self._gens[start:stop]   # type: ignore[return-value]


Noise = NoiseSource | np.random.Generator

# NumPy's SeedSequence hash (numpy.random.bit_generator, after O'Neill's seed_seq_fe): its constants, uint32 arithmetic.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT, _POOL = 0xCA01F9DD, 0x4973F715, 16, 4


class _Words(ISeedSequence):
    """A seed sequence whose PCG64 state words were computed already (by _pcg64_words)."""

    __slots__ = ("words",)

    def __init__(self, words: np.ndarray):
        self.words = words

    def generate_state(self, n_words: int, dtype: type = np.uint32) -> np.ndarray:
        if n_words != 4 or np.dtype(dtype) != np.uint64:     # what PCG64 asks for, and all these words are
            raise ValueError(f"precomputed PCG64 words cannot give {n_words} x {np.dtype(dtype)}")
        return self.words


def _pcg64_words(seed: int, ids: np.ndarray) -> np.ndarray:
    """uint64 (n, 4): SeedSequence([seed, i]).generate_state(4, uint64) for each i of `ids` at once (both
    below 2**32, so each is one entropy word, as NumPy coerces them)."""
    u32 = np.uint32
    entropy = [np.full(len(ids), seed, u32), ids.astype(u32), np.zeros(len(ids), u32), np.zeros(len(ids), u32)]
    const = [u32(_INIT_A)]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ const[0]
        const[0] = const[0] * u32(_MULT_A)
        value = value * const[0]
        return value ^ (value >> u32(_XSHIFT))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = u32(_MIX_L) * x - u32(_MIX_R) * y
        return r ^ (r >> u32(_XSHIFT))

    pool = [hashmix(e) for e in entropy]          # the pool starts from the entropy words, zeros past them
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    out, c = np.empty((len(ids), 8), u32), u32(_INIT_B)
    for k in range(8):                            # generate_state: the pool cycled through a second hash
        v = pool[k % _POOL] ^ c
        c = c * u32(_MULT_B)
        v = v * c
        out[:, k] = v ^ (v >> u32(_XSHIFT))
    return out.astype("<u4").view("<u8")


def stream_generators(seed: int, first: int, n: int) -> list[np.random.Generator]:
    """np.random.default_rng([seed, first + i]) for i in 0..n-1, the same streams ~9x faster: the seed hash
    of all n at once, then PCG64 seeded from those words (NumPy's own seeding otherwise)."""
    if n == 0:                                    # NoiseSource.split's empty start
        return []
    if seed >= 2**32 or first + n > 2**32:
        return [np.random.default_rng([seed, first + i]) for i in range(n)]
    with np.errstate(over="ignore"):
        words = _pcg64_words(seed, np.arange(first, first + n, dtype=np.int64))
    return [np.random.Generator(np.random.PCG64(_Words(w))) for w in words]
