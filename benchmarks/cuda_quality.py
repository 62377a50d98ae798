"""Sampling quality of the onnx-cuda graph variants on the shipped digits package: class accuracy and Frechet
distance (diffit_port.evaluate's judge and settings) of each variant, side by side with torch fp32 on the same
GPU, and each variant's samples against torch fp32's (the same noise streams, so they are comparable image by
image). Needs onnxruntime-gpu and scikit-learn.

    python benchmarks/cuda_quality.py                        # 1000 images, the package's sampler and guidance
    python benchmarks/cuda_quality.py --steps 20 --num-per-class 50
"""

from __future__ import annotations

import dataclasses

import click
import numpy as np

from diffit_port.evaluate import EvalConfig, evaluate, fit_judge
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser

UNET = dict(precision="fp16", cuda_graph=True, fusions="unet", qkv="separate")
VARIANTS = {"torch fp32": ("torch", dict(precision="fp32")),
            "onnx-cuda fp16 unet (default graph)": ("onnx-cuda", UNET),
            "onnx-cuda fp16 unet, biases not folded": ("onnx-cuda", dict(UNET, fold_biases=False)),
            "onnx-cuda fp32 unet": ("onnx-cuda", dict(fusions="unet", qkv="separate"))}


@click.command()
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Default: the package's.")
@click.option("--num-per-class", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
def main(steps: int | None, num_per_class: int, batch_size: int) -> None:
    package = load_package(default_package_path())
    s = package.sampling
    cfg = EvalConfig(sampler=s["sampler"], steps=steps or int(s["steps"]), guidance=float(s.get("guidance", 1.0)),
                     clip_denoised=bool(s.get("clip_denoised", not package.diffusion.is_edm)),
                     num_per_class=num_per_class, batch_size=batch_size)
    judge = fit_judge(0)
    click.echo(f"digits package, {cfg.sampler} x{cfg.steps}, guidance {cfg.guidance}, {10 * num_per_class} images")
    click.echo("| variant | class accuracy | FD (real floor) | max abs / rel. L2 vs torch fp32 | images/s |")
    click.echo("|---|---:|---:|---:|---:|")
    ref = None
    for label, (runtime, opts) in VARIANTS.items():
        denoise = create_denoiser(runtime, package, device="cuda", **opts)
        try:
            evaluate(denoise, package.model, package.diffusion, dataclasses.replace(cfg, num_per_class=2),
                     judge, progress=False)                                      # warm-up: graphs captured
            metrics, x0 = evaluate(denoise, package.model, package.diffusion, cfg, judge, progress=False)
        finally:
            if hasattr(denoise, "close"):
                denoise.close()
        ref = x0 if ref is None else ref
        diff = f"{np.abs(x0 - ref).max():.1e} / {np.linalg.norm(x0 - ref) / np.linalg.norm(ref):.1e}"
        click.echo(f"| {label} | {metrics['class_accuracy']:.4f} | {metrics['fd']:.3f} ({metrics['fd_real_floor']:.3f})"
                   f" | {diff} | {metrics['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
