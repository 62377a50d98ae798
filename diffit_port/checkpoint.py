"""Checkpoints as plain data: configs as dicts, tensors as state dicts, loadable with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import DiffusionConfig, ModelConfig, Preset, get_preset
from .models import build_model

CHECKPOINT_FORMAT = "diffit-checkpoint"
CHECKPOINT_VERSION = 1


def sampling_defaults(preset: Preset) -> dict[str, Any]:
    return {"sampler": preset.sampler, "steps": preset.steps, "guidance": preset.guidance,
            "guidance_schedule": preset.guidance_schedule, "guide_channels": preset.guide_channels,
            "clip_denoised": preset.clip_denoised}


def make_checkpoint(model: torch.nn.Module, *, preset: str | None, diffusion: DiffusionConfig,
                    sampling: dict[str, Any] | None = None, ema: torch.nn.Module | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The checkpoint dict: {"format", "version", "preset", "model_config", "diffusion_config", "sampling",
    "model", "ema", **extra} (extra: "opt", "step", "rng", ... as the training loop needs)."""
    if sampling is None:
        sampling = sampling_defaults(get_preset(preset)) if preset else {}
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "preset": preset,
        "model_config": model.cfg.to_dict(), "diffusion_config": diffusion.to_dict(), "sampling": dict(sampling),
        "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None, **extra,
    }


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`:
    a process killed mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                      # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint dict (weights_only=True: no code is unpickled)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a diffit-port checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not supported")
    return ckpt


def load_model(path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict). Takes the EMA weights when present and `use_ema`."""
    ckpt = read_checkpoint(path, map_location)
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.to(map_location).eval(), ckpt


def diffusion_config(ckpt: dict[str, Any]) -> DiffusionConfig:
    return DiffusionConfig.from_dict(ckpt["diffusion_config"])
