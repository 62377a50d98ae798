"""The official-checkpoint path at full size: random latent-xl2-256 weights written in the official NVlabs/DiffiT
layout (safetensors), `diffit-convert`, `diffit-export` (fp32 package), then one-step parity of onnx-cuda (fp32
and fp16) against torch fp32 on the GPU and sampling images/s. Prints a markdown table last.

    python benchmarks/official_xl.py --work /tmp/official-xl            # GPU host: the full-size run
    python benchmarks/official_xl.py --small --work /tmp/official-small  # any CPU: a tiny config, CPU rows

The weights are the project's initialisation with the zero-initialised output layer randomised (std 0.02),
as for the latent-xl2-256 rows of docs/PARITY.md, so the figures compare like for like. Without CUDA the GPU
rows are skipped with the reason, and torch fp32 / onnx-cpu run on the CPU instead.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_counts import machine  # noqa: E402  (the sibling benchmarks' machine description)

from diffit_port.checkpoint import load_model  # noqa: E402
from diffit_port.config import ModelConfig  # noqa: E402
from diffit_port.convert import convert, to_official  # noqa: E402
from diffit_port.export import export_package  # noqa: E402
from diffit_port.models import build_model, randomize_zero_init_  # noqa: E402
from diffit_port.package import load_package  # noqa: E402
from diffit_port.runtimes import create_denoiser  # noqa: E402
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate  # noqa: E402

SMALL = ModelConfig(kind="latent", image_size=16, in_channels=4, num_classes=10, learn_sigma=True, num_heads=4,
                    hidden_size=128, depth=2, patch_size=2)


def say(msg: str) -> None:
    click.echo(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", err=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def write_official(cfg: ModelConfig | str, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """Project-initialised weights (output layer randomised), written in the official layout."""
    torch.manual_seed(seed)
    model = randomize_zero_init_(build_model(cfg), seed=seed)
    tensors = to_official(model)
    save_file(tensors, str(path))
    return model.state_dict()


def step_inputs(num_classes: int, C: int, H: int, batch: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, C, H, H)).astype(np.float32)
    t = np.array([0.0, 437.25, 999.0, 120.0][:batch], dtype=np.float32)
    y = np.array([1, num_classes, 7, 0][:batch], dtype=np.int64)          # the null label included
    return x, t, y


def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a.astype(np.float64) - b
    return float(np.abs(d).max()), float(np.linalg.norm(d) / max(np.linalg.norm(b), 1e-30))


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the safetensors file, the converted checkpoint and the package (~7 GB full size).")
@click.option("--small", is_flag=True, help="A tiny latent config (16x16x4 latents, width 128, depth 2) instead "
              "of latent-xl2-256: a CPU check of the script itself.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="DDIM steps per run.")
@click.option("--runs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(work: Path, small: bool, batch_size: int, steps: int, runs: int, seed: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    src, ckpt, pkg_dir = work / "diffit_256.safetensors", work / "xl.pt", work / "xl-onnx"
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    say(f"building {'the small config' if small else 'latent-xl2-256'} and writing {src}")
    ours, t_write = timed(lambda: write_official(SMALL if small else "latent-xl2-256", src, seed))
    say("diffit-convert")
    done, t_convert = timed(lambda: convert(src, ckpt, force=True))
    back = load_model(ckpt)[0].state_dict()
    same = all(torch.equal(ours[k], back[k]) for k in ours) and set(ours) == set(back)
    del ours, back
    say(f"diffit-export (fp32){'' if small else ', about a minute on an H200'}")
    _, t_export = timed(lambda: export_package(ckpt, pkg_dir, force=True, progress=True))
    package = load_package(pkg_dir)
    m = package.model
    x, t, y = step_inputs(m.num_classes, m.in_channels, m.image_size)

    variants = [("torch", "eager fp32", {"precision": "fp32", "checkpoint": ckpt}, dev)]
    skipped = []
    if cuda:
        variants += [("onnx-cuda", "MHA+fusions fp32 (TF32 off)", {}, None),
                     ("onnx-cuda", "MHA+fusions fp16", {"precision": "fp16"}, None)]
    else:
        skipped.append("onnx-cuda rows: torch.cuda.is_available() is False on this machine")
        variants.append(("onnx-cpu", "as shipped fp32", {}, None))

    cfg = SamplingConfig.from_package(package, sampler="ddim", steps=steps, num_images=batch_size,
                                      batch_size=batch_size)
    labels = default_labels(package, batch_size)
    rows, ref_step, ref_x0 = [], None, None
    for runtime, label, opts, device in variants:
        say(f"{runtime} {label}: opening a session")
        try:
            d = create_denoiser(runtime, package, device=device, **opts)
        except Exception as e:  # noqa: BLE001 - a failing variant loses its row, the table goes on
            skipped.append(f"{runtime} {label}: {type(e).__name__}: {e}")
            continue
        try:
            step = d(x, t, y)
            generate([d], package, cfg, labels)                                   # warm-up
            times = []
            for _ in range(runs):
                x0, s = timed(lambda: generate([d], package, cfg, labels))
                times.append(s)
        except Exception as e:  # noqa: BLE001
            skipped.append(f"{runtime} {label}: failed while running: {type(e).__name__}: {e}")
            continue
        finally:
            d.close()
        if ref_step is None:
            ref_step, ref_x0 = step.astype(np.float64), x0.astype(np.float64)
        med = statistics.median(times)
        rows.append((runtime, label, d.precision, d.device, *diff(step, ref_step), *diff(x0, ref_x0),
                     1000 * med / steps, batch_size / med))
        say(f"{runtime} {label}: {batch_size / med:.2f} images/s")

    click.echo(f"\nCommand: `python benchmarks/official_xl.py {' '.join(sys.argv[1:])}`  ")
    click.echo(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    click.echo(f"Machine: {machine()}  ")
    click.echo(f"Model: {'small config' if small else 'latent-xl2-256'} in the official layout "
               f"({src.stat().st_size / 2**20:.1f} MiB safetensors, written in {t_write:.0f} s); diffit-convert "
               f"{t_convert:.1f} s -> preset {done.preset}, weights identical after the round trip: {same}; "
               f"diffit-export fp32 {t_export:.0f} s  ")
    click.echo(f"Step: batch {len(x)}, t {t.tolist()}, labels {y.tolist()}. Sampling: DDIM {steps} steps, batch "
               f"{batch_size}, guidance {cfg.guidance:g} {cfg.guidance_schedule} (calls at batch {2 * batch_size}), "
               f"median of {runs} after one warm-up; the reference is the first row\n")
    click.echo("| runtime | variant | precision | device | one step: max abs / rel. L2 | final samples: max abs / "
               "rel. L2 | ms / call | images/s |")
    click.echo("|---|---|---|---|---:|---:|---:|---:|")
    for rt, label, prec, device, sa, sr, xa, xr, ms, ips in rows:
        click.echo(f"| {rt} | {label} | {prec} | {device} | {sa:.1e} / {sr:.1e} | {xa:.1e} / {xr:.1e} | {ms:.1f} "
                   f"| {ips:.2f} |")
    for s in skipped:
        click.echo(f"\nskipped: {s}")


if __name__ == "__main__":
    main()
