"""Where a device loop's time outside the denoiser goes, on the onnx-cuda fp16 default graph (unet fusions, separate
q/k/v): runs of `--batches` batches on several ways of running the calls, interleaved in one process, each against
the denoiser alone (its CUDA graph on bound buffers, the fastest a call runs): measured once before the loops, and
again as a burst of as many calls just before each loop (the paired figure, which a drift of the GPU's speed during
the run cannot move by itself), also batch by batch; then the host-side pieces alone (the code read, the download,
the per-image noise streams). Figures are per batch (one loop of `--steps`). Needs
onnxruntime-gpu; prints a short report and, with --out, writes it as JSON.

    python benchmarks/device_loop_host.py                        # digits, DPM-Solver++ 50 steps, 256 images
    python benchmarks/device_loop_host.py --model image-cifar10  # a preset (exported fresh): Heun, 50 steps
    python benchmarks/device_loop_host.py --batches 4 --way graph --way ahead --way columns

The ways (`--way`, repeatable; all by default):
- default: each call one captured CUDA graph, DeviceLoop's defaults there (the column update, the next batch
  prepared ahead);
- graph: each call one captured CUDA graph, the update as one matrix product where it is affine (DeviceLoop's
  fused_update on, its default on the CPU EP), one batch after the other;
- ahead: graph, each next batch's host inputs drawn and uploaded by a worker thread while a batch runs;
- columns: graph with the update term by term (fused_update off, CUDA's default), one batch after the other;
- chain: graph with 5 calls chained in each session run (DeviceLoop's calls_per_run);
- async: no CUDA graph, the runs queued without waiting for the GPU (DeviceLoop's async_runs);
- sync: no CUDA graph, each run waiting for the GPU (what async is measured against);
- seeded: default, with every image's noise stream seeded when the run's NoiseSource is made (on the loop's
  thread, before the first batch) instead of where each batch is first drawn;
- switch: default, with Python's thread switch interval at SWITCH_INTERVAL during the loop (whether the loop's
  thread waits for the GIL behind the worker that prepares the next batch).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import click
import numpy as np
from sampling import bound_call_seconds, bound_run, median_ms, preset_package

from diffit_port import samplers
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate
from diffit_port.samplers import NoiseSource, num_denoiser_calls

# way -> (create_denoiser options, DeviceLoop attributes); each way but `default` sets the form it times
MATRIX = dict(fused_update=True, ahead=False)
WAYS = {"default": (dict(cuda_graph=True), {}), "graph": (dict(cuda_graph=True), MATRIX),
        "ahead": (dict(cuda_graph=True), dict(MATRIX, ahead=True)),
        "columns": (dict(cuda_graph=True), dict(fused_update=False, ahead=False)),
        "chain": (dict(cuda_graph=True), dict(MATRIX, calls_per_run=5)),
        "async": (dict(async_loop=True), MATRIX), "sync": ({}, MATRIX), "switch": (dict(cuda_graph=True), {}),
        "seeded": (dict(cuda_graph=True), {})}
SWITCH_INTERVAL = 1e-4   # the `switch` way's sys.setswitchinterval during its loops (Python's default: 5e-3 s)
SAMPLERS = {"digits": "dpmpp-2m"}     # the others: the package's own (heun for the EDM presets)


class SeededUpFront(NoiseSource):
    """The `seeded` way's source: every stream seeded when the source is made."""

    def __init__(self, seed: int, num_images: int, first: int = 0):
        super().__init__(seed, num_images, first)
        self._streams.get(0, num_images)


def burst_seconds(run: Callable[[], object], n: int) -> float:
    """Mean seconds of a call over `n` runs of `run` back to back (a loop's worth of denoiser calls)."""
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    return (time.perf_counter() - t0) / n


