"""Resident memory of `diffit-run` over a long run: it writes samples as they are made, so RSS must stay flat.

Runs the real CLI in a child process (PNG grid + .npy, optionally one PNG per image), reads its progress bar
to know how far it is, and samples the child's VmRSS from /proc (Linux) meanwhile. Prints one markdown row
per run: the largest RSS over the first tenth of the denoiser calls and over the last tenth, the growth
between them, the peak of the whole process (ru_maxrss) and what keeping the float32 samples alone would add.

    python benchmarks/memory_streaming.py --num-images 10000 --steps 2          # the docs/RELIABILITY.md figure
    python benchmarks/memory_streaming.py --num-images 100 --num-images 1000 --steps 2 --output-dir
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

PROGRESS = re.compile(rb"(\d+)/(\d+) \[")


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure(args: list[str], poll: float) -> dict:
    """Run diffit-run with `args`; (calls done, RSS) pairs from its progress bar, its peak RSS and wall time."""
    cmd = [sys.executable, "-c", "from diffit_port.runtimes.cli import main; main()", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = {"done": 0, "total": None}
    samples: list[tuple[int, int]] = []
    tail = bytearray()

    def read_progress() -> None:
        while chunk := proc.stderr.read1(4096):
            tail.extend(chunk)
            for m in PROGRESS.finditer(bytes(tail[-4096:])):
                state["done"], state["total"] = int(m.group(1)), int(m.group(2))
            del tail[:-4096]

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)    # reaps the child itself, so ru_maxrss is its own
        if pid:
            break
        rss = rss_bytes(proc.pid)
        if rss is not None and 0 < state["done"] < (state["total"] or 0):   # while denoiser calls are running
            samples.append((state["done"], rss))
        time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    out = proc.stdout.read().decode()
    if proc.returncode != 0 or not samples:
        raise click.ClickException(f"diffit-run failed ({proc.returncode}): "
                                   f"{bytes(tail[-2000:]).decode(errors='replace')}")
    return {"samples": samples, "total": state["total"], "peak": usage.ru_maxrss * 1024, "wall": wall,
            "summary": out.strip()}


def window_max(samples: list[tuple[int, int]], total: int, start: float) -> int:
    """The largest RSS sampled while calls start*total .. (start + 0.1)*total ran: RSS moves within each call
    (onnxruntime's buffers), so a window's maximum compares runs better than one sample."""
    lo, hi = start * total, (start + 0.1) * total
    inside = [rss for done, rss in samples if lo <= done <= max(hi, lo + 1)]
    return max(inside) if inside else (samples[0][1] if start == 0 else samples[-1][1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


@click.command()
@click.option("--num-images", "counts", type=click.IntRange(1), multiple=True, default=[10_000], show_default=True)
@click.option("--steps", type=click.IntRange(1), default=2, show_default=True)
@click.option("--runtime", default="onnx-cpu", show_default=True)
@click.option("--package", "package_dir", default=None, help="Default: the embedded digits package.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--output-dir", is_flag=True, help="Also write one PNG per image.")
@click.option("--poll", type=float, default=0.25, show_default=True, help="Seconds between RSS samples.")
def main(counts: tuple[int, ...], steps: int, runtime: str, package_dir: str | None, batch_size: int,
         threads: int | None, output_dir: bool, poll: float) -> None:
    """Measure diffit-run's resident memory at the first and last denoiser call of runs of COUNTS images."""
    from diffit_port.package import default_package_path, load_package
    from diffit_port.runtimes.cli_outputs import output_shape

    package = load_package(package_dir or default_package_path())
    per_image = 4
    for d in output_shape(package):
        per_image *= d
    load = os.getloadavg()
    click.echo("| images | steps | RSS, first tenth of the calls | RSS, last tenth | growth | peak RSS "
               "| all samples in float32 | wall |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="diffit-mem-") as tmp:
            args = ["--package", str(package.root), "--runtime", runtime, "--num-images", str(n), "--steps", str(steps),
                    "--batch-size", str(batch_size), "--output", str(Path(tmp) / "g.png"),
                    "--save-npy", str(Path(tmp) / "s.npy")]
            if output_dir:
                args += ["--output-dir", str(Path(tmp) / "each")]
            if threads:
                args += ["--threads", str(threads)]
            r = measure(args, poll)
        first, last = window_max(r["samples"], r["total"], 0.0), window_max(r["samples"], r["total"], 0.9)
        click.echo(f"| {n:,} | {steps} | {mib(first)} | {mib(last)} | {(last - first) / 2**20:+,.1f} MiB | "
                   f"{mib(r['peak'])} | {mib(n * per_image)} | {r['wall']:.0f} s |")
        click.echo(f"<!-- {r['summary']} ; {len(r['samples'])} RSS samples from call {r['samples'][0][0]} to "
                   f"{r['samples'][-1][0]} of {r['total']} -->")
    click.echo(f"\nCommand: `python benchmarks/memory_streaming.py {' '.join(sys.argv[1:])}`  ")
    click.echo(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    click.echo(f"Machine: {machine()}; load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
               "(other work shared the CPUs when it is above the CPU count)")


if __name__ == "__main__":
    main()
