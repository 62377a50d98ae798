"""`python -m diffit_port.train`: train a DiffiT (AdamW, warmup, EMA, bf16, DDP), resumable bit for bit."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
import numpy as np

if __name__ == "__main__":   # a runtime-only install: one line naming the extra, not an import traceback
    from .extras import exit_if_missing

    exit_if_missing("python -m diffit_port.train", "torch")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .atomic import write_text
from .checkpoint import (CheckpointError, make_checkpoint, read_checkpoint, sampling_defaults, save_atomic,
                         state_dict_problem)
from .config import PREDICTIONS, PRESETS, Preset
from .data import DataError, load_dataset, save_grid
from .diffusion import numpy_denoiser, training_objective
from .edm import denoiser_step
from .models import build_model, count_parameters
from .optim import EMA, make_optimizer, parameter_digest, train_step
from .randomness import BatchOrder, rng_state, set_rng_state, step_randomness
from .rundir import CONFIG, FINAL, LATEST, METRICS, RunDirError, check_run_dir, trim_metrics, write_metrics
from .runlock import RunLocked, run_lock
from .samplers import NoiseSource, NonFiniteError, sample_batches, schedule_from_config
from .samplers.run import AnySchedule
from .train_config import (DistEnv, TrainConfig, TrainError, TrainFailed, dist_env_from_environ, ema_decay_at,
                           learning_rate, resolve_config)


# --------------------------------------------------------------------------------------------
# Sample grids through the NumPy samplers
# --------------------------------------------------------------------------------------------

def sample_grid(ema: nn.Module, preset: Preset, schedule: AnySchedule, device: torch.device, path: Path,
                seed: int, rows: int = 4) -> Path | None:
    """Draw a grid with the preset's sampler, steps and guidance: one column per class (up to 10) and
    `rows` rows, the same noise every time. Skipped (None) for models without 1 or 3 channels (latents)."""
    cfg = preset.model
    if cfg.in_channels not in (1, 3):
        return None
    cols = min(cfg.num_classes, 10) if cfg.num_classes else 4
    y = np.tile(np.arange(cols), rows).astype(np.int64) if cfg.num_classes else np.full(cols * rows, cfg.null_label)
    step = numpy_denoiser(denoiser_step(ema, preset.diffusion), device)
    x0 = sample_batches(preset.sampler, step, NoiseSource(seed, len(y)),
                        (cfg.in_channels, cfg.image_size, cfg.image_size), y, schedule, preset.steps,
                        batch_size=len(y), null_label=cfg.null_label if cfg.num_classes else None,
                        guidance=preset.guidance, guidance_schedule=preset.guidance_schedule,
                        guide_channels=preset.guide_channels, clip_denoised=preset.clip_denoised)
    return save_grid(x0, path, nrow=cols)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, env: DistEnv = DistEnv(), resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue, with `resume`) the training described by `cfg`; returns the final metrics.
    Rank 0 holds the run directory's lock (diffit_port.runlock) for the whole run; a new run into a non-empty
    directory is refused unless `overwrite` replaces a previous run. Under torchrun the process group must
    already be initialised (see `main`)."""
    out = Path(cfg.out)
    if env.rank != 0:
        return _train_locked(cfg, env, resume)
    made = not out.exists()
    try:
        with run_lock(out):
            check_run_dir(out, resume, overwrite)
            return _train_locked(cfg, env, resume)
    finally:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()                          # a run refused before writing anything leaves no directory