def time_ways(dens: dict[str, Any], package: Any, cfg: SamplingConfig, labels: np.ndarray, runs: int,
              first: dict[str, np.ndarray], alone: Callable[[], object], calls: int) -> dict[str, list[dict[str, Any]]]:
    """Per way, one record per loop: its wall seconds, DeviceLoop.timings, the end time of each call (relative to
    the loop's start) and `ref`, the mean seconds of the denoiser alone over a burst of as many calls as the loop
    made, run just before it (so that a drift of the GPU's speed during the run moves both); `runs` loops per
    way, interleaved, each checked against the warm-up samples (`first`: the graph way's, where it runs)."""
    timed: dict[str, list[dict[str, Any]]] = {w: [] for w in dens}
    for _ in range(runs):
        for w, d in dens.items():
            ref = burst_seconds(alone, calls * cfg.num_images // cfg.batch_size)
            stamps: list[float] = []
            interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL if w == "switch" else interval)
            seeding = mock.patch.object(samplers, "NoiseSource", SeededUpFront) if w == "seeded" else \
                contextlib.nullcontext()
            with seeding:
                t0 = time.perf_counter()
                x = generate([d], package, cfg, labels, on_call=lambda: stamps.append(time.perf_counter()))
                wall = time.perf_counter() - t0
            sys.setswitchinterval(interval)
            timed[w].append({"wall": wall, "timings": dict(d.device_loop.timings), "ref": ref,
                             "ends": [s - t0 for s in stamps]})
            # fp16 unet graphs vary from run to run by ~1e-2 at most (onnxruntime's GroupNorm atomics)
            assert np.abs(x - first.get("graph", first[w])).max() < 5e-2
    return timed


def way_row(d: Any, loops: list[dict[str, Any]], calls: int, call_s: float, burst_s: float,
            batches: int) -> dict[str, Any]:
    """A way's figures per batch: against the denoiser's median alone and its burst measured once (as before), and
    against the burst paired with each loop (median and range over the loops), also batch by batch."""
    wall = statistics.median(r["wall"] for r in loops) / batches
    paired = [100 * (r["wall"] - batches * calls * r["ref"]) / r["wall"] for r in loops]
    by_batch = []
    for b in range(batches):
        spans = [(r["ends"][(b + 1) * calls - 1] - (r["ends"][b * calls - 1] if b else 0.0), r["ref"]) for r in loops]
        by_batch.append(round(1000 * statistics.median(s - calls * ref for s, ref in spans), 2))
    ends = [np.diff(r["ends"]) for r in loops]                  # entry k: call k + 1
    gaps = [list(np.concatenate([e[1::2] for e in ends])), list(np.concatenate([e[0::2] for e in ends]))]
    return {"loop_ms": 1000 * wall, "outside_ms": 1000 * (wall - calls * call_s),
            "outside_pct": 100 * (wall - calls * call_s) / wall,
            "outside_vs_burst_pct": 100 * (wall - calls * burst_s) / wall,
            "outside_paired_pct": {"median": round(statistics.median(paired), 3), "min": round(min(paired), 3),
                                   "max": round(max(paired), 3)},
            "outside_by_batch_ms": by_batch,
            "ref_ms": [round(1000 * r["ref"], 3) for r in loops],
            "step_ms": 1000 * d.device_loop.step_seconds(20),
            "call_gap_ms": {"even": round(1000 * float(np.median(gaps[0])), 3),
                            "odd": round(1000 * float(np.median(gaps[1])), 3),
                            "mean": round(1000 * float(np.mean(gaps[0] + gaps[1])), 3)},
            "last_batch_ms": {k.removesuffix("_s"): round(1000 * statistics.median(r["timings"][k] for r in loops), 3)
                              for k in loops[0]["timings"]}}


def open_way(way: str, package: Any, base: dict[str, Any]) -> Any:
    opts, attrs = WAYS[way]
    d = create_denoiser("onnx-cuda", package, **base, **opts)
    for k, v in attrs.items():
        setattr(d.device_loop, k, v)
    return d


