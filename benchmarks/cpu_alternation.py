"""CPU denoiser calls of several runtime settings interleaved call by call, so that a machine whose speed drifts
during the run moves them all alike (benchmarks/sampling.py runs one variant after the other). Each round calls
every setting once on the same input, in a rotated order; the report is each setting's median and fastest call and
its speed against torch eager fp32 in the same rounds.

    python benchmarks/cpu_alternation.py --batch-size 8 --rounds 15
    python benchmarks/cpu_alternation.py --batch-size 16 --setting "openvino:channel_norms=0" --setting onnx-cpu
    python benchmarks/cpu_alternation.py --setting openvino --setting "openvino:config.PERFORMANCE_HINT=LATENCY"
    python benchmarks/cpu_alternation.py --preset latent-s2-256 --batch-size 2 --setting onnx-cpu --setting openvino
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import click
import numpy as np

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser

DEFAULT_SETTINGS = ("torch", "openvino", "openvino:channel_norms=0")


def parse(setting: str) -> tuple[str, dict[str, Any]]:
    """"runtime:key=value,key=value" (values 0/1 as booleans, digits as ints, else strings; a key "config.NAME"
    goes into the `config` dict of openvino's options) -> (runtime, options)."""
    runtime, _, rest = setting.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, text = item.partition("=")
        value = {"0": False, "1": True}.get(text, int(text) if text.isdigit() else text)
        if key.startswith("config."):
            opts.setdefault("config", {})[key.removeprefix("config.")] = value
        else:
            opts[key] = value
    return runtime, opts


@click.command()
@click.option("--package", "package_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Package directory (default: the embedded package).")
@click.option("--preset", default=None, help="Instead of a package: a freshly initialised preset, exported to a "
              "temporary directory first (as benchmarks/sampling.py --preset).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Images a call; with guidance (the package's) the denoiser sees twice as many rows.")
@click.option("--rounds", default=15, show_default=True, type=click.IntRange(1))
@click.option("--setting", "settings", multiple=True,
              help=f"runtime[:option=value,...], repeatable (default: {', '.join(DEFAULT_SETTINGS)}); torch always "
                   "runs, as the reference.")
def main(package_dir: str | None, preset: str | None, batch_size: int, rounds: int, settings: tuple[str, ...]) -> None:
    if preset is None:
        return compare(load_package(package_dir or default_package_path()), batch_size, rounds, settings)
    from sampling import preset_package

    with preset_package(preset) as path:
        compare(load_package(path), batch_size, rounds, settings)


def compare(package: Any, batch_size: int, rounds: int, settings: tuple[str, ...]) -> None:
    """Open every setting on `package`, call them interleaved `rounds` times (after two untimed rounds) and print
    the table."""
    labels = ["torch"] + [s for s in (settings or DEFAULT_SETTINGS) if s != "torch"]
    denoisers = {s: create_denoiser(rt, package, **opts) for s in labels for rt, opts in [parse(s)]}
    m, rows = package.model, 2 * batch_size if package.sampling.get("guidance", 1.0) != 1.0 else batch_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, m.in_channels, m.image_size, m.image_size), dtype=np.float32)
    t, y = np.full(rows, 2.5, np.float32), np.arange(rows) % max(m.num_classes, 1)
    ref = np.asarray(denoisers["torch"](x, t, y))
    times: dict[str, list[float]] = {s: [] for s in labels}
    for r in range(rounds + 2):                          # two untimed rounds first
        for s in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            out = denoisers[s](x, t, y)
            if r >= 2:
                times[s].append(time.perf_counter() - t0)
            elif r == 0 and s != "torch":
                click.echo(f"{s}: max abs against torch {np.abs(np.asarray(out) - ref).max():.1e}")
    base = statistics.median(times["torch"])
    click.echo(f"\n{rows} rows a call, {rounds} rounds\n| setting | median ms | fastest ms | x torch (medians) |")
    click.echo("|---|---:|---:|---:|")
    for s in labels:
        med = statistics.median(times[s])
        click.echo(f"| {s} | {1000 * med:.1f} | {1000 * min(times[s]):.1f} | {base / med:.2f} |")


if __name__ == "__main__":
    main()
