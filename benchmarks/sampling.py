"""Side-by-side sampling throughput of every available runtime and variant on one package, in one run.

Per variant: open a session, run the sampling loop of one batch as warm-up, then `--runs` timed loops (median).
Reported: ms per denoiser call measured inside the call (host loop: the call as the sampler sees it, copies
included; device loop: the denoiser graph alone on bound device buffers), the loop's time outside the calls
(absolute and %), images/s, the model's TFLOP/s inside the call and its % of a matmul peak measured in the
same process (bf16 on CUDA, fp32 on the CPU), and max|diff| of the samples against the first variant.
Prints a markdown table last and, with --out, writes it and a JSON of every figure next to it.

    python benchmarks/sampling.py --batch-size 16 --steps 10 --only onnx-cpu --only openvino --only torch
    python benchmarks/sampling.py --preset image-cifar10 --batch-size 128 --steps 10 --only onnx-cuda
    python benchmarks/sampling.py --package PKG --match "fp16" --out docs/bench/xl.md
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
import perf_counts
from variants import Variant, variants

from diffit_port import samplers
from diffit_port.package import Package, default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate


class Timed:
    """A denoiser whose calls are timed (the sampler-side view: feeds, copies and the run)."""

    def __init__(self, denoiser: Any):
        self.denoiser, self.seconds, self.calls = denoiser, 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.denoiser, name)

    def __call__(self, x, t, y, guidance=None):
        t0 = time.perf_counter()
        out = self.denoiser(x, t, y) if guidance is None else self.denoiser(x, t, y, guidance=guidance)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def denoiser_feeds(input_names: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Inputs of one denoiser call at `shape`: x ~ N(0, 1), a mid-range time input (t = 500 for an eps graph,
    sigma = 1 for an EDM graph, whichever the graph takes), labels 0."""
    b = shape[0]
    time_input, value = ("sigma", 1.0) if "sigma" in input_names else ("t", 500.0)
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32),
            time_input: np.full(b, value, np.float32), "y": np.zeros(b, np.int64)}


def bound_run(d: Any, shape: tuple[int, ...], graph_id: int | None = None) -> tuple[Any, Any, list[Any]]:
    """(IOBinding, RunOptions, the bound OrtValues to keep alive) of one run of an onnxruntime denoiser's own
    session at `shape`, on buffers of its own on the session's device; `graph_id`: its captured CUDA graph."""
    import onnxruntime as ort

    device = "cpu" if d.device == "cpu" else "cuda"
    feeds = denoiser_feeds([i.name for i in d.session.get_inputs()], shape)
    binding = d.session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, device, d.device_id) for k, v in feeds.items()}
    for k, v in values.items():
        binding.bind_ortvalue_input(k, v)
    out = ort.OrtValue.ortvalue_from_shape_and_type((shape[0], d.out_channels, *shape[2:]), np.float32, device,
                                                    d.device_id)
    binding.bind_ortvalue_output(d.session.get_outputs()[0].name, out)
    opts = ort.RunOptions()
    if graph_id is not None:
        opts.add_run_config_entry("gpu_graph_id", str(graph_id))
    return binding, opts, [*values.values(), out]


def bound_call_seconds(d: Any, shape: tuple[int, ...], reps: int = 10) -> float:
    """Median seconds of one run of an onnxruntime denoiser's own session on inputs and output already in
    device buffers (what a device-loop step spends in the denoiser graph)."""
    graph_id = 1000 + shape[0] if getattr(d, "cuda_graph", False) else None
    binding, opts, _values = bound_run(d, shape, graph_id)
    for _ in range(3):
        d.session.run_with_iobinding(binding, opts)
    return median_ms(lambda: d.session.run_with_iobinding(binding, opts), reps) / 1000


