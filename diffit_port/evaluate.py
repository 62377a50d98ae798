"""`python -m diffit_port.evaluate`: class accuracy and Frechet distance of generated digits, any runtime."""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
from tqdm import tqdm

from .atomic import write_text
from .config import DiffusionConfig, ModelConfig
from .data import load_digits_split, resize_images
from .extras import missing, missing_message
from .images import save_grid, to_uint8
from .runtimes.cli import check_guidance
from .samplers import (SAMPLER_NAMES, NoiseSource, NonFiniteError, check_guidance_schedule, check_sampler,
                       num_denoiser_calls, sample_batches, schedule_from_config)
from .samplers.run import AnySchedule

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

JUDGE_SIZE = 16          # the classifier sees 16x16 (the digits are 8x8 at heart; 32x32 only slows it down)
JUDGE_HIDDEN = 128       # its hidden layer is the feature space of the Frechet distance


# --------------------------------------------------------------------------------------------
# The judge: an MLP trained on the real train split
# --------------------------------------------------------------------------------------------

def _pixels(images: np.ndarray) -> np.ndarray:
    """(N, 1, S, S) in [-1, 1] -> (N, 256) as the judge sees them: quantised to 8 bits like a saved PNG,
    then resized to 16x16 (Pillow bilinear, antialiased)."""
    quantised = to_uint8(images).astype(np.float32) / 127.5 - 1.0
    return resize_images(quantised, JUDGE_SIZE).reshape(len(images), -1)


@dataclass(frozen=True, eq=False)
class DigitsJudge:
    """A scikit-learn MLP (one hidden ReLU layer of 128) fitted on the real digits train split."""

    clf: Any                          # sklearn.neural_network.MLPClassifier
    heldout_accuracy: float           # on the 355 held-out digits

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) in [-1, 1] -> float64 (N, 128) hidden activations."""
        h = _pixels(images).astype(np.float64) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) -> int64 (N,) digit classes."""
        return self.clf.predict(_pixels(images)).astype(np.int64)


def fit_judge(seed: int = 0) -> DigitsJudge:
    """Fit the judge (about a second on one CPU core); seeded, so every evaluation uses the same one."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    train, held = load_digits_split("train", JUDGE_SIZE), load_digits_split("heldout", JUDGE_SIZE)
    clf = MLPClassifier(hidden_layer_sizes=(JUDGE_HIDDEN,), alpha=1e-3, max_iter=300, random_state=seed)
    # One BLAS thread: the matrices are small, and more threads only fight the sampler (or a neighbour).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")          # a ConvergenceWarning at max_iter is no reason to stop
        clf.fit(_pixels(train.images), train.labels)
    judge = DigitsJudge(clf, 0.0)
    acc = float(np.mean(judge.predict(held.images) == held.labels))
    return DigitsJudge(clf, acc)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to feature rows
    (Heusel et al. 2017). The trace of the square root is taken from the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which share them with S_a S_b: no complex parts, no sqrtm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    fd = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * np.sum(np.sqrt(np.clip(cross, 0, None)))
    return float(max(fd, 0.0))


# --------------------------------------------------------------------------------------------
# Generation and measurement
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    """What to sample for the measurement."""

    sampler: str = "dpmpp-2m"
    steps: int = 50
    guidance: float = 1.0             # classifier-free guidance scale (1 = off)
    guidance_schedule: str = "constant"
    guide_channels: int = 0
    clip_denoised: bool = True        # clip x_0 estimates to [-1, 1] (pixel-space digits)
    num_per_class: int = 100
    seed: int = 0
    batch_size: int = 250             # images per sampler run (guidance doubles the denoiser batch)


def generate(denoise: Denoise, model: ModelConfig, schedule: AnySchedule, cfg: EvalConfig, labels: np.ndarray,
             progress: bool = True) -> np.ndarray:
    """float64 (N, C, H, W) samples for `labels`; image i always gets noise stream i of `cfg.seed`, so the
    result does not depend on the batch size."""
    calls = num_denoiser_calls(cfg.sampler, cfg.steps)
    bar = tqdm(total=-(-len(labels) // cfg.batch_size) * calls, disable=not progress, file=sys.stderr,
               desc=f"sampling {cfg.sampler} x{cfg.steps}", dynamic_ncols=True, mininterval=1.0)
    out = sample_batches(cfg.sampler, denoise, NoiseSource(cfg.seed, len(labels)),
                         (model.in_channels, model.image_size, model.image_size), labels, schedule, cfg.steps,
                         batch_size=cfg.batch_size, null_label=model.null_label if model.num_classes else None,
                         guidance=cfg.guidance, guidance_schedule=cfg.guidance_schedule,
                         guide_channels=cfg.guide_channels, clip_denoised=cfg.clip_denoised,
                         callback=lambda i, n: bar.update(1))
    bar.close()
    return out


def evaluate(denoise: Denoise, model: ModelConfig, diffusion: DiffusionConfig, cfg: EvalConfig,
             judge: DigitsJudge | None = None, progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Measure a digits denoiser: (metrics, samples float64 (10 * num_per_class, 1, S, S) grouped by class).

    class_accuracy: the judge's agreement with the requested label. fd: Frechet distance in the judge's
    feature space between all samples and the 355 held-out digits. fd_real_floor: the same distance for
    as many real train-split digits (a seeded subset, at most all 1442) instead of samples: the value a
    perfect generator would get at this sample count, since FD is biased upwards for small sets.
    """
    if model.num_classes != 10 or model.in_channels != 1:
        raise ValueError(f"evaluation needs a 10-class, 1-channel digits model, got num_classes={model.num_classes}, "
                         f"in_channels={model.in_channels}")
    check_sampler(cfg.sampler, diffusion.prediction)
    check_guidance_schedule(diffusion.prediction, cfg.guidance_schedule)
    judge = judge or fit_judge(0)                             # one fixed judge: numbers compare across runs
    labels = np.repeat(np.arange(10, dtype=np.int64), cfg.num_per_class)
    t0 = time.perf_counter()
    x0 = generate(denoise, model, schedule_from_config(diffusion), cfg, labels, progress)
    seconds = time.perf_counter() - t0
    pred = judge.predict(x0)
    held = load_digits_split("heldout", model.image_size)
    train = load_digits_split("train", model.image_size)
    n_floor = min(len(labels), len(train))
    subset = np.random.default_rng(cfg.seed).choice(len(train), n_floor, replace=False)
    held_feats = judge.features(held.images)
    metrics = {
        "class_accuracy": float(np.mean(pred == labels)),
        "per_class_accuracy": [float(np.mean(pred[labels == k] == k)) for k in range(10)],
        "fd": frechet_distance(judge.features(x0), held_feats),
        "fd_real_floor": frechet_distance(judge.features(train.images[subset]), held_feats),
        "num_generated": int(len(labels)),
        "num_heldout": int(len(held)),
        "num_floor": int(n_floor),
        "judge": {"kind": "sklearn MLPClassifier", "input": f"{JUDGE_SIZE}x{JUDGE_SIZE}", "hidden": JUDGE_HIDDEN,
                  "heldout_accuracy": judge.heldout_accuracy},
        "sampling_seconds": seconds,
        "images_per_s": len(labels) / seconds,
        "prediction": diffusion.prediction,
        "denoiser_calls_per_image": num_denoiser_calls(cfg.sampler, cfg.steps),
        **{k: getattr(cfg, k) for k in ("sampler", "steps", "guidance", "guidance_schedule", "clip_denoised",
                                        "num_per_class", "seed")},
    }
    return metrics, x0