def _restore(latest: Path, cfg: TrainConfig, preset: Preset, model: nn.Module, ema: nn.Module,
             opt: torch.optim.Optimizer) -> int:
    """Loads the run being resumed from `latest` into model, EMA, optimizer and the RNGs, after checking it is
    the same run (preset, seed, batch, data, model and diffusion config); returns its step."""
    mcfg = preset.model
    ckpt = read_checkpoint(latest, map_location="cpu")
    missing = [k for k in ("opt", "step", "rng", "train_config", "ema") if ckpt.get(k) is None]
    if missing:
        raise CheckpointError(f"{latest} is not a training checkpoint (it lacks {', '.join(missing)}); "
                              "cannot resume from it")
    if ckpt["preset"] != cfg.preset:
        raise TrainError(f"{latest} was trained with preset {ckpt['preset']!r}, not {cfg.preset!r}")
    old = ckpt["train_config"]
    for key in ("seed", "batch_size", "data"):
        if old[key] != getattr(cfg, key):
            raise TrainError(f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from the run being "
                             f"resumed ({old[key]}); the data order would change")
    if ckpt["model_config"] != mcfg.to_dict() or ckpt["diffusion_config"] != preset.diffusion.to_dict():
        raise TrainError(f"{latest} was trained with another model or diffusion config (prediction "
                         f"{ckpt['diffusion_config'].get('prediction')!r}, dropout "
                         f"{ckpt['model_config'].get('dropout', 0.0)}); resume it with the same "
                         f"--prediction and --dropout")
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{latest}: its state does not fit preset {cfg.preset} "
                              f"({state_dict_problem(e)})") from None
    return int(ckpt["step"])


def _start_run_files(out: Path, cfg: TrainConfig, preset: Preset, model: nn.Module, data: Any, env: DistEnv,
                     resume: bool, start: int) -> list[str]:
    """Rank 0: writes DIR/config.json and clears temporary files a killed run left; returns the metrics lines
    to keep (those up to `start` when resuming, which metrics.jsonl is rewritten from at every log)."""
    mcfg = preset.model
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG, json.dumps({
        "train": cfg.to_dict(), "model": mcfg.to_dict(), "diffusion": preset.diffusion.to_dict(),
        "world_size": env.world_size, "parameters": count_parameters(model), "num_examples": len(data),
        "data_source": data.source, "torch": torch.__version__}, indent=2) + "\n")
    for stale in [*out.glob(".*.tmp"), *out.glob("samples/.*.tmp")]:   # left by a run killed mid-write
        stale.unlink()
    return trim_metrics(out / METRICS, start) if resume else []


class _Meter:
    """The training metrics since the last log line: sums of (loss, mse, vb, grad_norm) on the device, averaged
    over the ranks when taken."""

    def __init__(self, device: torch.device, world_size: int, batch_size: int):
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)
        self.world_size, self.batch_size = world_size, batch_size
        self.steps, self.since = 0, time.perf_counter()

    def add(self, step_metrics: torch.Tensor) -> None:
        self.sums += step_metrics.double()
        self.steps += 1

    def take(self, step: int, lr: float) -> dict[str, Any]:
        """The log line for `step` (TrainFailed on a non-finite loss); starts the next window."""
        if self.world_size > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world_size
        loss, mse, vb, grad_norm = (self.sums / self.steps).tolist()
        line = {"step": step, "loss": loss, "mse": mse, "vb": vb, "lr": lr, "grad_norm": grad_norm,
                "img_per_s": self.steps * self.batch_size / (time.perf_counter() - self.since)}
        if not math.isfinite(loss):
            raise TrainFailed(f"loss is {loss} at step {step}; lower --lr or set --grad-clip")
        self.sums.zero_()
        self.steps, self.since = 0, time.perf_counter()
        return line


def _replica_digest(model: nn.Module, env: DistEnv) -> str:
    """The parameters' sha256, printed per rank; under torchrun every rank's must agree (else RuntimeError)."""
    digest = parameter_digest(model)
    print(f"rank {env.rank}/{env.world_size} parameters sha256 {digest}", file=sys.stderr, flush=True)
    if env.world_size > 1:
        digests: list[str | None] = [None] * env.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the replicas diverged: parameter digests {digests}")
        dist.barrier()
    return digest


