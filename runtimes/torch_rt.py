"""PyTorch reference denoiser, from the package's embedded checkpoint or an explicit one (weights_only), run as the
package contract's step (eps: the network; EDM: the network inside its float32 preconditioning)."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import numpy as np

from diffit_port.config import ModelConfig
from diffit_port.package import Package, PackageError

from .base import require

# "tf32" is float32 with TF32 matmuls and convolutions; "fp32" turns TF32 off (cuDNN's default is on).
DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchDenoiser:
    """An eval-mode denoiser step (edm.denoiser_step) behind the `Denoiser` protocol; float32 inputs go in (the
    step casts what the network needs to its dtype) and the output comes back as float32 NumPy."""

    def __init__(self, model: Any, *, device: str, precision: str):
        import torch

        self.name, self.device, self.precision = "torch", device, precision
        self.provider = f"PyTorch {torch.__version__}"
        self.model = model

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, guidance: np.ndarray | None = None) -> np.ndarray:
        import torch

        if guidance is not None:
            raise ValueError("the torch runtime has no in-graph guidance; use sampler-side guidance")
        tf32 = self.precision == "tf32"
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32   # for this call only
        try:
            return self._run(torch, x, t, y)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def _run(self, torch: Any, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            tt = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self.device)
            yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.device)
            out = self.model(xt, tt, yt)
            return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def checkpoint_path(package: Package, checkpoint: str | os.PathLike | None) -> str:
    """The explicit checkpoint, else the one the package embeds (manifest key "checkpoint")."""
    if checkpoint is not None:
        return os.fspath(checkpoint)
    rel = package.manifest.get("checkpoint")
    if not rel:
        raise PackageError(f"package {package.root} embeds no checkpoint (export it with embed_checkpoint=True) "
                           "and no --checkpoint was given for the torch runtime")
    path = package.root / rel
    if not path.is_file():
        raise PackageError(f"package {package.root}: checkpoint {rel!r} named in the manifest is missing")
    return os.fspath(path)


def prepare_torch(package: Package, *, graph: str = "denoiser", precision: str | None = None,
                  checkpoint: str | os.PathLike | None = None, use_ema: bool = True, threads: int | None = None,
                  compile: bool = False) -> Callable[[str | None], TorchDenoiser]:
    """Opens torch sessions: call the result with a device, "cpu" (for None) or "cuda[:n]", for each one.
    The checkpoint is read once, by the first session, onto its device; later sessions copy that model.
    precision fp32 (default), bf16, or fp16/tf32 (CUDA only); `compile`: torch.compile the model (the first
    call of each batch size compiles). The checkpoint's model and diffusion configs must equal the package's."""
    torch = require("torch", "torch", "the torch runtime")
    from diffit_port.checkpoint import diffusion_config, load_model
    from diffit_port.edm import denoiser_step

    if graph != "denoiser":
        raise ValueError("the torch runtime has no in-graph guidance graph; use sampler-side guidance")
    precision = precision or "fp32"
    if precision not in DTYPES:
        raise ValueError(f"torch precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    dtype = getattr(torch, DTYPES[precision])
    loaded: list[Any] = []   # the first session's (uncompiled) model

    def open_session(device: str | None = None) -> TorchDenoiser:
        device = device or "cpu"
        if precision in ("fp16", "tf32") and not device.startswith("cuda"):
            raise ValueError(f"torch {precision} runs on CUDA only (bf16 runs on the CPU)")
        if threads:
            torch.set_num_threads(int(threads))
        if loaded:
            model = copy.deepcopy(loaded[0]).to(device)
        else:
            model, ckpt = load_model(checkpoint_path(package, checkpoint), use_ema=use_ema, map_location=device)
            if (ModelConfig.from_dict(ckpt["model_config"]) != package.model
                    or diffusion_config(ckpt) != package.diffusion):
                raise PackageError("the checkpoint's model or diffusion config differs from the package's "
                                   "manifest: pass the checkpoint the package was exported from")
            del ckpt
            model = denoiser_step(model.to(dtype), package.diffusion, dtype)
            loaded.append(model)
        if compile:
            model = torch.compile(model)
        return TorchDenoiser(model, device=device, precision=precision)

    return open_session


def create_torch(package: Package, *, device: str | None = None, **opts: Any) -> TorchDenoiser:
    """One torch session; `opts` as for prepare_torch."""
    return prepare_torch(package, **opts)(device)
