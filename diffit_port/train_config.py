"""What a training run is: its configuration (TrainConfig, stored in every checkpoint), its place in a torchrun
job, its learning-rate and EMA schedules, and how command-line options resolve into a config."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Preset, get_preset, with_formulation
from .rundir import CONFIG


class TrainError(RuntimeError):
    """A run that cannot start or continue as asked (the CLI shows the message as a usage error)."""


class TrainFailed(RuntimeError):
    """A run that stopped on the way (non-finite loss or sample grid); the CLI exits with code 1."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint and in DIR/config.json."""

    preset: str = "digits"
    prediction: str = "eps"              # "eps" or "edm" (resolved: the preset's unless overridden)
    dropout: float = 0.0                 # image ResBlock dropout (resolved: the preset's unless overridden)
    data: str = "digits"                 # "digits", an image folder (one subfolder per class) or an .npz
    out: str = "runs/digits"
    steps: int = 10_000                  # total optimizer steps (a resumed run continues up to this)
    batch_size: int = 256                # global batch, split evenly over the ranks
    lr: float = 1e-4                     # AdamW peak learning rate (DiT, ADM)
    warmup: int = 0                      # linear warmup steps from 0 to lr; constant afterwards (DiT)
    weight_decay: float = 0.0            # DiT uses none
    grad_clip: float = 1.0               # max global grad norm; 0 = no clipping (the norm is still logged)
    ema_decay: float = 0.9999            # paper App. I.2
    ema_warmup: bool = True              # decay_n = min(ema_decay, (1 + n) / (10 + n)) for update n = 0, 1, ...
    label_dropout: float = 0.1           # P(y -> null label), for classifier-free guidance
    seed: int = 0
    device: str = "cpu"                  # resolved: "cpu" or "cuda"
    bf16: bool = False                   # bf16 autocast of the forward pass
    compile: bool = False                # torch.compile the training forward/backward
    deterministic: bool = False          # torch.use_deterministic_algorithms (bit-exact resume on CUDA)
    ckpt_every: int = 1000               # 0 = only at the end
    sample_every: int = 1000             # 0 = no sample grids
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def preset_config(self) -> Preset:
        """The preset with this run's prediction and dropout (what the checkpoints record)."""
        return with_formulation(get_preset(self.preset), self.prediction, self.dropout)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


# --------------------------------------------------------------------------------------------
# Schedules of the run (learning rate, EMA decay)
# --------------------------------------------------------------------------------------------

def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then constant (step is 0-based)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr


def ema_decay_at(cfg: TrainConfig, updates: int) -> float:
    """The EMA decay for update number `updates` (0-based). With `ema_warmup` the average starts short
    ((1 + n) / (10 + n), as TF's ExponentialMovingAverage with num_updates) so short runs are usable."""
    return min(cfg.ema_decay, (1.0 + updates) / (10.0 + updates)) if cfg.ema_warmup else cfg.ema_decay


def dist_env_from_environ() -> DistEnv:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process."""
    if "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


# What a resumed run takes from DIR/config.json unless given again (device and speed switches it does not).
INHERITED = ("preset", "prediction", "dropout", "data", "steps", "batch_size", "lr", "warmup", "weight_decay",
             "grad_clip", "ema_decay", "ema_warmup", "label_dropout", "seed", "ckpt_every", "sample_every", "log_every")


def resolve_config(opts: dict[str, Any], given: set[str], resume: bool) -> TrainConfig:
    """CLI options (click's parameter names) -> TrainConfig: the stored config fills what a resumed run
    was not given; "auto" becomes "cpu" or "cuda"; bf16 and label dropout get their defaults."""
    opts = dict(opts)
    out = Path(opts["out"] or f"runs/{opts['preset']}")
    if resume and (out / CONFIG).is_file():
        try:
            stored = json.loads((out / CONFIG).read_text())["train"]
            opts.update({k: stored[k] for k in INHERITED if k not in given and k in stored})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{out / CONFIG} is not a readable run config ({type(e).__name__}: {e}); "
                             "give every option again or choose another --out") from None
    device = opts["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    preset = get_preset(opts["preset"])
    dropout = opts["label_dropout"]
    prediction = opts["prediction"] or preset.diffusion.prediction
    model_dropout = preset.model.dropout if opts["dropout"] is None else opts["dropout"]
    with_formulation(preset, prediction, model_dropout)           # ValueError: e.g. EDM with learned variance
    return TrainConfig(
        preset=preset.name, prediction=prediction, dropout=model_dropout, data=opts["data"], out=str(out),
        steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"], warmup=opts["warmup"],
        weight_decay=opts["weight_decay"], grad_clip=opts["grad_clip"],
        ema_decay=opts["ema_decay"], ema_warmup=opts["ema_warmup"], seed=opts["seed"], device=device,
        label_dropout=preset.model.class_dropout_prob if dropout is None else dropout,
        bf16=(device == "cuda") if opts["bf16"] is None else opts["bf16"], compile=opts["compile_"],
        deterministic=opts["deterministic"], ckpt_every=opts["ckpt_every"], sample_every=opts["sample_every"],
        log_every=opts["log_every"])
