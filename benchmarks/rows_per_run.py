"""Whether a large latent denoiser call runs faster as several smaller session runs (onnx-cuda, fp16, CUDA graphs).

At latent-xl2-256's 128 rows per call, each block's MLP writes a (128, 256, 4608) float16 activation (302 MB) that
the GELU reads back and the next GEMM reads again, far beyond the GPU's L2 (50 MB on an H100). At 8 or 16 rows the
same tensor is 19-38 MB. This times one fresh preset's fp16 graph at several rows per run, each as a captured CUDA
graph on device buffers, and reports the ms that `--rows` total rows take that way (runs of R rows, rows / R of
them), beside torch.compile bf16 at the full rows (the per-call reference of docs/BENCHMARKS.md). Round 17 of
docs/BENCHMARKS_GPU.md has the outcome: one run of all the rows stays the fastest.

    python benchmarks/rows_per_run.py --preset latent-xl2-256 --rows 128 --per-run 128 --per-run 64 \
        --per-run 32 --per-run 16 --per-run 8 --out rows-per-run.md
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import click

from sampling import bound_call_seconds, denoiser_feeds, preset_package

from diffit_port.package import Package, load_package
from diffit_port.runtimes import create_denoiser


def onnx_rows(package: Package, qkv: str, rows: int, per_run: list[int], reps: int) -> list[dict]:
    """One onnx-cuda fp16 session with CUDA graphs (`qkv` as for prepare_cuda_model); per R in `per_run`, the
    median ms of one run of R rows and the ms of rows / R such runs."""
    m = package.model
    t0 = time.perf_counter()
    d = create_denoiser("onnx-cuda", package, precision="fp16", cuda_graph=True, qkv=qkv)
    load_s = time.perf_counter() - t0
    out = []
    try:
        for r in per_run:
            ms = 1000 * bound_call_seconds(d, (r, m.in_channels, m.image_size, m.image_size), reps)
            out.append({"variant": f"onnx-cuda fp16 + CUDA graph, qkv={qkv}", "per_run": r, "run_ms": ms,
                        "total_ms": ms * rows / r, "load_s": load_s})
            print(f"{out[-1]['variant']}: {r} rows a run {ms:.3f} ms, {rows} rows {ms * rows / r:.2f} ms", flush=True)
    finally:
        d.close()
    return out


def torch_rows(package: Package, rows: int, reps: int) -> dict:
    """torch.compile bf16 at `rows` rows: the median ms of one call (host arrays in and out, as sampling.py
    times a host loop's calls)."""
    m = package.model
    d = create_denoiser("torch", package, device="cuda", precision="bf16", compile=True)
    feeds = denoiser_feeds(["x", "t", "y"], (rows, m.in_channels, m.image_size, m.image_size))
    args = [feeds["x"], feeds["t"], feeds["y"]]
    for _ in range(3):
        d(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        d(*args)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    print(f"torch.compile bf16: {rows} rows {ms:.2f} ms", flush=True)
    return {"variant": "torch.compile bf16", "per_run": rows, "run_ms": ms, "total_ms": ms}


def table(rows: int, results: list[dict], ref: dict | None) -> str:
    lines = [f"| variant | rows a run | ms a run | ms for {rows} rows | x torch.compile bf16 |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        vs = f"{ref['total_ms'] / r['total_ms']:.2f}" if ref else ""
        lines.append(f"| {r['variant']} | {r['per_run']} | {r['run_ms']:.3f} | {r['total_ms']:.2f} | {vs} |")
    return "\n".join(lines)


@click.command()
@click.option("--preset", default="latent-xl2-256", show_default=True, help="A latent preset, exported fresh.")
@click.option("--rows", default=128, show_default=True, type=click.IntRange(1), help="Rows of the whole call.")
@click.option("--per-run", "per_run", multiple=True, type=click.IntRange(1),
              help="Rows a session run (repeatable; each must divide --rows). Default: --rows, then halves to 8.")
@click.option("--qkv", multiple=True, default=("separate-time",), show_default=True,
              help="The MultiHeadAttention rewrite's q/k/v form (repeatable).")
@click.option("--reps", default=20, show_default=True, type=click.IntRange(3), help="Timed runs per row count.")
@click.option("--torch/--no-torch", "with_torch", default=True, show_default=True,
              help="Time torch.compile bf16 at --rows too (the reference).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the table here (+ .json).")
def main(preset: str, rows: int, per_run: tuple[int, ...], qkv: tuple[str, ...], reps: int, with_torch: bool,
         out: Path | None) -> None:
    sizes = list(per_run) or [rows // 2 ** i for i in range(8) if rows // 2 ** i >= 8]
    if any(rows % r for r in sizes):
        raise click.BadParameter(f"each must divide --rows {rows}, got {sizes}", param_hint="--per-run")
    with preset_package(preset) as pkg_dir:
        package = load_package(pkg_dir)
        if package.model.kind != "latent":
            raise click.UsageError(f"{preset} is not a latent preset")
        results = [r for q in qkv for r in onnx_rows(package, q, rows, sizes, reps)]
        ref = torch_rows(package, rows, reps) if with_torch else None
    text = table(rows, ([ref] if ref else []) + results, ref)
    print(text)
    if out:
        import onnxruntime
        import torch

        header = {"preset": preset, "rows": rows, "reps": reps, "date": datetime.date.today().isoformat(),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
        out.write_text(f"{json.dumps(header)}\n\n{text}\n")
        out.with_suffix(".json").write_text(json.dumps({"header": header, "results": results, "torch": ref}, indent=1))


if __name__ == "__main__":
    main()