def median_ms(f: Callable[[], object], reps: int = 20) -> float:
    """Median milliseconds of `reps` calls of f."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@dataclass
class Row:
    runtime: str
    label: str
    precision: str = ""
    device: str = ""
    loop: str = "host"
    load_s: float = 0.0
    loop_s: float = 0.0                 # median wall time of one sampling loop of one batch
    call_ms: float = 0.0                # inside one denoiser call
    outside_s: float = 0.0              # loop time not spent inside the calls
    images_per_s: float = 0.0
    tflops: float | None = None         # model FLOPs per call / call time
    peak_pct: float | None = None
    max_abs: float = 0.0
    rel_l2: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def time_loop(d: Timed, package: Package, cfg: SamplingConfig, labels: np.ndarray, *, runs: int,
              warmup: int) -> tuple[float, float, np.ndarray, float]:
    """(median loop seconds, median seconds inside the calls, the last samples, max|last - first| of the
    samples: how far the same loop on the same session varies from run to run) of `runs` timed loops."""
    for _ in range(warmup):
        generate([d], package, cfg, labels)
    loops, inside, first = [], [], None
    for _ in range(runs):
        d.seconds, d.calls = 0.0, 0
        t0 = time.perf_counter()
        x0 = generate([d], package, cfg, labels)
        loops.append(time.perf_counter() - t0)
        inside.append(d.seconds)
        first = x0 if first is None else first
    return statistics.median(loops), statistics.median(inside), x0, float(np.abs(x0 - first).max())


def device_loop_split(d: Any, calls: int, call_s: float, loop_s: float) -> dict[str, Any]:
    """Where a device loop's time outside the denoiser goes: the update graph appended to each call (one step
    of the loop session minus the denoiser alone) and the host (Python, uploads, checks, the download), with
    the last batch's own timings (DeviceLoop.timings)."""
    step_s = d.device_loop.step_seconds()
    return {"step_ms": 1000 * step_s, "update_ms_per_call": 1000 * (step_s - call_s),
            "host_ms": 1000 * (loop_s - calls * step_s),
            "last_batch": {k.removesuffix("_s"): round(1000 * v, 3) for k, v in d.device_loop.timings.items()}}


