"""Unattended GPU probe of the onnx-cuda candidates: per model, every candidate variant side by side with torch
eager and torch.compile (bf16), each checked against torch fp32 (max|diff| of the samples; device loop against
the host loop of the same session), then an onnxruntime profile (op types by total kernel time) of the fastest
onnx-cuda variants, and a compact table last. Markdown and JSON of everything go to --out-dir.

    python benchmarks/gpu_probe.py --model digits --model image-cifar10 --out-dir probe      # <= 6 min
    python benchmarks/gpu_probe.py --model latent-xl2-256 --out-dir probe                    # <= 5 min

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
from sampling import Row, benchmark, describe, markdown, preset_package
from variants import Variant, ort_cuda_available, torch_cuda_available

from diffit_port.package import Package, default_package_path, load_package
from diffit_port.runtimes.generate import SamplingConfig

# model -> (sampler, steps, batch, runs): batch per sampler run (guidance doubles the call)
SETTINGS = {"digits": ("dpmpp-2m", 20, 256, 3), "image-cifar10": ("heun", 10, 256, 3),
            "image-ffhq64": ("heun", 10, 64, 3), "latent-xl2-256": ("ddim", 10, 64, 2)}


def probe_variants(package: Package) -> list[Variant]:
    """torch references, then the onnx-cuda candidates (each with its device loop where it matters)."""
    image = package.model.kind == "image"
    if not torch_cuda_available():
        click.echo("no torch CUDA device: torch rows run on the CPU", err=True)
        out = [Variant("torch", "eager fp32", {"precision": "fp32"})]
    else:
        out = [Variant("torch", "eager fp32", {"precision": "fp32"}, "cuda"),
               Variant("torch", "eager bf16", {"precision": "bf16"}, "cuda"),
               Variant("torch", "torch.compile bf16", {"precision": "bf16", "compile": True}, "cuda")]
    if not ort_cuda_available():
        click.echo("onnxruntime has no CUDAExecutionProvider: onnx-cuda rows skipped, onnx-cpu rows instead", err=True)
        return out + [Variant("onnx-cpu", "as shipped", loops=("host", "device"))]
    g16 = dict(precision="fp16", cuda_graph=True)
    both = ("host", "device")
    cands = [("MHA+fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True), ("host",)),
             ("MHA+fusions fp16 + CUDA graph", g16, both),
             ("MHA+fusions fp16 + CUDA graph, norms fp16 I/O", dict(g16, fp16_keep_fp32=()), ("host",)),
             ("separate qkv fp16 + CUDA graph", dict(g16, qkv="separate"), both)]
    if image:
        cands[:0] = [("MHA+fusions fp32", {}, ("host",))]
        cands += [("unet fusions fp16 + CUDA graph", dict(g16, fusions="unet"), ("host",)),
                  ("unet fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True, fusions="unet"), ("host",)),
                  ("unet+separate qkv fp16 + CUDA graph", dict(g16, fusions="unet", qkv="separate"), both),
                  ("prefer_nhwc fp16 + CUDA graph", dict(g16, provider_options={"prefer_nhwc": "1"}), ("host",))]
    return out + [Variant("onnx-cuda", label, opts, loops=loops) for label, opts, loops in cands]


def _graph_opts(opts: dict[str, Any]) -> dict[str, Any]:
    keep = ("mha", "fusions", "qkv", "fp16_keep_fp32")
    out = {k: v for k, v in opts.items() if k in keep}
    out["fp16"] = opts.get("precision") == "fp16"
    return out


def profile_ops(package: Package, opts: dict[str, Any], batch: int, calls: int = 10, top: int = 14) -> dict[str, Any]:
    """Op types by total kernel time over `calls` runs of the variant's graph (no CUDA graph: a replay shows
    no nodes), inputs and output bound on the device; also the mean wall time per run."""
    import onnxruntime as ort

    from diffit_port.runtimes.onnx_rt import prepare_cuda_model, session_from_model, session_options

    model = prepare_cuda_model(package.graph_path(), **_graph_opts(opts))
    so = session_options(ort)
    with tempfile.TemporaryDirectory(prefix="diffit-prof-") as tmp:
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        cuda = ort_cuda_available()
        cuda_opts = {"use_tf32": "1" if opts.get("use_tf32") else "0", **opts.get("provider_options", {})}
        providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        session = session_from_model(ort, model, so, providers)
        m = package.model
        rng = np.random.default_rng(0)
        dev = "cuda" if cuda else "cpu"
        feeds = {"x": rng.standard_normal((batch, m.in_channels, m.image_size, m.image_size)).astype(np.float32),
                 "t": np.full(batch, 500.0, np.float32), "y": np.zeros(batch, np.int64)}
        binding = session.io_binding()
        for k, v in feeds.items():
            binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, dev, 0))
        binding.bind_output(session.get_outputs()[0].name, dev)
        for _ in range(3):
            session.run_with_iobinding(binding)
        t0 = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        wall_ms = 1000 * (time.perf_counter() - t0) / calls
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    runs = calls + 3
    total_ms = sum(per_op.values()) / 1000 / runs
    ops = [{"op": op, "ms_per_call": us / 1000 / runs, "pct": 100 * us / max(sum(per_op.values()), 1),
            "nodes": count[op] // runs} for op, us in per_op.most_common(top)]
    return {"wall_ms_per_call": wall_ms, "kernel_ms_per_call": total_ms, "ops": ops}


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


def device_vs_host(rows: list[Row], samples: dict[str, np.ndarray]) -> list[str]:
    """max|device loop - host loop| of the same session, per variant that ran both."""
    out = []
    for r in rows:
        if r.loop == "device" and not r.error:
            host = r.label.removesuffix(", device loop")
            if r.label in samples and host in samples:
                out.append(f"- {host}: device loop vs host loop max|diff| "
                           f"{float(np.abs(samples[r.label] - samples[host]).max()):.2e}")
    return out


def probe_model(name: str, out_dir: Path, profile_top: int, overrides: dict[str, Any]) -> str:
    sampler, steps, batch, runs = SETTINGS.get(name, ("ddim", 10, 64, 2))
    steps, batch, runs = overrides.get("steps") or steps, overrides.get("batch") or batch, overrides.get("runs") or runs
    context = contextlib.nullcontext(default_package_path()) if name == "digits" else preset_package(name)
    t0 = time.perf_counter()
    with context as pkg_dir:
        package = load_package(pkg_dir)
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: package ready", err=True)
        cfg = SamplingConfig.from_package(package, sampler=sampler, steps=steps, num_images=batch, batch_size=batch)
        chosen = probe_variants(package)
        samples: dict[str, np.ndarray] = {}
        rows, header = benchmark(package, cfg, chosen, runs=runs, warmup=1, threads=None,
                                 command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
                                 package_text=describe(package, cfg, runs, 1), keep_samples=samples)
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: variants timed", err=True)
        ort_rows = [r for r in rows if r.runtime in ("onnx-cuda", "onnx-cpu") and not r.error and r.loop == "host"]
        fastest = sorted(ort_rows, key=lambda r: -r.images_per_s)[:2]
        profiles = {}
        call_batch = batch * (2 if cfg.guidance != 1 else 1)
        for r in fastest:
            v = next(v for v in chosen if v.label == r.label)
            try:
                profiles[r.label] = profile_ops(package, v.opts, call_batch, top=profile_top)
            except Exception as e:  # noqa: BLE001 - a failed profile loses its section only
                profiles[r.label] = {"error": f"{type(e).__name__}: {e}"}
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: profiles taken", err=True)
    text = [markdown(rows, header), "", *device_vs_host(rows, samples), ""]
    for label, p in profiles.items():
        if "error" in p:
            text.append(f"Profile of {label}: failed ({p['error']})")
            continue
        text += [f"Profile of {label} (no CUDA graph), batch {call_batch}: {p['wall_ms_per_call']:.2f} ms wall, "
                 f"{p['kernel_ms_per_call']:.2f} ms in kernels per call", "", "| op | ms / call | % | nodes |",
                 "|---|---:|---:|---:|"]
        text += [f"| {o['op']} | {o['ms_per_call']:.3f} | {o['pct']:.1f} | {o['nodes']} |" for o in p["ops"]]
        text.append("")
    (out_dir / f"{name}.md").write_text("\n".join(text) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({**header, "rows": [r.__dict__ for r in rows],
                                                      "profiles": profiles}, indent=1, default=str))
    return summary(name, rows, header) + "\n" + "\n".join(device_vs_host(rows, samples))


@click.command()
@click.option("--model", "models", multiple=True, default=("digits", "image-cifar10"), show_default=True,
              help="digits (the embedded package) or a preset name (exported fresh); repeatable.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("gpu-probe"),
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the per-model steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the per-model batch.")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Override the per-model timed runs.")
@click.option("--profile-top", type=click.IntRange(min=1), default=14, show_default=True)
def main(models: tuple[str, ...], out_dir: Path, steps: int | None, batch_size: int | None, runs: int | None,
         profile_top: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"steps": steps, "batch": batch_size, "runs": runs}
    tables = [probe_model(name, out_dir, profile_top, overrides) for name in models]
    click.echo("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
