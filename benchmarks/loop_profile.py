"""The GPU side of a device-loop step, on the onnx-cuda fp16 default graph with CUDA graphs: a CUPTI kernel trace
(through torch.profiler) of `--reps` step runs of the loop's own session against as many runs of the denoiser alone,
giving kernels per run, GPU busy time per run, the GPU's idle time between runs, and the kernels the sampler update
adds (by name), for the matrix update and the column update (DeviceLoop's fused_update on and off). Then two
host-side questions: does a thread drawing the next batch's noise slow the loop down (a loop alone against a loop
with such a thread), and how the per-image noise draw scales with threads. Needs
onnxruntime-gpu and torch with CUDA; prints a report and, with --out, writes it as JSON.

    python benchmarks/loop_profile.py --model digits --model image-cifar10
"""

from __future__ import annotations

import collections
import contextlib
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
from sampling import bound_run, preset_package

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate
from diffit_port.samplers import NoiseSource, noise as noise_mod

SAMPLERS = {"digits": "dpmpp-2m"}     # the others: the package's own (heun for the EDM presets)
GRAPH = dict(precision="fp16", fusions="unet", qkv="separate", cuda_graph=True)


def kernel_kind(name: str) -> str:
    """A kernel's name, with the names CUPTI gives one memset or device copy in different captured graphs made one:
    "Memset (Device)" in one graph is "Memset (Unknown)" or "memset32" in another, a device-to-device copy
    "memcpy128" (H100, onnxruntime 1.31.1, round 12: counted apart, the denoiser's own memsets looked like the
    update's)."""
    low = name.lower()
    if low.startswith("memset"):
        return "Memset"
    if low.startswith("memcpy128") or low.startswith("memcpy dtod"):
        return "Memcpy DtoD"
    return name


