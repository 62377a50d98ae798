"""Side-by-side sampling throughput of every available runtime (and the onnx-cuda variants) on one package.

Each variant: open a session, run one full sampling loop of one batch as warm-up, then `--runs` timed loops;
report the median wall time as images/s and ms per denoiser call, plus max|diff| of the final samples
against the first variant (torch fp32 when torch is installed). Prints a markdown table with the command,
the date and the machine.

    python benchmarks/sampling.py --package PKG --batch-size 64 --steps 20 --runs 5
    python benchmarks/sampling.py --package PKG --only onnx-cuda    # the CUDA variants only
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np

from diffit_port import samplers
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import RuntimeUnavailable, create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate


@dataclass
class Variant:
    runtime: str
    label: str
    opts: dict[str, Any] = field(default_factory=dict)
    device: str | None = None


def variants(gpu: bool, torch_cuda: bool) -> list[Variant]:
    if torch_cuda:  # the reference is then torch fp32 on the GPU (the CPU one is far too slow to wait for)
        out = [Variant("torch", "eager fp32", {"precision": "fp32"}, "cuda"),
               Variant("torch", "eager tf32", {"precision": "tf32"}, "cuda"),
               Variant("torch", "eager bf16", {"precision": "bf16"}, "cuda"),
               Variant("torch", "torch.compile bf16", {"precision": "bf16", "compile": True}, "cuda"),
               Variant("torch", "torch.compile fp16", {"precision": "fp16", "compile": True}, "cuda")]
    else:
        out = [Variant("torch", "eager fp32", {"precision": "fp32"})]
    out += [Variant("onnx-cpu", "as shipped (function body)"),
            Variant("openvino", "inlined function, f32", {"precision": "fp32"}),
            Variant("openvino", "SDPA extension, f32", {"precision": "fp32", "attention": "sdpa"})]
    if gpu:
        cuda = [("plain fp32", dict(mha=False, fusions=False)),
                ("MHA fp32", dict(fusions=False)),
                ("MHA+fusions fp32", {}),
                ("MHA+fusions tf32", dict(use_tf32=True)),
                ("MHA+fusions fp16", dict(precision="fp16")),
                ("MHA+fusions fp16, no IO binding", dict(precision="fp16", io_binding=False)),
                ("MHA+fusions fp16 + CUDA graph", dict(precision="fp16", cuda_graph=True)),
                ("MHA+fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True))]
        out += [Variant("onnx-cuda", label, opts) for label, opts in cuda]
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs"]
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if gpus.returncode == 0 and gpus.stdout.strip():
            parts.append("GPU: " + "; ".join(ln.strip() for ln in gpus.stdout.splitlines()))
    except (OSError, subprocess.SubprocessError):
        pass
    versions = []
    try:
        import onnxruntime

        versions.append(f"onnxruntime {onnxruntime.__version__} (imported; providers "
                        f"{','.join(p.replace('ExecutionProvider', '') for p in onnxruntime.get_available_providers())})")
    except ImportError:
        pass
    for dist in ("openvino", "torch", "numpy"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    parts.append(f"Python {platform.python_version()}, " + ", ".join(versions))
    return "; ".join(parts)


def _gpu_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@click.command()
@click.option("--package", "package_dir", type=click.Path(file_okay=False), default=None,
              help="Package directory (default: the embedded package).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--sampler", type=click.Choice(sorted(samplers.SAMPLERS)), default="ddim", show_default=True)
@click.option("--guidance", type=float, default=None, help="Default: the package's sampling.guidance.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (CPU runtimes).")
@click.option("--only", multiple=True, help="Only these runtimes (repeatable): torch, onnx-cpu, openvino, onnx-cuda.")
@click.option("--match", multiple=True, help="Only variants whose label contains one of these (repeatable); "
              "the first variant run is the reference of the diff column.")
def main(package_dir: str | None, batch_size: int, steps: int, sampler: str, guidance: float | None, runs: int,
         warmup: int, threads: int | None, only: tuple[str, ...], match: tuple[str, ...]) -> None:
    package = load_package(package_dir or default_package_path())
    # The package's guidance settings (guidance_power included); an unconditional package runs unguided
    # whatever --guidance says.
    cfg = SamplingConfig.from_package(package, sampler=sampler, steps=steps, num_images=batch_size,
                                      batch_size=batch_size,
                                      guidance=None if package.model.num_classes == 0 else guidance)
    w = cfg.guidance
    labels = default_labels(package, batch_size)
    calls = samplers.num_denoiser_calls(sampler, steps)
    torch_cuda = _torch_cuda() and (not only or "torch" in only)
    rows, reference = [], None
    for v in variants(_gpu_available(), torch_cuda):
        if (only and v.runtime not in only) or (match and not any(m in v.label for m in match)):
            continue
        opts = dict(v.opts)
        if threads and v.runtime != "onnx-cuda":
            opts["threads"] = threads
        try:
            t0 = time.perf_counter()
            d = create_denoiser(v.runtime, package, device=v.device, **opts)
            load = time.perf_counter() - t0
        except (RuntimeUnavailable, ValueError, OSError) as e:
            click.echo(f"skipping {v.runtime} {v.label}: {e}", err=True)
            continue
        except Exception as e:  # noqa: BLE001 - a benchmark row fails, the table goes on
            click.echo(f"skipping {v.runtime} {v.label}: {type(e).__name__}: {e}", err=True)
            continue
        try:
            for _ in range(warmup):
                generate([d], package, cfg, labels)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                x0 = generate([d], package, cfg, labels)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - failing while sampling (out of memory, ...) loses the row only
            click.echo(f"skipping {v.runtime} {v.label}: failed while sampling: {type(e).__name__}: {e}", err=True)
            continue
        finally:
            d.close()
        med = statistics.median(times)
        if reference is None:
            reference = (f"{v.runtime} {v.label}", x0)
        diff = float(np.abs(x0 - reference[1]).max())
        rel = float(np.linalg.norm(x0 - reference[1]) / max(np.linalg.norm(reference[1]), 1e-30))
        rows.append((v.runtime, v.label, d.precision, d.device, load, 1000 * med / calls, batch_size / med, diff, rel))
        click.echo(f"{v.runtime:9s} {v.label:34s} {batch_size / med:9.2f} images/s", err=True)

    click.echo(f"\nCommand: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/sampling.py', *sys.argv[1:]])}`  ")
    click.echo(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    click.echo(f"Machine: {machine()}  ")
    m = package.model
    click.echo(f"Package: preset {package.manifest.get('preset')}, {package.precision}, {m.kind} "
               f"{m.in_channels}x{m.image_size}x{m.image_size}; {sampler} {steps} steps ({calls} calls), "
               f"batch {batch_size}, guidance {w:g} ({'batch doubled' if w != 1 else 'off'}); "
               f"median of {runs} after {warmup} warm-up\n")
    ref_name = reference[0] if reference else "-"
    click.echo(f"| runtime | variant | precision | device | load s | ms / call | images/s "
               f"| max abs / rel. L2 diff vs {ref_name} |")
    click.echo("|---|---|---|---|---:|---:|---:|---:|")
    for rt, label, prec, dev, load, ms, ips, diff, rel in rows:
        click.echo(f"| {rt} | {label} | {prec} | {dev} | {load:.2f} | {ms:.2f} | {ips:.2f} | {diff:.1e} / {rel:.1e} |")


if __name__ == "__main__":
    main()