def _grid_order(num_per_class: int, rows: int) -> np.ndarray:
    """Indices of a grid with one column per class and `rows` rows (samples are grouped by class)."""
    return np.array([k * num_per_class + r for r in range(rows) for k in range(10)])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _from_checkpoint(path: Path, device: str) -> Source:
    import torch

    from .checkpoint import diffusion_config, load_model
    from .diffusion import numpy_denoiser
    from .edm import denoiser_step

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ckpt = load_model(path, use_ema=True, map_location=device)
    diffusion = diffusion_config(ckpt)
    return (numpy_denoiser(denoiser_step(model, diffusion), device), model.cfg, diffusion,
            dict(ckpt.get("sampling") or {}),
            f"torch ({device}, {'ema' if ckpt.get('ema') is not None else 'model'} weights)")


Source = tuple[Denoise, ModelConfig, DiffusionConfig, dict[str, Any], str]


def _from_package(path: Path, runtime: str, device: str, int8: bool = False, precision: str | None = None) -> Source:
    from .package import load_package
    from .runtimes.base import create_denoiser

    package = load_package(path)
    opts = {**({"int8": True} if int8 else {}), **({"precision": precision} if precision else {})}
    denoiser = create_denoiser(runtime, package, device=None if device == "auto" else device, **opts)
    return (denoiser, package.model, package.diffusion, dict(package.sampling),
            f"{denoiser.name} ({denoiser.device}, {denoiser.precision}{', int8' if int8 else ''})")


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A training checkpoint (EMA weights are used).")
@click.option("--package", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An exported package directory, run through --runtime.")
@click.option("--runtime", default="auto", metavar="NAME", help="Runtime for --package: auto, onnx-cpu, onnx-cuda, "
              "openvino or torch.")
@click.option("--device", default="auto", metavar="auto|cpu|cuda|...", help="Device of the denoiser.")
@click.option("--int8", is_flag=True, help="--runtime openvino: int8 weight compression (NNCF) at load; --runtime "
              "onnx-cpu: int8 convolutions, calibrated at load.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "fp16", "bf16"]), default=None,
              help="--package: the runtime's precision, as diffit-run's --precision (e.g. bf16 on openvino, what "
                   "diffit-run --fastest picks on a CPU that has it) [default: the runtime's own].")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default="dpmpp-2m",
              help="eps models: ddpm, ddim, dpmpp-2m, heun; EDM models: heun, edm-stochastic, dpmpp-2m.")