def kernel_runs(run: Callable[[], object], reps: int) -> list[list[tuple[str, float, float]]]:
    """`reps` runs of `run` under CUPTI: per run its kernels (kernel_kind, start us, end us) in start order. Runs
    are told apart by the reps - 1 longest idle times between kernels (each run waits for the GPU at its end)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    ks = sorted((kernel_kind(e.name), e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    ks.sort(key=lambda k: k[1])
    gaps = [b[1] - a[2] for a, b in zip(ks, ks[1:])]
    cuts = sorted(sorted(range(len(gaps)), key=lambda i: -gaps[i])[:reps - 1])
    bounds = [0, *[c + 1 for c in cuts], len(ks)]
    return [ks[a:b] for a, b in zip(bounds, bounds[1:])]


def run_stats(runs: list[list[tuple[str, float, float]]]) -> dict[str, Any]:
    busy = [sum(e - s for _, s, e in r) for r in runs]
    span = [r[-1][2] - r[0][1] for r in runs]
    gaps = [b[0][1] - a[-1][2] for a, b in zip(runs, runs[1:])]
    return {"kernels": statistics.median(len(r) for r in runs), "busy_us": statistics.median(busy),
            "span_us": statistics.median(span),
            "gap_between_runs_us": statistics.median(gaps) if gaps else None}


def update_kernels(step: list[tuple[str, float, float]], alone: list[tuple[str, float, float]]) -> list[dict[str, Any]]:
    """The kernels of a step run beyond those of a denoiser run (by name), with their time in the step run and the
    kernel that most often comes next (where in the step they run: after the denoiser's last kernel, or inside it)."""
    extra = collections.Counter(n for n, _, _ in step) - collections.Counter(n for n, _, _ in alone)
    left = dict(extra)
    rows: dict[str, list[Any]] = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
    for i in range(len(step) - 1, -1, -1):    # the update runs after the denoiser: count from the end
        n, s, e = step[i]
        if left.get(n, 0) > 0:
            left[n] -= 1
            rows[n][0] += 1
            rows[n][1] += e - s
            rows[n][2][step[i + 1][0][:60] if i + 1 < len(step) else "(end of the run)"] += 1
    return sorted(({"kernel": n[:100], "count": c, "us": round(us, 2), "next": nxt.most_common(1)[0]}
                   for n, (c, us, nxt) in rows.items()), key=lambda r: -r["us"])


def missing_kernels(step: list[tuple[str, float, float]], alone: list[tuple[str, float, float]]) -> dict[str, int]:
    """The kernels (by name) a denoiser run launches more often than a step run: where the denoiser inside the
    step graph runs otherwise than alone."""
    fewer = collections.Counter(n for n, _, _ in alone) - collections.Counter(n for n, _, _ in step)
    return {n[:100]: c for n, c in fewer.most_common()}


def loop_with_thread(d: Any, package: Any, cfg: SamplingConfig, labels: np.ndarray, chw: tuple[int, ...],
                     runs: int) -> dict[str, Any]:
    """Loops alone against loops while a thread draws a batch's noise over and over (what a prefetch of the next
    batch would do at most), interleaved."""
    alone, busy, draws = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        generate([d], package, cfg, labels)
        alone.append(time.perf_counter() - t0)
        stop, n = threading.Event(), [0]

        def draw() -> None:
            while not stop.is_set():
                NoiseSource(1, chw[0]).standard_normal(chw)
                n[0] += 1

        th = threading.Thread(target=draw)
        th.start()
        t0 = time.perf_counter()
        generate([d], package, cfg, labels)
        busy.append(time.perf_counter() - t0)
        stop.set()
        th.join()
        draws.append(n[0])
    return {"loop_ms": 1000 * statistics.median(alone), "loop_with_draw_thread_ms": 1000 * statistics.median(busy),
            "draws_during_loop": statistics.median(draws)}


def noise_threads(chw: tuple[int, ...], reps: int = 30) -> dict[str, float]:
    """Milliseconds of one NoiseSource(0, n).standard_normal draw by worker count (the pool remade each time)."""
    out = {}
    saved = noise_mod.WORKERS, noise_mod.PARALLEL_VALUES, noise_mod._pool
    try:
        for workers in (1, 2, 4, 8, 16):
            noise_mod.WORKERS, noise_mod.PARALLEL_VALUES, noise_mod._pool = workers, 1, None
            times = []
            for _ in range(reps):
                src = NoiseSource(0, chw[0])
                t0 = time.perf_counter()
                src.standard_normal(chw)
                times.append(time.perf_counter() - t0)
            out[str(workers)] = round(1000 * statistics.median(times), 3)
    finally:
        noise_mod.WORKERS, noise_mod.PARALLEL_VALUES, noise_mod._pool = saved
    return out


def step_profile(d: Any, package: Any, cfg: SamplingConfig, labels: np.ndarray, fused: bool, reps: int,
                 alone: list[list[tuple[str, float, float]]]) -> dict[str, Any]:
    """The loop step's kernels with the matrix update (`fused`) or the column update, against the denoiser alone."""
    d.device_loop.fused_update = fused
    generate([d], package, cfg, labels)                                  # capture
    step = kernel_runs(d.device_loop.last_call(), reps)
    return {"matrix": d.device_loop._last[0].matrix(), "step": run_stats(step),
            "update_kernels": update_kernels(step[len(step) // 2], alone[len(alone) // 2]),
            "missing_kernels": missing_kernels(step[len(step) // 2], alone[len(alone) // 2])}


def guarded(f: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """f(*args), or {"error": ...} when it fails (the rest of the probe still runs)."""
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001 - a failed profile loses its own entry only
        return {"error": f"{type(e).__name__}: {e}"}


def probe(name: str, steps: int, images: int, reps: int, runs: int) -> dict[str, Any]:
    ctx = contextlib.nullcontext(default_package_path()) if name == "digits" else preset_package(name)
    with ctx as pkg_dir:
        package = load_package(pkg_dir)
        cfg = SamplingConfig.from_package(package, sampler=SAMPLERS.get(name), steps=steps, num_images=images,
                                          batch_size=images, device_loop=True)
        labels = default_labels(package, images)
        m = package.model
        rows = images * (2 if cfg.guidance != 1 else 1)
        d = create_denoiser("onnx-cuda", package, **GRAPH)
        binding, opts, _keep = bound_run(d, (rows, m.in_channels, m.image_size, m.image_size), 1000 + rows)
        for _ in range(3):
            d.session.run_with_iobinding(binding, opts)
        alone = kernel_runs(lambda: d.session.run_with_iobinding(binding, opts), reps)
        chw = (images, m.in_channels, m.image_size, m.image_size)
        out = {"model": name, "sampler": cfg.sampler, "steps": cfg.steps, "rows": rows,
               "denoiser_alone": run_stats(alone),
               "updates": {k: guarded(step_profile, d, package, cfg, labels, k == "matrix", reps, alone)
                           for k in ("matrix", "columns")},
               "prefetch": loop_with_thread(d, package, cfg, labels, chw, runs), "noise_threads_ms": noise_threads(chw)}
        d.close()
        return out


def report(r: dict[str, Any]) -> str:
    a = r["denoiser_alone"]
    lines = [f"{r['model']}: {r['sampler']}, {r['rows']} rows a call",
             f"  denoiser alone: {a['kernels']} kernels, busy {a['busy_us']:.1f} us, span {a['span_us']:.1f} us, "
             f"gap between runs {a['gap_between_runs_us']:.1f} us"]
    for name, u in r["updates"].items():
        if "error" in u:
            lines.append(f"  {name} update: failed ({u['error'][:200]})")
            continue
        s = u["step"]
        lines += [f"  {name} update (matrix: {u['matrix']}): step {s['kernels']} kernels, busy {s['busy_us']:.1f} us, "
                  f"span {s['span_us']:.1f} us, gap between runs {s['gap_between_runs_us']:.1f} us; update "
                  f"{sum(k['count'] for k in u['update_kernels'])} kernels, "
                  f"{sum(k['us'] for k in u['update_kernels']):.1f} us busy; the step's busy time beyond the "
                  f"denoiser's {s['busy_us'] - a['busy_us']:.1f} us"]
        lines += [f"    {k['count']:3d} x {k['us']:8.2f} us  {k['kernel']}  (then {k['next'][1]} x {k['next'][0]})"
                  for k in u["update_kernels"]]
        lines += [f"    alone has {c} more x {n}" for n, c in u["missing_kernels"].items()]
    p = r["prefetch"]
    lines.append(f"  loop {p['loop_ms']:.2f} ms alone, {p['loop_with_draw_thread_ms']:.2f} ms with a noise thread "
                 f"({p['draws_during_loop']} draws during it)")
    lines.append(f"  noise draw by threads, ms: {r['noise_threads_ms']}")
    return "\n".join(lines)


@click.command()
@click.option("--model", "models", multiple=True, default=("digits",), show_default=True,
              help="digits (the embedded package) or a preset (exported fresh); repeatable.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="One batch.")
@click.option("--reps", type=click.IntRange(min=2), default=20, show_default=True, help="Traced runs.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Loops per prefetch case.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here.")
def main(models: tuple[str, ...], steps: int, images: int, reps: int, runs: int, out: Path | None) -> None:
    results = []
    for name in models:
        results.append(probe(name, steps, images, reps, runs))
        click.echo(report(results[-1]))
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
