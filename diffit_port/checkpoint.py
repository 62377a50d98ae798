"""Checkpoints as plain data: configs as dicts, tensors as state dicts, loadable with weights_only=True.

torch is imported inside the functions, so `CheckpointError` can be caught by torch-free callers (the CLIs)."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import replacing
from .config import DiffusionConfig, ModelConfig, Preset, get_preset

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "diffit-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, empty, truncated, not a diffit-port checkpoint, of
    another version, or with weights that do not fit its config; the message names the file."""


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
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`
    (diffit_port.atomic): a process killed mid-write, or a full disk, leaves the previous file intact."""
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _is_pickle_or_torch_zip(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle of protocol 2 or later (it starts with the PROTO opcode)."""
    with open(path, "rb") as f:
        head = f.read(1)
    return head == b"\x80" or zipfile.is_zipfile(path)


def _torch_load(path: Path, map_location: Any) -> Any:
    """torch.load(weights_only=True), every failure rephrased as one CheckpointError naming the file (never
    torch's advice to retry with weights_only=False: a checkpoint of this project needs no unpickled code)."""
    import torch

    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch warns about pickle protocols of foreign files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if _is_pickle_or_torch_zip(path):
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain data, so it "
                                  "was not written by diffit-port; refusing to unpickle it") from None
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint file "
                              "(the copy may be incomplete)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, AttributeError, IndexError):
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint file "
                              "(the copy may be incomplete)") from None


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint dict (weights_only=True: no code is unpickled). Raises CheckpointError."""
    path = Path(path)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a diffit-port checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported "
                              f"(this diffit-port reads version {CHECKPOINT_VERSION})")
    for key in ("model_config", "diffusion_config", "model"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} dict")
    return ckpt


def load_model(path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict). Takes the EMA weights when present and `use_ema`.
    Raises CheckpointError when the file or its weights cannot be used."""
    from .models import build_model

    ckpt = read_checkpoint(path, map_location)
    try:
        model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: the weights do not fit the checkpoint's model config "
                              f"({state_dict_problem(e)})") from None
    return model.to(map_location).eval(), ckpt


def state_dict_problem(e: BaseException) -> str:
    """The first concrete problem of a load_state_dict error ("size mismatch for ...", "Missing key(s) ...")
    in one line, with how many more there are; torch's first line only names the module class."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    details = lines[1:] or lines
    more = f"; and {len(details) - 1} more" if len(details) > 1 else ""
    return details[0].rstrip(".") + more


def diffusion_config(ckpt: dict[str, Any]) -> DiffusionConfig:
    return DiffusionConfig.from_dict(ckpt["diffusion_config"])
