"""Side-by-side training throughput of presets, eager and torch.compile, in one run.

Each variant runs the training step of `diffit_port.train` (hybrid loss under bf16 autocast, backward,
grad clipping, AdamW, EMA) on a fixed synthetic batch: `--warmup` untimed steps (compilation happens
there), then `--iters` steps, each timed between two device synchronisations; the table gives the
median. Model FLOPs are counted once per preset with torch.utils.flop_counter.FlopCounterMode over one
forward + backward at the same batch (matmuls, convolutions and attention; elementwise work, the
optimizer and the EMA are not counted), so TFLOP/s = counted FLOPs / median step time, a lower bound
of the work the GPU does. Prints a markdown table with the command, the date, the machine and versions.

    python benchmarks/train_throughput.py --preset digits --preset latent-xl2-256 --batch-size 64
    python benchmarks/train_throughput.py --preset tiny --device cpu --batch-size 8 --iters 3   # smoke run
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback

import click
import torch

from diffit_port.config import PRESETS, get_preset
from diffit_port.diffusion import ForwardProcess
from diffit_port.models import build_model, count_parameters
from diffit_port.optim import EMA, make_optimizer, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        gpu = "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{gpu}; {cpu}, Python {platform.python_version()}, torch {torch.__version__}"


def batch(preset: str, batch_size: int, device: torch.device, num_timesteps: int):
    """A fixed synthetic batch (x0, t, y, noise): the timing must not depend on data loading."""
    cfg = get_preset(preset).model
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = torch.rand(shape, generator=g, device=device) * 2 - 1
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g, device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch_size,), generator=g, device=device)
    return x0, t, y, torch.randn(shape, generator=g, device=device)


def count_flops(preset: str, batch_size: int, device: torch.device, bf16: bool) -> int:
    """FLOPs of one forward + backward of the eager model at `batch_size`."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffit_port.diffusion import training_losses

    p = get_preset(preset)
    model = build_model(p.model).to(device)
    fp = ForwardProcess.from_config(p.diffusion, device)
    x0, t, y, noise = batch(preset, batch_size, device, fp.num_timesteps)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = training_losses(model, x0, t, y, fp, noise)["loss"].mean()
        loss.backward()
    del model
    return counter.get_total_flops()


def run_variant(preset: str, batch_size: int, device: torch.device, bf16: bool, compiled: bool, warmup: int,
                iters: int) -> dict:
    p = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(p.model).to(device)
    ema = build_model(p.model).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema = EMA(ema, model)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0)
    step_model = torch.compile(model) if compiled else model
    fp = ForwardProcess.from_config(p.diffusion, device)
    x0, t, y, noise = batch(preset, batch_size, device, fp.num_timesteps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        train_step(step_model, model, ema, opt, fp, x0, t, y, noise, bf16=bf16, max_norm=1.0, decay=0.9999)
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        stats = train_step(step_model, model, ema, opt, fp, x0, t, y, noise, bf16=bf16, max_norm=1.0, decay=0.9999)
        sync(device)
        times.append(time.perf_counter() - t0)
    loss = float(stats[0])
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"params": count_parameters(model), "median_s": statistics.median(times), "warmup_s": warm_s,
            "loss": loss, "peak_gib": mem}


@click.command(context_settings={"show_default": True})
@click.option("--preset", "presets", type=click.Choice(sorted(PRESETS)), multiple=True,
              default=("digits", "latent-xl2-256"), help="Repeat for several presets.")
@click.option("--batch-size", type=click.IntRange(1), default=64)
@click.option("--iters", type=click.IntRange(1), default=20, help="Timed steps per variant (median reported).")
@click.option("--warmup", type=click.IntRange(1), default=5, help="Untimed steps first (compilation included).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast [default: on with CUDA].")
@click.option("--variants", type=click.Choice(["both", "eager", "compile"]), default="both")
def main(presets: tuple[str, ...], batch_size: int, iters: int, warmup: int, device: str, bf16: bool | None,
         variants: str) -> None:
    """Training images/s and model TFLOP/s per preset, eager and compiled, as a markdown table."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    bf16 = dev.type == "cuda" if bf16 is None else bf16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    modes = {"both": (False, True), "eager": (False,), "compile": (True,)}[variants]
    rows = []
    for preset in presets:
        flops = count_flops(preset, batch_size, dev, bf16)
        for compiled in modes:
            label = "compile" if compiled else "eager"
            print(f"[{preset} {label}] running ...", file=sys.stderr, flush=True)
            try:
                r = run_variant(preset, batch_size, dev, bf16, compiled, warmup, iters)
                ms, ips = r["median_s"] * 1e3, batch_size / r["median_s"]
                rows.append(f"| {preset} | {r['params'] / 1e6:.2f}M | {batch_size} | {label} | "
                            f"{'bf16' if bf16 else 'fp32'} | {ms:.1f} | {ips:.0f} | "
                            f"{flops / 1e9:.4g} | {flops / r['median_s'] / 1e12:.3g} | {r['warmup_s']:.1f} | "
                            f"{r['peak_gib']:.1f} |")
            except Exception as e:  # one failing variant (e.g. no compiler for inductor) keeps the others
                traceback.print_exc()
                rows.append(f"| {preset} | | {batch_size} | {label} | | failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:80]} | | | | | |")
            torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n`python {' '.join(shlex.quote(a) for a in sys.argv)}`  ")
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {machine(dev)}, commit {commit or '?'}, "
          f"median of {iters} steps after {warmup} warm-up\n")
    print("| preset | params | batch | variant | precision | ms/step | img/s | GFLOP fwd+bwd | TFLOP/s | "
          "warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