def probe(name: str, steps: int, images: int, runs: int, ways: tuple[str, ...], batches: int = 1) -> dict[str, Any]:
    ctx = contextlib.nullcontext(default_package_path()) if name == "digits" else preset_package(name)
    with ctx as pkg_dir:
        package = load_package(pkg_dir)
        cfg = SamplingConfig.from_package(package, sampler=SAMPLERS.get(name), steps=steps,
                                          num_images=images * batches, batch_size=images, device_loop=True)
        labels = default_labels(package, images * batches)
        m = package.model
        shape = (images * (2 if cfg.guidance != 1 else 1), m.in_channels, m.image_size, m.image_size)
        calls = num_denoiser_calls(cfg.sampler, cfg.steps)
        base = dict(precision="fp16", fusions="unet", qkv="separate")
        dens = {w: open_way(w, package, base) for w in ways}
        first = {w: generate([d], package, cfg, labels) for w, d in dens.items()}   # warm-up, CUDA graph capture
        graph = dens.get("graph") or open_way("graph", package, base)
        call_s = bound_call_seconds(graph, shape, reps=20)
        burst_s = bound_call_seconds(graph, shape, reps=calls)
        binding, opts, _values = bound_run(graph, shape, 2000 + shape[0])   # a CUDA graph of its own
        alone = lambda: graph.session.run_with_iobinding(binding, opts)  # noqa: E731
        burst_seconds(alone, 3)                                             # its plain run and capture
        timed = time_ways(dens, package, cfg, labels, runs, first, alone, calls)
        out: dict[str, Any] = {"model": name, "sampler": cfg.sampler, "steps": steps, "calls": calls, "images": images,
                               "batches": batches, "denoiser_alone_ms": 1000 * call_s,
                               "burst_ms_per_call": 1000 * burst_s,
                               "ways": {w: way_row(dens[w], timed[w], calls, call_s, burst_s, batches) for w in dens}}
        _, buf, runs_done = dens[ways[0]].device_loop._last
        x_side, code = buf.sides[len(runs_done) % 2]["loop/x"], buf.sides[0]["loop/bad"]
        chw = (images, m.in_channels, m.image_size, m.image_size)
        out["alone_ms"] = {"code_read": median_ms(lambda: code.numpy()), "download": median_ms(x_side.numpy),
                           "noise_source": median_ms(lambda: NoiseSource(0, images)),
                           "noise_source_and_draw": median_ms(lambda: NoiseSource(0, images).standard_normal(chw))}
        for d in {id(d): d for d in [*dens.values(), graph]}.values():
            d.close()
        return out


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}: {r['sampler']} {r['steps']} steps = {r['calls']} calls, {r.get('batches', 1)} x "
             f"{r['images']} images (figures per batch); denoiser "
             f"alone {r['denoiser_alone_ms']:.3f} ms (median of 20), {r['burst_ms_per_call']:.3f} ms in a burst of "
             f"{r['calls']}"]
    for w, v in r["ways"].items():
        lines.append(f"  {w:7s}: loop {v['loop_ms']:.2f} ms, outside {v['outside_ms']:.2f} ms "
                     f"({v['outside_pct']:.2f}%; {v['outside_vs_burst_pct']:.2f}% against the burst), "
                     f"step {v['step_ms']:.3f} ms; against the burst before each loop "
                     f"{v['outside_paired_pct']}% (batch by batch {v['outside_by_batch_ms']} ms), call to call "
                     f"{v['call_gap_ms']}; "
                     f"last batch {v['last_batch_ms']}")
    lines.append("  alone, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in r["alone_ms"].items()))
    return "\n".join(lines)


@click.command()
@click.option("--model", "models", multiple=True, default=("digits",), show_default=True,
              help="digits (the embedded package) or a preset (exported fresh); repeatable.")
@click.option("--way", "ways", multiple=True, type=click.Choice(list(WAYS)), help="Ways of running the calls.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch.")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per run: with more than one the next batch is prepared while one runs.")
@click.option("--runs", type=click.IntRange(min=1), default=4, show_default=True, help="Runs per way.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here.")
def main(models: tuple[str, ...], ways: tuple[str, ...], steps: int, images: int, batches: int, runs: int,
         out: Path | None) -> None:
    results = []
    for name in models:
        results.append(probe(name, steps, images, runs, ways or tuple(WAYS), batches))
        click.echo(report(results[-1]))
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
