"""Unattended GPU probe of the onnx-cuda candidates: per model, every candidate variant side by side with torch
eager and torch.compile (bf16), each checked against torch fp32 (max|diff| of the samples; device loop against
the host loop of the same session), then an onnxruntime profile (op types by total kernel time) of the fastest
onnx-cuda variants, and a compact table last. Markdown and JSON of everything go to --out-dir.

    python benchmarks/gpu_probe.py --model digits --model image-cifar10 --out-dir probe      # <= 6 min
    python benchmarks/gpu_probe.py --model latent-xl2-256 --out-dir probe                    # <= 5 min
    python benchmarks/gpu_probe.py --quick --budget-s 400 --out-dir probe   # the short list, digits + cifar10, ~5 min

`digits` is the embedded (trained) package; any other name is a preset, freshly initialised and exported
first. Without CUDA the onnx-cuda and torch-CUDA rows are skipped with the reason (CPU rows run instead).
"""

from __future__ import annotations

import collections
import contextlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from sampling import Row, benchmark, denoiser_feeds, describe, markdown, preset_package
from variants import Variant, ort_cuda_available, torch_cuda_available

from diffit_port.package import Package, default_package_path, load_package
from diffit_port.runtimes.generate import SamplingConfig

# model -> (sampler, steps, batch, runs): batch per sampler run (guidance doubles the call); dpmpp-2m and heun
# exist for both contracts (the shipped digits package may be eps or EDM)
SETTINGS = {"digits": ("dpmpp-2m", 20, 256, 3), "image-cifar10": ("heun", 10, 256, 3),
            "image-ffhq64": ("heun", 10, 64, 3), "latent-xl2-256": ("ddim", 10, 64, 2)}


# Without the CUDA EP: onnx-cpu on one session (the device loop's own, so its "denoiser alone" time is comparable)
CPU_FALLBACK = Variant("onnx-cpu", "as shipped, one session", {"streams": 1}, loops=("host", "device"))


def torch_references() -> list[Variant]:
    if not torch_cuda_available():
        click.echo("no torch CUDA device: torch rows run on the CPU", err=True)
        return [Variant("torch", "eager fp32", {"precision": "fp32"})]
    return [Variant("torch", "eager fp32", {"precision": "fp32"}, "cuda"),
            Variant("torch", "eager bf16", {"precision": "bf16"}, "cuda"),
            Variant("torch", "torch.compile bf16", {"precision": "bf16", "compile": True}, "cuda")]