def _train_locked(cfg: TrainConfig, env: DistEnv, resume: bool) -> dict[str, Any]:
    preset = cfg.preset_config()
    mcfg = preset.model
    out = Path(cfg.out)
    is_main = env.rank == 0
    device = torch.device(f"cuda:{env.local_rank}" if cfg.device == "cuda" else "cpu")
    if cfg.batch_size % env.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} ranks")
    local_batch = cfg.batch_size // env.world_size
    latest = out / LATEST
    if resume and not latest.exists():
        raise TrainError(f"--resume: {latest} does not exist")

    # Data, model, EMA, optimizer.
    data = load_dataset(cfg.data, mcfg.image_size, mcfg.in_channels)
    if mcfg.num_classes and int(data.labels.max()) >= mcfg.num_classes:
        raise TrainError(f"{data.source} has labels up to {int(data.labels.max())} but preset {preset.name} "
                         f"has {mcfg.num_classes} classes")
    images = torch.from_numpy(data.images).to(device)                      # (N, C, H, W), all on the device
    labels = torch.from_numpy(data.labels).to(device)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = _restore(latest, cfg, preset, model, ema, opt) if resume else 0
    ema_avg = EMA(ema, model)
    schedule = schedule_from_config(preset.diffusion)
    objective = training_objective(preset.diffusion, device)
    order = BatchOrder(cfg.seed, len(data), cfg.batch_size, device)

    step_model: nn.Module = model
    if env.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        step_model = torch.compile(step_model)

    metrics = _start_run_files(out, cfg, preset, model, data, env, resume, start) if is_main else []

    def save(step: int, paths: tuple[str, ...]) -> None:
        if not is_main:
            return
        ckpt = make_checkpoint(model, preset=cfg.preset, diffusion=preset.diffusion, sampling=sampling_defaults(preset),
                               ema=ema, opt=opt.state_dict(), step=step, train_config=cfg.to_dict(),
                               data_state=order.state(step), rng=rng_state())
        for name in paths:
            save_atomic(ckpt, out / name)

    def grid(step: int) -> None:
        if is_main and cfg.sample_every > 0:
            try:
                sample_grid(ema, preset, schedule, device, out / "samples" / f"step-{step:06d}.png", cfg.seed)
            except NonFiniteError as e:
                raise TrainFailed(f"the sample grid of step {step} stopped: {e} on the torch runtime "
                                  f"({device.type}); no grid was written") from None

    meter = _Meter(device, env.world_size, cfg.batch_size)
    last: dict[str, Any] = {}
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    shape = (mcfg.in_channels, mcfg.image_size, mcfg.image_size)
    lo, hi = env.rank * local_batch, (env.rank + 1) * local_batch
    bar = tqdm(total=cfg.steps, initial=start, disable=not is_main, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0, desc=f"train {cfg.preset}")
    model.train()
    for step in range(start, cfg.steps):
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order.indices(step, lo, hi)
        t, noise, drop = step_randomness(cfg.seed, step, cfg.batch_size, shape, objective, cfg.label_dropout,
                                         device)
        t, noise, drop = t[lo:hi], noise[lo:hi], drop[lo:hi]
        x0, y = images[idx], labels[idx]
        y = torch.where(drop, mcfg.null_label, y) if mcfg.num_classes else torch.full_like(y, mcfg.null_label)
        meter.add(train_step(step_model, model, ema_avg, opt, objective, x0, t, y, noise, bf16=cfg.bf16,
                             max_norm=max_norm, decay=ema_decay_at(cfg, step)))
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:
            last = meter.take(done, lr)
            if is_main:
                metrics.append(json.dumps(last))
                write_metrics(out / METRICS, metrics)
                tqdm.write(json.dumps(last), file=sys.stdout)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
        if cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0 and done < cfg.steps:
            save(done, (LATEST,))
        if cfg.sample_every > 0 and done % cfg.sample_every == 0 and done < cfg.steps:
            grid(done)
    bar.close()

    final = max(start, cfg.steps)
    save(final, (LATEST, FINAL))
    grid(final)
    return {**last, "step": final, "parameters_sha256": _replica_digest(model, env)}


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="digits", help="Model and diffusion preset.")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help="Train the preset's model as an eps predictor on the discrete VP process, or with EDM's "
                   "preconditioning, log-normal noise levels and loss weight [default: the preset's].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Dropout in the image-space ResBlocks, before their conv [default: the preset's, e.g. 0.13 "
                   "for image-cifar10, 0 for digits].")
@click.option("--data", default="digits", metavar="digits|DIR|FILE.npz",
              help="'digits' (scikit-learn, train split), an image folder with one subfolder per class, or an "
                   ".npz with `images` channels-last, (N, H, W) or (N, H, W, C) = NHWC (uint8 pixels or float "
                   "model-space values), and integer `labels` (N,).")