@click.option("--steps", type=click.IntRange(1), default=50,
              help="Sampler steps (heun and edm-stochastic call the denoiser 2 * steps - 1 times, the others once "
                   "per step).")
@click.option("--guidance", type=float, default=None, callback=check_guidance,
              help="CFG scale, finite and >= 0 (1 = off) [default: the model's own].")
@click.option("--clip-denoised/--no-clip-denoised", default=None,
              help="Clip each x0 estimate (eps) or D (EDM) to [-1, 1] [default: the model's own].")
@click.option("--num-per-class", type=click.IntRange(2), default=100, help="Samples per digit class.")
@click.option("--batch-size", type=click.IntRange(1), default=250, help="Images per sampler run.")
@click.option("--seed", type=click.IntRange(0), default=0)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval"), metavar="DIR",
              help="Writes DIR/metrics.json and DIR/samples.png.")
def main(checkpoint: Path | None, package: Path | None, runtime: str, device: str, int8: bool, precision: str | None,
         sampler: str, steps: int, guidance: float | None, clip_denoised: bool | None, num_per_class: int,
         batch_size: int, seed: int, out: Path) -> None:
    """Sample N digits per class from a checkpoint or package and measure them with a classifier fitted on
    the real train split: class accuracy, and the Frechet distance of its hidden features to the held-out
    digits beside the real-vs-real floor.

    \b
    Examples:
      python -m diffit_port.evaluate --checkpoint runs/digits/checkpoint-final.pt --out runs/digits/eval
      python -m diffit_port.evaluate --package digits-onnx --runtime onnx-cpu --steps 20 --num-per-class 20
      python -m diffit_port.evaluate --checkpoint runs/digits-edm/checkpoint-final.pt --sampler heun --steps 18
    """
    if (checkpoint is None) == (package is None):
        raise click.UsageError("give exactly one of --checkpoint and --package")
    if precision is not None and package is None:
        raise click.UsageError("--precision applies to --package (a checkpoint runs in fp32)")
    needs = missing("sklearn", *(("torch",) if checkpoint is not None or runtime == "torch" else ()))
    if needs:   # the judge is scikit-learn's; a checkpoint or --runtime torch runs PyTorch
        raise click.UsageError(missing_message("python -m diffit_port.evaluate", needs))
    from .checkpoint import CheckpointError
    from .package import PackageError

    try:
        if checkpoint is not None:
            denoise, model, diffusion, sampling, source = _from_checkpoint(checkpoint, device)
        else:
            if int8 and runtime not in ("openvino", "onnx-cpu"):
                raise click.UsageError("--int8 applies to --runtime openvino and onnx-cpu")
            denoise, model, diffusion, sampling, source = _from_package(package, runtime, device, int8, precision)
    except (CheckpointError, PackageError, RuntimeError) as e:   # RuntimeUnavailable is a RuntimeError too
        raise click.ClickException(str(e)) from None
    except ValueError as e:                                     # a precision the runtime does not have
        raise click.UsageError(str(e)) from None
    if guidance is None:
        guidance = float(sampling.get("guidance", 1.0))
    if clip_denoised is None:
        clip_denoised = bool(sampling.get("clip_denoised", not diffusion.is_edm))   # eps pixel models clip
    cfg = EvalConfig(sampler=sampler, steps=steps, guidance=guidance,
                     guidance_schedule=sampling.get("guidance_schedule", "constant"),
                     guide_channels=int(sampling.get("guide_channels", 0)),
                     clip_denoised=clip_denoised, num_per_class=num_per_class, seed=seed, batch_size=batch_size)
    try:
        metrics, x0 = evaluate(denoise, model, diffusion, cfg)
    except NonFiniteError as e:
        raise click.ClickException(f"stopped: {e} on the {source} runtime; nothing was written") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    finally:
        if hasattr(denoise, "close"):
            denoise.close()
    metrics = {"source": str(checkpoint or package), "runtime": source, **metrics}
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_grid(x0[_grid_order(num_per_class, min(num_per_class, 10))], out / "samples.png", nrow=10)
    click.echo(f"class accuracy {metrics['class_accuracy']:.4f} (judge on real held-out: "
               f"{metrics['judge']['heldout_accuracy']:.4f})  FD {metrics['fd']:.3f} (real-vs-real floor "
               f"{metrics['fd_real_floor']:.3f}, n={metrics['num_generated']})  {source}, {sampler} x{steps}, "
               f"guidance {cfg.guidance}")
    headline = ("prediction", "sampler", "steps", "denoiser_calls_per_image", "guidance", "clip_denoised",
                "class_accuracy", "fd", "fd_real_floor")
    click.echo(json.dumps({**{k: metrics[k] for k in headline}, "metrics": str(out / "metrics.json"),
                           "samples": str(out / "samples.png")}))


if __name__ == "__main__":
    main()