def probe_variants(package: Package) -> list[Variant]:
    """torch references, then the onnx-cuda candidates (each with its device loop where it matters)."""
    image = package.model.kind == "image"
    out = torch_references()
    if not ort_cuda_available():
        click.echo("onnxruntime has no CUDAExecutionProvider: onnx-cuda rows skipped, onnx-cpu rows instead", err=True)
        return out + [CPU_FALLBACK]
    g16 = dict(precision="fp16", cuda_graph=True)
    both = ("host", "device")
    # in order of interest: a spent time budget skips the last ones
    cands = [("MHA+fusions fp16 + CUDA graph", g16, both),
             ("separate qkv fp16 + CUDA graph", dict(g16, qkv="separate"), both)]
    if image:
        cands += [("unet fusions fp16 + CUDA graph", dict(g16, fusions="unet"), ("host",)),
                  ("unet+separate qkv fp16 + CUDA graph", dict(g16, fusions="unet", qkv="separate"), both),
                  ("unet fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True, fusions="unet"), ("host",)),
                  ("MHA+fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True), ("host",)),
                  ("prefer_nhwc fp16 + CUDA graph", dict(g16, provider_options={"prefer_nhwc": "1"}), ("host",))]
    cands.append(("MHA+fusions fp16 + CUDA graph, all norms fp16 I/O", dict(g16, fp16_keep_fp32=()), ("host",)))
    # MultiHeadAttention's kernel, pinned through the CUDA EP's sdpa_kernel bitmask (onnxruntime's
    # AttentionBackend: 1 flash, 2 memory-efficient, 8 cuDNN flash, 16 unfused); the bias rules out flash.
    best = dict(g16, fusions="unet", qkv="separate") if image else dict(g16, qkv="separate")
    for kernel, mask in (("cuDNN", "24"), ("memory-efficient", "18"), ("unfused", "16")):
        cands.append((f"best graph, {kernel} attention", dict(best, provider_options={"sdpa_kernel": mask}), ("host",)))
    if image:
        cands.append(("MHA+fusions fp32", {}, ("host",)))   # (the fp32 graph of latent-xl2 is past 2 GB: slow to open)
    return out + [Variant("onnx-cuda", label, opts, loops=loops) for label, opts, loops in cands]


SECOND = ", second session"    # a variant opened again: its samples against the first session's


def quick_variants(package: Package) -> list[Variant]:
    """The short list of the latest rounds (8 for the image models, 10 for the latent ones), in order of
    interest: the references, then the onnx-cuda fp16 default graph (for the image models: unet fusions, separate
    q/k/v, short windows packed, LayerNorm with float16 I/O, cuDNN's heuristic convolutions, the memory-efficient
    attention kernel and, since round 8, the biases folded) on both loops, against the same graph without the
    bias folds and on cuDNN's flash attention (round 5's default); for the latent models the separate q/k/v
    graph against the same with the time token inside the q and v GEMMs."""
    out = [v for v in torch_references() if v.label != "eager bf16"]
    if not ort_cuda_available():
        return out + [CPU_FALLBACK]
    both = ("host", "device")
    if package.model.kind == "image":
        f16 = dict(precision="fp16", cuda_graph=True, fusions="unet", qkv="separate")
        cands = [("unet+separate qkv fp16 + CUDA graph", f16, both),
                 ("unet+separate qkv fp16, biases not folded + CUDA graph", dict(f16, fold_biases=False), both),
                 ("unet+separate qkv fp16, cuDNN attention + CUDA graph",
                  dict(f16, provider_options={"sdpa_kernel": "24"}), both)]
    else:   # round 10: the time token inside the q and v GEMMs (ort_graph.rewrite_to_mha, qkv="separate-time")
        f16 = dict(precision="fp16", cuda_graph=True)
        cands = [("separate qkv fp16 + CUDA graph", dict(f16, qkv="separate"), ("host",)),
                 ("separate qkv, time token in the q/v GEMMs fp16 + CUDA graph", dict(f16, qkv="separate-time"),
                  ("host",))]
    return out + [Variant("onnx-cuda", label, opts, loops=loops) for label, opts, loops in cands]


# --quick: which variants are profiled besides the fastest
QUICK_PROFILES = ("unet+separate qkv fp16 + CUDA graph", "unet+separate qkv fp16, biases not folded + CUDA graph",
                  "separate qkv fp16 + CUDA graph", "separate qkv, time token in the q/v GEMMs fp16 + CUDA graph")


# of a Variant's opts
GRAPH_OPTS = ("mha", "fusions", "qkv", "fp16_keep_fp32", "attention_fp16", "pack_windows", "fold_biases")


def _profile_session(package: Package, v: Variant, batch: int, prefix: str,
                     cache: dict[Any, Any]) -> tuple[Any, Any]:
    """A session of the variant's graph (no CUDA graph: a replay shows no nodes) with its inputs and output
    bound on the device, ready to run, with onnxruntime's profiler on (files under `prefix`); the prepared
    graph comes from `cache` (filled by the timed rows) when it is there; onnx-cpu: the graph as shipped."""
    import onnx
    import onnxruntime as ort

    from diffit_port.runtimes.onnx_cuda import (cached_cuda_model, cuda_graph_options, cuda_precision,
                                              cuda_provider_options, session_from_model, session_options)

    opts = v.opts
    precision, use_tf32 = cuda_precision(package, opts.get("precision"), bool(opts.get("use_tf32")))
    graph_opts = cuda_graph_options(package, precision, **{k: opts[k] for k in GRAPH_OPTS if k in opts})
    model = (onnx.load(str(package.graph_path())) if v.runtime == "onnx-cpu" else
             cached_cuda_model(cache, package.graph_path(), **graph_opts))
    so = session_options(ort)
    so.enable_profiling, so.profile_file_prefix = True, prefix
    cuda = ort_cuda_available()
    cuda_opts = cuda_provider_options(package, precision, use_tf32, opts.get("provider_options"))
    providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = session_from_model(ort, model, so, providers)
    m, dev = package.model, "cuda" if cuda else "cpu"
    feeds = denoiser_feeds([i.name for i in session.get_inputs()], (batch, m.in_channels, m.image_size, m.image_size))
    binding = session.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, dev, 0))
    binding.bind_output(session.get_outputs()[0].name, dev)
    for _ in range(3):
        session.run_with_iobinding(binding)
    return session, binding


