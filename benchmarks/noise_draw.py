"""What the seeding contract's noise costs on the host: NoiseSource's seeding, its per-image draw on one thread and
on its thread pool, against one generator drawing the same number of values at once (what the draw would cost
without per-image streams). Medians of --runs; run on a quiet machine.

    python benchmarks/noise_draw.py --images 256 --shape 1,28,28 --shape 3,32,32
"""

from __future__ import annotations

import click
import numpy as np

from diffit_port.samplers import noise
from sampling import median_ms


def draw_ms(images: int, shape: tuple[int, ...], workers: int, runs: int) -> float:
    """NoiseSource(0, images).standard_normal on `workers` threads (seeding excluded)."""
    saved, noise.WORKERS = noise.WORKERS, workers
    try:
        return median_ms(lambda: noise.NoiseSource(0, images).standard_normal((images, *shape)), runs) \
            - median_ms(lambda: noise.NoiseSource(0, images), runs)
    finally:
        noise.WORKERS = saved


@click.command()
@click.option("--images", type=click.IntRange(1), default=256, show_default=True)
@click.option("--shape", "shapes", multiple=True, default=("1,28,28", "3,32,32"), show_default=True,
              help="One image's C,H,W (digits 1,28,28; image-cifar10 3,32,32); repeatable.")
@click.option("--runs", type=click.IntRange(1), default=30, show_default=True)
def main(images: int, shapes: tuple[str, ...], runs: int) -> None:
    print(f"| C,H,W | values | seeding ms | draw, 1 thread | draw, {noise.WORKERS} threads | one generator, "
          "same values | ns per value (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for text in shapes:
        shape = tuple(int(n) for n in text.split(","))
        values = images * int(np.prod(shape))
        seed = median_ms(lambda: noise.NoiseSource(0, images), runs)
        one, many = draw_ms(images, shape, 1, runs), draw_ms(images, shape, noise.WORKERS, runs)
        gen, out = np.random.default_rng(0), np.empty(values)
        flat = median_ms(lambda: gen.standard_normal(out=out), runs)
        print(f"| {text} | {values} | {seed:.2f} | {one:.2f} | {many:.2f} | {flat:.2f} | {1e6 * one / values:.1f} |")


if __name__ == "__main__":
    main()
