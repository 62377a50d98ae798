"""`diffit-run`: sample images from an exported package on ONNX Runtime (CPU/CUDA), OpenVINO or PyTorch."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import click

from diffit_port import samplers
from diffit_port.checkpoint import CheckpointError
from diffit_port.outputs import Writer, discard_all, finish_all
from diffit_port.package import Package, PackageError, default_package_path, load_package

from .base import RUNTIMES, Denoiser, RuntimeUnavailable, auto_runs_openvino, create_denoisers, is_cpu, split_devices
from .cli_options import check_guidance, factory_options, parse_int_list, session_devices
from .cli_outputs import RuntimeMissing, check_outputs, open_writers, reraise_cleanly
from .fastest import Flags, detect_host, requested_device, resolve
from .generate import (SamplingConfig, check_config, cycle_labels, default_labels, image_shape, num_calls, split_evenly,
                       stream)

DEFAULT_OUTPUT = Path("diffit-samples.png")

EPILOG = """\b
Examples:
  diffit-run                                     # the embedded digits model, writes diffit-samples.png
  diffit-run --package pkg/ --runtime onnx-cpu --sampler ddim --steps 20 --num-images 8
  diffit-run --package pkg/ --runtime onnx-cuda --precision fp16 --batch-size 64 --cuda-graph
  diffit-run --package pkg/ --runtime onnx-cuda --device-loop --cuda-graph    # no host round trip per step
  diffit-run --package pkg/ --fastest --batch-size 256    # CUDA: fp16, CUDA graphs, the device loop; CPU: bf16
  diffit-run --package pkg/ --runtime onnx-cuda --devices 0,1 --num-images 256
  diffit-run --package pkg/ --runtime openvino --device CPU --labels 3,5 --guidance 2 --cfg in-graph
  diffit-run --package pkg/ --runtime onnx-cpu --devices cpu,cpu --threads 1   # two CPU sessions
  diffit-run --runtime openvino --int8 --cache-dir int8-cache/   # int8 convolutions, calibrated once
  diffit-run --num-images 10000 --output-dir samples/ --save-npy samples.npy    # written as they are made

