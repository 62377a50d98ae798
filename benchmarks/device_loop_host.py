"""Where a device loop's time outside the denoiser goes, on the onnx-cuda fp16 default graph of the shipped digits
package: the loop with the non-finite code read after every call against the default cadence
(device_loop.CHECK_SECONDS), interleaved in one process, then the host-side pieces alone (the code read, the
download, the per-image noise streams). Needs onnxruntime-gpu; prints a short report.

    python benchmarks/device_loop_host.py                 # digits, DPM-Solver++ 50 steps, 256 images (512 per call)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import click
import numpy as np
from sampling import bound_call_seconds

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes import device_loop
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate
from diffit_port.samplers import NoiseSource


def median_ms(f: Callable[[], object], reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@click.command()
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="One batch.")
@click.option("--runs", type=click.IntRange(min=1), default=4, show_default=True, help="Loops per cadence.")
def main(steps: int, images: int, runs: int) -> None:
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cuda", package, precision="fp16", cuda_graph=True, fusions="unet", qkv="separate")
    cfg = SamplingConfig.from_package(package, sampler="dpmpp-2m", steps=steps, num_images=images, batch_size=images,
                                      device_loop=True)
    labels = default_labels(package, images)
    first = generate([d], package, cfg, labels)              # warm-up: the CUDA graphs are captured here
    m = package.model
    call_s = bound_call_seconds(d, (2 * images, m.in_channels, m.image_size, m.image_size), reps=20)
    step_s = d.device_loop.step_seconds(20)
    calls = steps     # DPM-Solver++(2M): one call per step
    click.echo(f"denoiser alone {1000 * call_s:.3f} ms, loop step {1000 * step_s:.3f} ms, "
               f"update {1000 * (step_s - call_s):.3f} ms per call")
    results: dict[float, list[tuple[float, dict[str, float]]]] = {}
    default = device_loop.CHECK_SECONDS
    try:
        for _ in range(runs):
            for every in (0.0, default):
                device_loop.CHECK_SECONDS = every
                t0 = time.perf_counter()
                x = generate([d], package, cfg, labels)
                wall = time.perf_counter() - t0
                # the fp16 unet graph varies from run to run at ~5e-3 (onnxruntime's GroupNorm atomics)
                assert np.abs(x - first).max() < 2e-2
                results.setdefault(every, []).append((wall, dict(d.device_loop.timings)))
    finally:
        device_loop.CHECK_SECONDS = default
    for every, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        parts = {k.removesuffix("_s"): round(1000 * statistics.median(r[1][k] for r in rows), 3) for k in rows[0][1]}
        outside = wall - calls * call_s
        click.echo(f"code read {'every call' if every == 0 else f'every {every} s'}: loop {1000 * wall:.2f} ms, "
                   f"outside {1000 * outside:.2f} ms ({100 * outside / wall:.2f}%), of which the update "
                   f"{1000 * calls * (step_s - call_s):.2f} ms; last batch, ms: {parts}")
    _, buf, n = d.device_loop._last
    x_side, code = buf.sides[n % 2]["loop/x"], buf.sides[0]["loop/bad"]
    shape = (images, m.in_channels, m.image_size, m.image_size)
    click.echo(f"alone: code read {median_ms(lambda: code.numpy()):.4f} ms, download {median_ms(x_side.numpy):.3f} ms "
               f"(+ float32 {median_ms(lambda: x_side.numpy().astype(np.float32)):.3f}), "
               f"NoiseSource({images}) {median_ms(lambda: NoiseSource(0, images)):.3f} ms, with the first draw "
               f"{median_ms(lambda: NoiseSource(0, images).standard_normal(shape)):.3f} ms")
    d.close()


if __name__ == "__main__":
    main()
