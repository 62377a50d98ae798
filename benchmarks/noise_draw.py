"""What the seeding contract's noise costs on the host: seeding a batch's per-image streams, then its per-image
draw on 1..k threads, against one generator drawing the same number of values at once (what the draw would cost
without per-image streams). Medians of --runs; run on a quiet machine.

    python benchmarks/noise_draw.py --images 256 --shape 1,28,28 --shape 3,32,32
    python benchmarks/noise_draw.py --workers 1 --workers 2 --workers 4 --workers 8   # thread counts to time

The draw is timed on streams seeded beforehand (NoiseSource seeds each image's stream where it is first drawn, so a
first draw costs the seeding column plus a draw column). "default" is what NoiseSource picks for that size
(at most WORKERS threads, each filling at least PARALLEL_VALUES values); a number is exactly that many threads.
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import click
import numpy as np

from diffit_port.samplers import noise
from sampling import median_ms


def draw_ms(images: int, shape: tuple[int, ...], workers: int | None, runs: int) -> float:
    """Median ms of NoiseSource(0, images).standard_normal on streams seeded before the clock starts, on
    `workers` threads (None: NoiseSource's own choice)."""
    forced = {"WORKERS": noise.WORKERS, "PARALLEL_VALUES": noise.PARALLEL_VALUES} if workers is None else \
        {"WORKERS": workers, "PARALLEL_VALUES": 1}
    times = []
    with mock.patch.multiple(noise, **forced):
        for _ in range(runs):
            source = noise.NoiseSource(0, images)
            source.split(0, images)._streams.get(0, images)      # seed every stream first
            t0 = time.perf_counter()
            source.standard_normal((images, *shape))
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def default_threads(images: int, values: int) -> int:
    """The threads NoiseSource.standard_normal uses for this draw (its own rule)."""
    return max(1, min(noise.WORKERS, images, values // noise.PARALLEL_VALUES))


@click.command()
@click.option("--images", type=click.IntRange(1), default=256, show_default=True)
@click.option("--shape", "shapes", multiple=True, default=("1,28,28", "3,32,32"), show_default=True,
              help="One image's C,H,W (digits 1,28,28; image-cifar10 3,32,32); repeatable.")
@click.option("--workers", "workers", multiple=True, type=click.IntRange(1), default=(1,), show_default=True,
              help="Thread counts to time the draw on, besides NoiseSource's default; repeatable.")
@click.option("--runs", type=click.IntRange(1), default=30, show_default=True)
def main(images: int, shapes: tuple[str, ...], workers: tuple[int, ...], runs: int) -> None:
    print("| C,H,W | values | seeding ms | draw ms, default (threads) | "
          + " | ".join(f"draw ms, {k} thread{'s' if k > 1 else ''}" for k in workers)
          + " | one generator, same values | ns per value (1 thread) |")
    print("|---|---:|---:|---:|" + "---:|" * len(workers) + "---:|---:|")
    for text in shapes:
        shape = tuple(int(n) for n in text.split(","))
        values = images * int(np.prod(shape))
        seed = median_ms(lambda: noise.stream_generators(0, 0, images), runs)
        default = draw_ms(images, shape, None, runs)
        by_count = [draw_ms(images, shape, k, runs) for k in workers]
        gen, out = np.random.default_rng(0), np.empty(values)
        flat = median_ms(lambda: gen.standard_normal(out=out), runs)
        one = draw_ms(images, shape, 1, runs) if 1 not in workers else by_count[workers.index(1)]
        print(f"| {text} | {values} | {seed:.2f} | {default:.2f} ({default_threads(images, values)}) | "
              + " | ".join(f"{ms:.2f}" for ms in by_count) + f" | {flat:.2f} | {1e6 * one / values:.1f} |")


if __name__ == "__main__":
    main()