def _top(counter: collections.Counter, nodes: collections.Counter, runs: int, top: int) -> list[dict[str, Any]]:
    total = max(sum(counter.values()), 1)
    return [{"op": k, "ms_per_call": us / 1000 / runs, "pct": 100 * us / total, "count": nodes[k] // runs}
            for k, us in counter.most_common(top)]


def profile_ops(package: Package, v: Variant, batch: int, cache: dict[Any, Any], calls: int = 10,
                top: int = 14) -> dict[str, Any]:
    """Where a call's time goes. `ort_nodes`: onnxruntime's profiler, node time by op type (on the CUDA EP this
    is the host side of each node: launches, plus waits where a node synchronises). `gpu_kernels`: with torch
    on CUDA, the GPU kernels of the same runs as CUPTI records them (torch.profiler traces every CUDA kernel
    of the process, onnxruntime's included), by kernel name; also the wall time per call."""
    gpu: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="diffit-prof-") as tmp:
        session, binding = _profile_session(package, v, batch, str(Path(tmp) / "prof"), cache)
        t0 = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        wall_ms = 1000 * (time.perf_counter() - t0) / calls
        if ort_cuda_available() and torch_cuda_available():
            try:
                gpu = _gpu_kernels(session, binding, calls, top)
            except Exception as e:  # noqa: BLE001 - CUPTI unavailable: the onnxruntime table stays
                gpu = {"gpu_kernels_error": f"{type(e).__name__}: {e}"}
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    runs = calls + 3 + (calls if gpu and "gpu_kernels" in gpu else 0)
    return {"wall_ms_per_call": wall_ms, "ort_nodes": _top(per_op, count, runs, top), **gpu}