@click.option("--out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Run directory [default: runs/<preset>].")
@click.option("--steps", type=click.IntRange(1), default=10_000, help="Total optimizer steps.")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="Global batch over all ranks.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, help="AdamW peak learning rate.")
@click.option("--warmup", type=click.IntRange(0), default=0, help="Linear learning-rate warmup steps.")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, help="AdamW weight decay.")
@click.option("--grad-clip", type=click.FloatRange(0), default=1.0, help="Max global gradient norm (0 = off).")
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.9999,
              help="EMA decay; lower it (e.g. 0.999) for short runs.")
@click.option("--ema-warmup/--no-ema-warmup", default=True,
              help="Use min(decay, (1+n)/(10+n)) at update n, so the EMA tracks early training.")
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=None,
              help="P(label -> null label) for guidance [default: the preset's, 0.1].")
@click.option("--seed", type=click.IntRange(0), default=0, help="Seeds the model init, data order and noise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast [default: on with CUDA].")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (forward and backward).")
@click.option("--deterministic", is_flag=True, help="Deterministic CUDA kernels (bit-exact resume on GPUs; slower).")
@click.option("--ckpt-every", type=click.IntRange(0), default=1000, help="Checkpoint period in steps (0 = end only).")
@click.option("--sample-every", type=click.IntRange(0), default=1000, help="Sample-grid period (0 = none).")
@click.option("--log-every", type=click.IntRange(1), default=50, help="Metrics period in steps.")
@click.option("--resume", is_flag=True, help="Continue from DIR/checkpoint-latest.pt up to --steps.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in DIR, deleting the previous run's checkpoints, metrics and grids there.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration as JSON and exit.")
@click.pass_context
def main(ctx: click.Context, resume: bool, overwrite: bool, dry_run: bool, **opts: Any) -> None:
    """Train a DiffiT denoiser; writes DIR/metrics.jsonl, DIR/samples/step-XXXXXX.png and
    DIR/checkpoint-{latest,final}.pt. With --resume, options not given on the command line are taken
    from DIR/config.json (the run being continued), so `--out DIR --resume` is all a restart needs.
    A new run needs an empty DIR (or --overwrite of a previous run); DIR/train.lock keeps a second
    training out of DIR while one runs. Every file is written atomically (a kill -9 at any moment leaves
    the previous checkpoint intact). Exit codes: 0 done, 1 the run failed, 2 usage error.

    \b
    Examples:
      python -m diffit_port.train --preset digits --steps 18000 --lr 3e-4 --warmup 500 --ema-decay 0.9995
      python -m diffit_port.train --preset digits-edm --steps 8000 --lr 3e-4 --warmup 200 --ema-decay 0.999
      python -m diffit_port.train --preset image-cifar10 --data cifar.npz --prediction eps --dropout 0
      python -m diffit_port.train --out runs/digits --resume                 # after a crash or a kill
      python -m diffit_port.train --out runs/digits --resume --steps 30000   # train on
      torchrun --nproc_per_node=8 -m diffit_port.train --preset latent-xl2-256 --data latents.npz
    """
    given = {k for k in opts if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if resume and overwrite:
        raise click.UsageError("--resume continues a run and --overwrite replaces it: give one of them")
    try:
        cfg = resolve_config(opts, given, resume)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    p = cfg.preset_config()
    device, deterministic = cfg.device, cfg.deterministic
    env = dist_env_from_environ()
    if dry_run:
        click.echo(json.dumps({"train": cfg.to_dict(), "resume": resume, "world_size": env.world_size,
                               "model": p.model.to_dict(), "diffusion": p.diffusion.to_dict()}, indent=2))
        return
    # Process-wide switches belong here, not at import time.
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic CUDA kernel warns (naming itself) instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device == "cuda":
            # The float attention mask (the relative position bias) selects the memory-efficient SDPA kernel,
            # whose backward is not deterministic and only warns here: use the math kernel instead.
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
    if env.world_size > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        try:
            result = train(cfg, env, resume=resume, overwrite=overwrite)
        except (TrainError, DataError, RunDirError) as e:
            raise click.UsageError(str(e)) from None
        except (TrainFailed, RunLocked, CheckpointError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or cfg.out}: {e.strerror or e}") from None
        if env.rank == 0:
            click.echo(json.dumps({"final": result, "out": cfg.out}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