\b
Outputs are written while sampling runs (memory does not grow with --num-images) into temporary files
next to their names, and appear under their names only when the whole run succeeded: a failed run
(a NaN in the denoiser output, a full disk, Ctrl-C) leaves any previous file untouched. Exit codes:
0 done, 1 runtime or I/O error, 2 usage error.
"""


def summary_line(denoisers: list[Denoiser], cfg: SamplingConfig, wall: float) -> str:
    """The run in one line; batch= is the largest batch a call ran (fewer images than --batch-size run as one
    smaller batch, split over the sessions first)."""
    d = denoisers[0]
    devices = ",".join(x.device for x in denoisers)
    batch = max(min(cfg.batch_size, b - a) for a, b in split_evenly(cfg.num_images, len(denoisers)))
    return (f"runtime={d.name} provider={d.provider.replace(' ', '_')} device={devices} precision={d.precision} "
            f"sampler={cfg.sampler} steps={cfg.steps} images={cfg.num_images} batch={batch} "
            f"cfg={cfg.cfg} guidance={cfg.guidance:g} wall={wall:.2f}s images/s={cfg.num_images / wall:.3f}")


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--package", "package_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Package directory made by diffit-export (default: the embedded digits model).")
@click.option("--runtime", type=click.Choice(["auto", *RUNTIMES]), default="auto", show_default=True,
              help="auto = onnx-cuda if a CUDA session starts, else onnx-cpu (openvino on a host that has openvino "
                   "but not onnxruntime).")
@click.option("--sampler", type=click.Choice(samplers.SAMPLER_NAMES), default=None,
              help="eps packages: ddpm, ddim, dpmpp-2m, heun; EDM packages: heun, edm-stochastic, dpmpp-2m. "
                   "Default: the package's sampling.sampler.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Default: the package's sampling.steps.")
@click.option("--eta", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="DDIM eta.")
@click.option("--clip-denoised/--no-clip-denoised", default=None,
              help="Clip each x0 estimate (eps) or D (EDM) to [-1, 1] while sampling. Default: the package's "
                   "sampling.clip_denoised (on for pixel-space eps models, off for latents and EDM).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per denoiser call and session (sampler-side guidance doubles the call).")
@click.option("--labels", default=None, metavar="0,1,...",
              help="Class labels, cycled over the images (default: every class in turn; the null label "
                   "for an unconditional package). num_classes itself is the null label.")
@click.option("--guidance", type=float, default=None, callback=check_guidance,
              help="Classifier-free guidance scale, finite and >= 0 (1 = off). Default: the package's "
                   "sampling.guidance.")
@click.option("--guidance-schedule", type=click.Choice(["constant", "power-cosine"]), default=None,
              help="power-cosine: eps packages only. Default: the package's sampling.guidance_schedule.")
@click.option("--cfg", "cfg_mode", type=click.Choice(["sampler", "in-graph"]), default="sampler", show_default=True,
              help="sampler: double the batch around the step; in-graph: the package's denoiser_cfg graph.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"PNG grid (values clipped to [-1, 1]). Default: {DEFAULT_OUTPUT}, or none with --output-dir.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Also write one PNG per image, DIR/000000.png, ... (DIR must be new or empty).")
@click.option("--scale", type=click.IntRange(min=0), default=0, show_default=True,
              help="Upscale each tile of the PNG this many times (nearest neighbour); 0 = enough to make "
                   "tiles at least 96 pixels wide.")
@click.option("--save-npy", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.npy",
              help="Also write the raw final samples, float32 (N, C, H, W), NOT clipped.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (onnx-cuda, torch) or an OpenVINO device "
              "(CPU, GPU.0, AUTO:GPU,CPU ...).")
@click.option("--devices", default=None, metavar="0,1,...",
              help="One session per device, images split across them in order (onnx-cpu: cpu,cpu).")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "fp16", "bf16"]), default=None,
              help="Default fp32 (the package's own precision for onnx-cpu). tf32: onnx-cuda/torch on CUDA; "
                   "fp16: onnx-cuda, openvino, torch on CUDA; bf16: openvino, torch.")
@click.option("--tf32", is_flag=True, help="Allow TF32 matmuls on CUDA (off by default for fp32 parity).")
@click.option("--cuda-graph", is_flag=True, help="onnx-cuda: capture CUDA graphs (static batch).")
@click.option("--device-loop", is_flag=True,
              help="onnx-cpu/onnx-cuda: keep x and the sampler state on the session's device; each step is one "
                   "run of the denoiser with the sampler update appended (sampler-side guidance only). With "
                   "--cuda-graph the next batch's inputs are prepared while a batch runs.")
@click.option("--fastest", is_flag=True,
              help="The fastest measured setting for this host and the package's model (docs/BENCHMARKS.md). onnx-cuda"
                   " (auto with CUDA, unless --device cpu or --devices cpu,...): image models --precision fp16 --unet-"
                   "fusions --separate-qkv --cuda-graph --device-loop, latent models --precision fp16 --time-token-"
                   "gemm --cuda-graph --device-loop (no --device-loop with --cfg in-graph). openvino (auto on the CPU,"
                   " where it is installed): --precision bf16 on a CPU that has it. onnx-cpu: its defaults. Options "
                   "given beside it win (--precision, --tf32, --no-fusions, --separate-qkv on a latent model). A step "
                   "in fp16 is ~1e-3 from fp32, in bf16 ~1e-2 (docs/PARITY.md).")
@click.option("--no-mha", is_flag=True,
              help="onnx-cuda, onnx-cpu: run the attention through the package's function body, as shipped, instead "
                   "of onnxruntime's MultiHeadAttention.")
@click.option("--no-fusions", is_flag=True,
              help="onnx-cuda: skip onnxruntime's transformer fusions. onnx-cpu: keep each GELU as exported instead of "
                   "one FastGelu.")
@click.option("--unet-fusions", is_flag=True,
              help="onnx-cuda: also onnxruntime's diffusion-UNet fusions (GroupNorm+SiLU as one kernel, NHWC "
                   "convolutions): the fastest image-model graphs, but their GroupNorm sums in a varying order, so "
                   "runs differ in the last bits.")
@click.option("--separate-qkv", is_flag=True,
              help="onnx-cuda: q, k and v as three MatMuls, the key's bias and time term dropped (they cancel "
                   "in the softmax): 3-8% faster.")
@click.option("--time-token-gemm", is_flag=True,
              help="onnx-cuda, latent models: as --separate-qkv, with the per-sample time token inside the q and v "
                   "MatMuls (a one-hot column per row of the call) instead of an add after each: latent-xl2-256 "
                   "70.8 vs 72.6 ms per call at 128 rows; it gains up to ~256 rows per call and loses beyond.")
@click.option("--fp16-attention", is_flag=True,
              help="onnx-cuda fp32/tf32: only the attention in float16 (fused kernels; step error ~3e-4).")
@click.option("--no-pack-windows", is_flag=True,
              help="onnx-cuda: attend over each short window alone. By default windows of under 64 tokens are "
                   "packed several to a sequence (four 4x4 windows fill the fused kernels' 64-row tiles; a "
                   "block-diagonal bias keeps each window to itself; image-cifar10 1.3x faster per call).")
@click.option("--no-fold-biases", is_flag=True,
              help="onnx-cuda: keep each bias add where the exporter put it. By default the bias of a convolution "
                   "moves into the norm or SkipGroupNorm that reads it, and the MLP biases into FastGelu and "
                   "SkipGroupNorm (no separate bias kernels; image models 10% faster per call with --unet-fusions).")
@click.option("--ov-attention", type=click.Choice(["inline", "sdpa"]), default=None,
              help="openvino: inline the function body (default) or lower it to ScaledDotProductAttention.")
@click.option("--streams", "--ov-streams", "streams", type=click.IntRange(min=1), default=None,
              help="onnx-cpu, openvino: run each call as this many row chunks at once, one CPU stream each "
                   "(default: 2 on the CPU, each with half the cores; onnx-cpu: 1 when --threads is given or the "
                   "weights are over 256 MiB, as each stream holds a copy; openvino on other devices: 1).")
@click.option("--cache-dir", "--ov-cache-dir", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="openvino: its CACHE_DIR (compiled models). With --int8 (onnx-cpu, openvino): also keeps the "
                   "calibrated int8 model, so that later runs of the same package skip the calibration.")
@click.option("--int8", is_flag=True, help="onnx-cpu, openvino: int8 convolutions of an image model, calibrated at "
              "load on a short run of the package's default sampling (a few seconds; openvino needs NNCF: pip install "
              "\"diffit-port[int8]\"). openvino, latent models: int8 weight compression, the arithmetic in float.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="torch: weights to use instead of the package's embedded checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads per session.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration as JSON and exit.")
def main(package_dir: Path | None, runtime: str, sampler: str | None, steps: int | None, eta: float,
         clip_denoised: bool | None, seed: int, num_images: int, batch_size: int, labels: str | None,
         guidance: float | None, guidance_schedule: str | None, cfg_mode: str, output: Path | None,
         output_dir: Path | None, scale: int, save_npy: Path | None, device: str | None, devices: str | None,
         fastest: bool, no_progress: bool, dry_run: bool, **flags: Any) -> None:
    """Sample a grid of images from a diffit package (the denoiser step runs on the chosen runtime; the
    sampler, noise and guidance are the same NumPy code on every runtime, so --seed S gives the same
    images everywhere up to the runtime's arithmetic). One summary line goes to stdout at the end."""
    package = _load(package_dir)
    if fastest:
        runtime = _fastest(runtime, package, cfg_mode == "in-graph", requested_device(device, devices), flags)
    elif runtime == "auto" and auto_runs_openvino() and all(map(is_cpu, [device or "cpu", *split_devices(devices)])):
        runtime = "openvino"
        click.echo("note: onnxruntime is not installed, so --runtime auto runs openvino", err=True)
    # Options left unset (None) take the package's sampling defaults; the result is checked against the
    # package (a denoiser_cfg graph for --cfg in-graph, guidance 1 for an unconditional package) before
    # any session opens, as a usage error (exit code 2).
    cfg = SamplingConfig.from_package(
        package, sampler=sampler, steps=steps, seed=seed, num_images=num_images, batch_size=batch_size,
        guidance=guidance, guidance_schedule=guidance_schedule, cfg=cfg_mode, eta=eta, clip_denoised=clip_denoised,
        device_loop=flags["device_loop"])
    if runtime == "onnx-cpu" and flags["cache_dir"] and not flags["int8"]:
        raise click.UsageError("--cache-dir applies to onnx-cpu with --int8 (it keeps the calibrated int8 graph)")
    if cfg.device_loop and runtime not in ("auto", "onnx-cpu", "onnx-cuda"):
        raise click.UsageError(f"--device-loop applies to onnx-cpu and onnx-cuda, not {runtime}")
    if eta and cfg.sampler != "ddim":
        raise click.BadParameter("--eta applies to the ddim sampler only", param_hint="--eta")
    try:
        check_config(package, cfg)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    y = _labels(package, labels, num_images)
    opts = factory_options(runtime, package.model.kind == "latent", cfg.cfg == "in-graph", flags)
    targets = session_devices(runtime, device, devices)
    if output is None and output_dir is None:
        output = DEFAULT_OUTPUT
    check_outputs(package, output, output_dir, save_npy, flags["cache_dir"])
    if dry_run:
        click.echo(json.dumps({"package": str(package.root), "runtime": runtime, "devices": targets,
                               "runtime_options": {k: str(v) for k, v in opts.items()}, "sampling": cfg.to_dict(),
                               "labels": y.tolist(), "output": str(output) if output else None,
                               "output_dir": str(output_dir) if output_dir else None,
                               "save_npy": str(save_npy) if save_npy else None}, indent=2))
        return
    if output is not None and image_shape(package)[0] not in (1, 3) and not package.has_graph("vae_decoder"):
        click.echo(f"note: no vae_decoder in the package; {output} shows raw latent channels", err=True)
    writers = open_writers(package, cfg.num_images, output, output_dir, save_npy, scale)
    if flags["int8"] and not no_progress and not _int8_cached(runtime, package, opts):
        click.echo("calibrating the int8 convolutions on a short fp32 sampling run ...", err=True)
    try:
        denoisers = _open_sessions(runtime, package, targets, opts)
        try:
            wall = _sample(denoisers, package, cfg, y, writers, targets[0], progress=not no_progress)
        finally:
            for d in denoisers:
                d.close()
        finish_all(writers)
    except BaseException as e:
        discard_all(writers)
        reraise_cleanly(e)
    click.echo(summary_line(denoisers, cfg, wall))


def _labels(package: Package, labels: str | None, num_images: int) -> Any:
    """The class label of each image: --labels cycled, else the package's default spread."""
    label_list = parse_int_list(labels, "--labels")
    try:
        return default_labels(package, num_images) if label_list is None else cycle_labels(label_list, num_images,
                                                                                          package)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--labels") from None


def _sample(denoisers: list[Denoiser], package: Package, cfg: SamplingConfig, y: Any, writers: list[Writer],
            device: str | None, progress: bool) -> float:
    """Run the sampler, decoding (VAE) and writing each batch as it finishes; returns the wall time."""
    decode = None
    if package.has_graph("vae_decoder"):
        from .vae import create_vae_decoder

        decode = create_vae_decoder(package, denoisers[0].name, device)

    def sink(start: int, x0: Any) -> None:
        images = decode(x0, batch_size=cfg.batch_size) if decode is not None else x0
        for w in writers:
            w.write(start, images)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_calls(cfg, len(denoisers)), desc=f"diffit-run {denoisers[0].name}",
                   unit="call", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        stream(denoisers, package, cfg, y, sink, on_call=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return time.perf_counter() - start


def _fastest(runtime: str, package: Package, in_graph: bool, device: str | None, flags: dict[str, Any]) -> str:
    """The runtime of --fastest on this host (runtimes/fastest.py), its options written into `flags`; a note on
    stderr where it runs onnx-cpu for want of OpenVINO."""
    given = Flags(**{f.name: flags[f.name] for f in fields(Flags)})
    try:
        runtime, chosen, note = resolve(runtime, given, detect_host(runtime, device),
                                        latent=package.model.kind == "latent", in_graph=in_graph, device=device)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if note:
        click.echo(note, err=True)
    flags.update(asdict(chosen))
    return runtime


def _load(package_dir: Path | None) -> Package:
    path = package_dir if package_dir is not None else default_package_path()
    if not (path / "manifest.json").is_file():
        hint = ("the embedded default package is not built yet; pass --package DIR"
                if package_dir is None else "pass the directory diffit-export wrote")
        raise click.ClickException(f"no diffit package at {path} ({hint})")
    try:
        return load_package(path)
    except PackageError as e:
        raise click.ClickException(str(e)) from None


def _int8_cached(runtime: str, package: Package, opts: dict[str, Any]) -> bool:
    """Whether an --int8 run calibrates nothing at load (ort_int8.int8_cached, openvino_rt.int8_cached), imported
    here: they bring onnx (0.7 s), which other runs need not import."""
    if runtime == "onnx-cpu":
        from .ort_int8 import int8_cached
    else:
        from .openvino_rt import int8_cached
    return int8_cached(package, opts)


def _quiet_onnxruntime() -> None:
    """onnxruntime's process-wide log off for diffit-run: its CUDA EP logs as errors what it recovers from (cuDNN's
    "No execution plans support the graph", a dozen red lines a run with --fastest on an H100), and its warnings
    (an unused initializer) are for model authors. What fails raises, and diffit-run reports it in one line."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(4)    # FATAL only


def _open_sessions(runtime: str, package: Package, targets: list[str | None], opts: dict[str, Any]) -> list[Denoiser]:
    """Every session starts before anything is sampled or written, all from one preparation of the graph
    (create_denoisers closes the opened ones if a later one fails); a missing backend exits with code 2."""
    if runtime in ("auto", "onnx-cpu", "onnx-cuda"):
        _quiet_onnxruntime()
    try:
        return create_denoisers(runtime, package, targets, **opts)
    except RuntimeUnavailable as e:
        raise RuntimeMissing(str(e)) from None
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, PackageError) as e:
        raise click.UsageError(str(e)) from None


if __name__ == "__main__":  # pragma: no cover
    main()