def _gpu_kernels(session: Any, binding: Any, calls: int, top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            session.run_with_iobinding(binding)
        torch.cuda.synchronize()
    per_kernel: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us:
            per_kernel[ev.key[:90]] += us
            count[ev.key[:90]] += ev.count
    return {"gpu_ms_per_call": sum(per_kernel.values()) / 1000 / calls,
            "gpu_kernels": _top(per_kernel, count, calls, top)}


def profile_text(label: str, batch: int, p: dict[str, Any]) -> list[str]:
    if "error" in p:
        return [f"Profile of {label}: failed ({p['error']})", ""]
    gpu = f", {p['gpu_ms_per_call']:.2f} ms of GPU kernels" if "gpu_ms_per_call" in p else ""
    text = [f"Profile of {label} (no CUDA graph), batch {batch}: {p['wall_ms_per_call']:.2f} ms wall per call{gpu}", ""]
    for key, title in (("gpu_kernels", "GPU kernel (CUPTI)"), ("ort_nodes", "onnxruntime node op type (host side)")):
        if key in p:
            text += [f"| {title} | ms / call | % | count / call |", "|---|---:|---:|---:|"]
            text += [f"| `{o['op']}` | {o['ms_per_call']:.3f} | {o['pct']:.1f} | {o['count']} |" for o in p[key]]
            text.append("")
    if "gpu_kernels_error" in p:
        text += [f"(no GPU kernel table: {p['gpu_kernels_error']})", ""]
    return text


def summary(name: str, rows: list[Row], header: dict[str, Any]) -> str:
    """The compact table: speed against torch.compile bf16, and each device loop against its host loop."""
    ok = [r for r in rows if not r.error]
    compiled = next((r for r in ok if r.label == "torch.compile bf16"), None)
    lines = [f"### {name}: {header['package']}", "",
             "| variant | ms / call | outside | images/s | x compile | TFLOP/s | % peak | vs torch fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        x = f"{r.images_per_s / compiled.images_per_s:.2f}" if compiled else "-"
        pk = f"{r.peak_pct:.0f}%" if r.peak_pct is not None else "-"
        lines.append(f"| {r.runtime} {r.label} ({r.precision}) | {r.call_ms:.2f} | "
                     f"{100 * r.outside_s / r.loop_s:.1f}% | {r.images_per_s:.1f} | {x} | "
                     f"{r.tflops or 0:.1f} | {pk} | {r.max_abs:.1e} |")
    for r in rows:
        if r.error:
            lines.append(f"| {r.runtime} {r.label}: skipped ({r.error[:100]}) | | | | | | | |")
    return "\n".join(lines)


def reproducibility(rows: list[Row], samples: dict[str, np.ndarray]) -> list[str]:
    """Per onnxruntime variant: max|diff| of its samples from run to run on one session, between two sessions
    (a SECOND variant), and of its device loop against its host loop, with where the device loop's time
    outside the denoiser goes. A loop that differs from its host loop by more than the host loop differs from
    itself (or from a second session) is wrong; as much is the variant's own non-determinism."""
    out = []
    for r in rows:
        if r.error or r.runtime not in ("onnx-cuda", "onnx-cpu") or r.label not in samples:
            continue
        parts = [f"run to run {r.extra.get('run_to_run_max_abs', float('nan')):.2e}"]
        base = r.label.removesuffix(", device loop").removesuffix(SECOND)
        if base != r.label and base in samples:
            what = "device loop vs host loop" if r.loop == "device" else "second session vs first"
            parts.append(f"{what} {float(np.abs(samples[r.label] - samples[base]).max()):.2e}")
        if "step_ms" in r.extra:
            parts.append(f"step {r.extra['step_ms']:.2f} ms = denoiser {r.call_ms:.2f} + update "
                         f"{r.extra['update_ms_per_call']:.2f}; host {r.extra['host_ms']:.1f} ms per loop "
                         f"(last batch, ms: {r.extra['last_batch']})")
        out.append(f"- {r.label}: max|diff| " + "; ".join(parts))
    return out


def probe_model(name: str, out_dir: Path, profile_top: int, overrides: dict[str, Any], deadline: float,
                export_dir: Path | None = None, quick: bool = False, match: tuple[str, ...] = (),
                profiles_on: bool = True) -> str:
    sampler, steps, batch, runs = SETTINGS.get(name, (None, 10, 64, 2))     # None: the package's sampler
    runs = 2 if quick else runs
    steps, batch, runs = overrides.get("steps") or steps, overrides.get("batch") or batch, overrides.get("runs") or runs
    if name == "digits":
        context = contextlib.nullcontext(default_package_path())
    elif export_dir is not None and (export_dir / name / "manifest.json").is_file():
        context = contextlib.nullcontext(export_dir / name)      # exported by an earlier probe
    else:
        context = preset_package(name, keep=export_dir / name if export_dir else None)
    t0 = time.perf_counter()
    with context as pkg_dir:
        package = load_package(pkg_dir)
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: package ready", err=True)
        cfg = SamplingConfig.from_package(package, sampler=sampler, steps=steps, num_images=batch, batch_size=batch)
        chosen = quick_variants(package) if quick else probe_variants(package)
        if match:
            chosen = [v for v in chosen if any(m in f"{v.runtime} {v.label}" for m in match)]
        samples: dict[str, np.ndarray] = {}
        cache: dict[Any, Any] = {}
        rows, header = benchmark(package, cfg, chosen, runs=runs, warmup=1, threads=None,
                                 command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
                                 package_text=describe(package, cfg, runs, 1), keep_samples=samples, cache=cache,
                                 deadline=deadline)
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: variants timed", err=True)
        ort_rows = [r for r in rows if r.runtime in ("onnx-cuda", "onnx-cpu") and not r.error and r.loop == "host"]
        fastest = sorted(ort_rows, key=lambda r: -r.images_per_s)[:(1 if quick else 2) if profiles_on else 0]
        if quick and profiles_on:
            fastest += [r for r in ort_rows if r.label in QUICK_PROFILES and r not in fastest]
        profiles = {}
        call_batch = batch * (2 if cfg.guidance != 1 else 1)
        for r in fastest:
            v = next(v for v in chosen if v.label == r.label)
            try:
                profiles[r.label] = profile_ops(package, v, call_batch, cache, top=profile_top)
            except Exception as e:  # noqa: BLE001 - a failed profile loses its section only
                profiles[r.label] = {"error": f"{type(e).__name__}: {e}"}
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: profiles taken", err=True)
    text = [markdown(rows, header), "", *reproducibility(rows, samples), ""]
    for label, p in profiles.items():
        text += profile_text(label, call_batch, p)
    (out_dir / f"{name}.md").write_text("\n".join(text) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({**header, "rows": [r.__dict__ for r in rows],
                                                      "profiles": profiles}, indent=1, default=str))
    return summary(name, rows, header) + "\n\n" + "\n".join(reproducibility(rows, samples))


@click.command()
@click.option("--model", "models", multiple=True, default=("digits", "image-cifar10"), show_default=True,
              help="digits (the embedded package) or a preset name (exported fresh); repeatable.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("gpu-probe"),
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the per-model steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the per-model batch.")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Override the per-model timed runs.")
@click.option("--profile-top", type=click.IntRange(min=1), default=14, show_default=True)
@click.option("--export-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep exported presets here (DIR/<preset>) and reuse them on the next run.")
@click.option("--budget-s", type=click.FloatRange(min=1), default=None,
              help="Wall-time budget: each model gets an equal share for its timed variants (the rest are skipped "
                   "with that reason; profiles still run). Default 330 s, with --quick 170 s.")
@click.option("--match", multiple=True,
              help="Only the variants whose 'runtime label' contains this text (repeatable; the first one run is "
                   "then the reference of the 'vs' column).")
@click.option("--profiles/--no-profiles", "profiles_on", default=True, show_default=True,
              help="Profile the fastest onnxruntime variants after the timed rows.")
@click.option("--quick", is_flag=True,
              help="Only the short list of variants that matter now (quick_variants), 2 timed runs each, profiles "
                   "of the fastest and of the fp16 default graph (digits + image-cifar10: about 5 "
                   "minutes with --budget-s 400; the default 170 s covers digits only).")
def main(models: tuple[str, ...], out_dir: Path, steps: int | None, batch_size: int | None, runs: int | None,
         profile_top: int, export_dir: Path | None, budget_s: float | None, match: tuple[str, ...],
         profiles_on: bool, quick: bool) -> None:
    budget_s = budget_s or (170.0 if quick else 330.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"steps": steps, "batch": batch_size, "runs": runs}
    start, tables = time.monotonic(), []
    for i, name in enumerate(models):
        # this model's share of what is left, keeping ~20% of it for the export, the profiles and the tables
        share = (start + budget_s - time.monotonic()) / (len(models) - i)
        tables.append(probe_model(name, out_dir, profile_top, overrides, time.monotonic() + 0.8 * share, export_dir,
                                  quick, match, profiles_on))
    click.echo("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