def run_variant(v: Variant, package: Package, cfg: SamplingConfig, labels: np.ndarray, *, runs: int, warmup: int,
                threads: int | None, flops_per_call: float | None, peak: dict[str, float],
                cache: dict[Any, Any]) -> list[tuple[Row, Any]]:
    """One row per loop kind of `v` (all on one session), each with the samples of its last timed loop
    (None when it failed)."""
    opts = dict(v.opts)
    if threads and v.runtime in ("onnx-cpu", "openvino", "torch"):
        opts.setdefault("threads", threads)       # a variant that sets its own thread count keeps it
    if v.runtime == "onnx-cuda":
        opts["prepared_cache"] = cache
    t0 = time.perf_counter()
    try:
        d = Timed(create_denoiser(v.runtime, package, device=v.device, **opts))
    except Exception as e:  # noqa: BLE001 - a variant that cannot open loses its rows only
        return [(Row(v.runtime, v.label, loop=loop, error=f"{type(e).__name__}: {e}"), None) for loop in v.loops]
    load_s = time.perf_counter() - t0
    calls = samplers.num_denoiser_calls(cfg.sampler, cfg.steps) * -(-cfg.num_images // cfg.batch_size)
    call_batch = cfg.batch_size * (2 if cfg.guidance != 1 else 1)
    m = package.model
    out = []
    try:
        for loop in v.loops:
            label = v.label + (", device loop" if loop == "device" else "")
            row = Row(v.runtime, label, d.precision, d.device, loop, load_s)
            try:
                row.loop_s, inside, x0, row.extra["run_to_run_max_abs"] = time_loop(
                    d, package, SamplingConfig(**{**cfg.to_dict(), "device_loop": loop == "device"}), labels,
                    runs=runs, warmup=warmup)
                call_s = (bound_call_seconds(d, (call_batch, m.in_channels, m.image_size, m.image_size))
                          if loop == "device" else inside / calls)
                if loop == "device":
                    row.extra.update(device_loop_split(d, calls, call_s, row.loop_s))
            except Exception as e:  # noqa: BLE001 - failing while sampling (out of memory, ...) loses the row only
                row.error = f"failed while sampling: {type(e).__name__}: {e}"
                out.append((row, None))
                continue
            row.call_ms, row.outside_s = 1000 * call_s, row.loop_s - calls * call_s
            row.images_per_s = cfg.num_images / row.loop_s
            if flops_per_call:
                row.tflops = flops_per_call / call_s / 1e12
                ref = peak.get("cuda" if str(row.device).startswith("cuda") else "cpu")
                row.peak_pct = 100 * flops_per_call / call_s / ref if ref else None
            out.append((row, x0))
    finally:
        d.close()
    return out


@contextlib.contextmanager
def preset_package(preset: str, seed: int = 0, keep: Path | None = None) -> Iterator[Path]:
    """A freshly initialised `preset` (zero-initialised output layers randomised) exported, with its
    checkpoint, to a temporary directory that is removed afterwards (or to `keep`, which stays)."""
    import torch

    from diffit_port.checkpoint import make_checkpoint, save_atomic
    from diffit_port.config import get_preset
    from diffit_port.export import export_package
    from diffit_port.models import build_model, randomize_zero_init_

    p = get_preset(preset)
    with tempfile.TemporaryDirectory(prefix=f"diffit-bench-{preset}-") as tmp:
        torch.manual_seed(seed)
        model = randomize_zero_init_(build_model(preset), seed=seed)
        ckpt = Path(tmp) / "model.pt"
        save_atomic(make_checkpoint(model, preset=preset, diffusion=p.diffusion), ckpt)   # the preset's sampling
        del model
        yield export_package(ckpt, keep or Path(tmp) / "package", embed_checkpoint=True, progress=True)


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """`n` child processes spinning in a pure-Python loop for the duration of the block (a competing load)."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)   # let them start
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def markdown(rows: list[Row], header: dict[str, Any]) -> str:
    lines = [f"Command: `{header['command']}`  ", f"Date: {header['date']}  ",
             f"Machine: {header['machine']}  ",
             f"Load average (1 min): {header['load_before']:.2f} before, {header['load_after']:.2f} after  ",
             f"Peak: {header['peak_text']}  ", f"Package: {header['package']}", "",
             f"| runtime | variant | precision | loop | load s | ms / call | outside the calls | images/s "
             f"| TFLOP/s | % of peak | max abs / rel. L2 vs {header['reference']} |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.runtime} | {r.label} | | | | | | | | | skipped: {r.error[:120]} |")
            continue
        out_pct = 100 * r.outside_s / r.loop_s if r.loop_s else 0.0
        tf = f"{r.tflops:.3g}" if r.tflops is not None else "-"
        pk = f"{r.peak_pct:.1f}%" if r.peak_pct is not None else "-"
        lines.append(f"| {r.runtime} | {r.label} | {r.precision} | {r.loop} | {r.load_s:.1f} | {r.call_ms:.2f} | "
                     f"{1000 * r.outside_s:.1f} ms ({out_pct:.1f}%) | {r.images_per_s:.2f} | {tf} | {pk} | "
                     f"{r.max_abs:.1e} / {r.rel_l2:.1e} |")
    return "\n".join(lines)


def benchmark(package: Package, cfg: SamplingConfig, chosen: list[Variant], *, runs: int, warmup: int,
              threads: int | None, command: str, package_text: str,
              keep_samples: dict[str, np.ndarray] | None = None, cache: dict[Any, Any] | None = None,
              deadline: float | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Every chosen variant in turn; returns the rows and the header (machine, load, peak, reference).
    `keep_samples` (a dict) receives each row's final samples under its label; `cache` shares prepared
    onnx-cuda graphs (see prepare_onnx_cuda); variants not started by `deadline` (time.monotonic()) are
    skipped with that reason, so an unattended run ends in time."""
    load_before = perf_counts.load_average()
    flops_img = perf_counts.model_flops_per_image(package.model)
    call_batch = cfg.batch_size * (2 if cfg.guidance != 1 else 1)
    flops_call = flops_img * call_batch if flops_img else None
    peak: dict[str, float] = {}
    texts = []
    if any(v.runtime == "onnx-cuda" or (v.device or "").startswith("cuda") for v in chosen):
        try:
            peak["cuda"], text = perf_counts.measured_peak(cuda=True)
            texts.append(f"{peak['cuda'] / 1e12:.0f} TFLOP/s ({text})")
        except Exception as e:  # noqa: BLE001 - no torch with CUDA: the % column stays empty for GPU rows
            texts.append(f"no CUDA peak ({type(e).__name__})")
    peak["cpu"], text = perf_counts.measured_peak(cuda=False)
    texts.append(f"{peak['cpu'] / 1e9:.0f} GFLOP/s ({text})")
    labels = default_labels(package, cfg.num_images)
    rows, reference = [], None
    cache = {} if cache is None else cache

    def results() -> Iterator[tuple[Row, Any]]:
        for v in chosen:
            if deadline is not None and time.monotonic() > deadline:
                yield from ((Row(v.runtime, v.label, loop=loop, error="time budget spent"), None) for loop in v.loops)
                continue
            yield from run_variant(v, package, cfg, labels, runs=runs, warmup=warmup, threads=threads,
                                   flops_per_call=flops_call, peak=peak, cache=cache)

    results = results()
    for row, x0 in results:
        v = row
        if x0 is not None:
            if keep_samples is not None:
                keep_samples[row.label] = x0
            if reference is None:
                reference = (f"{v.runtime} {v.label}", x0)
            row.max_abs = float(np.abs(x0 - reference[1]).max())
            row.rel_l2 = float(np.linalg.norm(x0 - reference[1]) / max(np.linalg.norm(reference[1]), 1e-30))
            click.echo(f"{v.runtime:9s} {v.label:56s} {row.images_per_s:9.2f} images/s  {row.call_ms:8.2f} ms/call  "
                       f"outside {100 * row.outside_s / row.loop_s:5.1f}%", err=True)
        else:
            click.echo(f"skipping {v.runtime} {v.label}: {row.error}", err=True)
        rows.append(row)
    header = {"command": command, "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              "machine": perf_counts.machine(), "load_before": load_before, "load_after": perf_counts.load_average(),
              "peak": peak, "peak_text": "; ".join(texts), "package": package_text,
              "reference": reference[0] if reference else "-", "flops_per_image": flops_img,
              "flops_per_call": flops_call, "sampling": cfg.to_dict(), "runs": runs, "warmup": warmup}
    return rows, header


def describe(package: Package, cfg: SamplingConfig, runs: int, warmup: int) -> str:
    m = package.model
    calls = samplers.num_denoiser_calls(cfg.sampler, cfg.steps)
    w = cfg.guidance
    return (f"preset {package.manifest.get('preset')}, {package.precision}, {m.kind} {m.in_channels}x{m.image_size}x"
            f"{m.image_size}; {cfg.sampler} {cfg.steps} steps ({calls} calls), batch {cfg.batch_size}, guidance "
            f"{w:g} ({'batch doubled' if w != 1 else 'off'}); median of {runs} after {warmup} warm-up")


@click.command()
@click.option("--package", "package_dir", type=click.Path(file_okay=False), default=None,
              help="Package directory (default: the embedded package).")
@click.option("--preset", default=None, help="Benchmark a freshly initialised preset, exported to a temporary "
              "directory first (instead of --package).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--sampler", type=click.Choice(samplers.SAMPLER_NAMES), default=None,
              help="A sampler of the package's contract (eps: ddim, ddpm, dpmpp-2m, heun; edm: heun, "
                   "edm-stochastic, dpmpp-2m). Default: the package's.")
@click.option("--guidance", type=float, default=None, help="Default: the package's sampling.guidance.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (CPU runtimes).")
@click.option("--only", multiple=True, help="Only these runtimes (repeatable): torch, onnx-cpu, openvino, onnx-cuda.")
@click.option("--match", multiple=True, help="Only variants whose label contains one of these (repeatable); "
              "the first variant run is the reference of the diff column.")
@click.option("--busy", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run this many busy-loop processes (one per core: the competing load) during the benchmark.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the markdown here and the figures as JSON next to it (same name, .json).")
def main(package_dir: str | None, preset: str | None, batch_size: int, steps: int, sampler: str | None,
         guidance: float | None, runs: int, warmup: int, threads: int | None, only: tuple[str, ...],
         match: tuple[str, ...], busy: int, out: Path | None) -> None:
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/sampling.py", *sys.argv[1:]])
    with (preset_package(preset) if preset else contextlib.nullcontext(package_dir)) as pkg_dir, busy_loops(busy):
        package = load_package(pkg_dir or default_package_path())
        cfg = SamplingConfig.from_package(package, sampler=sampler, steps=steps, num_images=batch_size,
                                          batch_size=batch_size,
                                          guidance=None if package.model.num_classes == 0 else guidance)
        chosen = [v for v in variants(package) if (not only or v.runtime in only)
                  and (not match or any(m in v.label for m in match))]
        rows, header = benchmark(package, cfg, chosen, runs=runs, warmup=warmup, threads=threads, command=command,
                                 package_text=describe(package, cfg, runs, warmup))
    text = markdown(rows, header)
    click.echo("\n" + text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({**header, "rows": [r.__dict__ for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
