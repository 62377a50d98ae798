"""Export specs: the PyTorch modules that become a package's graphs, with their I/O contract (eps: x, t, y;
EDM: x, sigma, y), tolerance and random validation inputs (denoiser, in-graph guidance, VAE decoder)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from diffit_port.attention import TMSA
from diffit_port.config import DiffusionConfig, ModelConfig
from diffit_port.edm import FloatIO, denoiser_step
from diffit_port.schema import BATCH, CONTRACTS

from .errors import ExportError
from .fp16 import to_half

PARITY_BATCHES = (1, 3)              # validation batch sizes (the export itself traces batch 2)
EXPORT_BATCH = 2
FP32_ATOL = 1e-4                     # max |onnxruntime - torch fp32| for a float32 graph
# float16 graph vs the float32 torch model: 20x the float16 unit roundoff (4.9e-4) per output value,
# both absolute (eps is O(1)) and as relative L2 over the batch; tiny presets measure ~1e-3 / 8e-4.
FP16_ATOL = 1e-2
FP16_REL_L2 = 1e-2
# The VAE decoder is always float32 but an SD decoder is ~30 convolutions deep on large maps; its
# output is an image in [-1, 1], where 1e-3 is an eighth of one 8-bit level.
VAE_ATOL = 1e-3

Sampler = Callable[[int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype and shape ("batch" marks the dynamic axis)."""

    name: str
    dtype: str                                  # "float32" or "int64"
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    """Everything the exporter and the validator need to know about one graph."""

    name: str                                   # "denoiser", "denoiser_cfg", "vae_decoder"
    module: nn.Module                           # what is exported (float16 copy for fp16 packages)
    reference: nn.Module                        # the float32 eager model that parity is measured against
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    samplers: dict[str, Sampler]                # random validation input per input name
    precision: str = "fp32"
    atol: float = FP32_ATOL
    max_rel_l2: float | None = None
    custom_nodes: int = 0                       # TimeTokenAttention nodes the graph must hold
    extra: dict[str, Any] = field(default_factory=dict)   # copied into the manifest's graph entry

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def sample(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {s.name: self.samplers[s.name](batch, rng) for s in self.inputs}


def _normal(*dims: int) -> Sampler:
    return lambda b, rng: rng.standard_normal((b, *dims)).astype(np.float32)


def _uniform(lo: float, hi: float) -> Sampler:
    return lambda b, rng: rng.uniform(lo, hi, size=b).astype(np.float32)


def _log_uniform(lo: float, hi: float) -> Sampler:
    return lambda b, rng: np.exp(rng.uniform(np.log(lo), np.log(hi), size=b)).astype(np.float32)


def _labels(num_classes: int) -> Sampler:
    return lambda b, rng: rng.integers(0, num_classes + 1, size=b, dtype=np.int64)   # null label included


def count_tmsa(model: nn.Module) -> int:
    return sum(isinstance(m, TMSA) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Denoiser, and denoiser with classifier-free guidance in the graph
# --------------------------------------------------------------------------------------------

# The eps step (float32 I/O around a network of any precision) under the name it had here before it moved to
# diffit_port.edm, where denoiser_step builds it for every user.
Denoiser = FloatIO


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance in one call: the batch is doubled with the null label and
    out = u + s (c - u) on the first `guide_channels` channels, the conditional output elsewhere."""

    def __init__(self, denoiser: nn.Module, null_label: int, guide_channels: int):
        super().__init__()
        self.denoiser = denoiser
        self.null_label = null_label
        self.guide_channels = guide_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        # t is the step's time input: the training index (eps) or sigma (EDM); guidance is linear in either output.
        B = x.shape[0]
        y_null = torch.full_like(y, self.null_label)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2B, C', H, W)
        cond, uncond = out[:B], out[B:]
        k = self.guide_channels
        s = guidance.to(out.dtype)[:, None, None, None]                      # (B, 1, 1, 1)
        guided = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


def _denoiser_io(cfg: ModelConfig, time_name: str, guided: bool
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    hw = (cfg.image_size, cfg.image_size)
    inputs = (TensorSpec("x", "float32", (BATCH, cfg.in_channels, *hw)), TensorSpec(time_name, "float32", (BATCH,)),
              TensorSpec("y", "int64", (BATCH,)))
    if guided:
        inputs += (TensorSpec("guidance", "float32", (BATCH,)),)
    return inputs, (TensorSpec("out", "float32", (BATCH, cfg.out_channels, *hw)),)


def denoiser_specs(model: nn.Module, *, diffusion: DiffusionConfig, fp16: bool, cfg_in_graph: bool,
                   guide_channels: int) -> list[GraphSpec]:
    """`denoiser` and, with `cfg_in_graph`, `denoiser_cfg` for an eval-mode float32 model, as the step of
    `diffusion`'s contract (edm.denoiser_step: the preconditioning is inside the EDM graph, in float32).
    Validation draws t uniformly over the training indices (eps) or sigma log-uniformly over
    [sigma_min, sigma_max] (EDM)."""
    cfg: ModelConfig = model.cfg
    try:
        reference = denoiser_step(model, diffusion).eval()
    except ValueError as e:
        raise ExportError(str(e)) from None
    exported = denoiser_step(to_half(model), diffusion, torch.float16).eval() if fp16 else reference
    tol = dict(precision="fp16", atol=FP16_ATOL, max_rel_l2=FP16_REL_L2) if fp16 else dict(precision="fp32")
    time_name = CONTRACTS[diffusion.prediction]      # "t" (eps) or "sigma" (EDM)
    times = (_log_uniform(diffusion.sigma_min, diffusion.sigma_max) if diffusion.is_edm
             else _uniform(0.0, diffusion.num_timesteps - 1))
    samplers = {"x": _normal(cfg.in_channels, cfg.image_size, cfg.image_size), time_name: times,
                "y": _labels(cfg.num_classes), "guidance": _uniform(1.0, 5.0)}
    n = count_tmsa(model)
    inputs, outputs = _denoiser_io(cfg, time_name, guided=False)
    specs = [GraphSpec("denoiser", exported, reference, inputs, outputs, samplers, custom_nodes=n, **tol)]
    if cfg_in_graph:
        if not cfg.num_classes:
            raise ExportError("in-graph guidance needs a class-conditional model (this one has num_classes=0)")
        k = guide_channels or cfg.in_channels
        if not 0 < k <= cfg.in_channels:
            raise ExportError(f"guide_channels={guide_channels} is outside 0..{cfg.in_channels}")
        inputs, outputs = _denoiser_io(cfg, time_name, guided=True)
        specs.append(GraphSpec("denoiser_cfg", GuidedDenoiser(exported, cfg.null_label, k).eval(),
                               GuidedDenoiser(reference, cfg.null_label, k).eval(), inputs, outputs,
                               samplers, custom_nodes=n, extra={"guide_channels": k}, **tol))
    return specs


# --------------------------------------------------------------------------------------------
# VAE decoder (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

class VAEDecoder(nn.Module):
    """Sampler latents -> image in [-1, 1]: undo the latent scaling (z / scaling_factor + shift_factor),
    decode, clamp."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor                 # (B, 4, h, w)
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)                     # (B, 3, f*h, f*w)


def vae_spec(vae_dir: str | os.PathLike, cfg: ModelConfig) -> GraphSpec:
    """`vae_decoder` from a local diffusers AutoencoderKL directory, sized for a latent model's grid."""
    if cfg.kind != "latent":
        raise ExportError("--vae only applies to latent models; this checkpoint is an image-space model")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ExportError("--vae needs diffusers (pip install 'diffit-port[vae]')") from None
    try:
        vae = AutoencoderKL.from_pretrained(os.fspath(vae_dir), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load an AutoencoderKL from {vae_dir}: {e}") from None
    vae = vae.float().eval()
    vc = vae.config
    if vc.latent_channels != cfg.in_channels:
        raise ExportError(f"the VAE has {vc.latent_channels} latent channels, the model {cfg.in_channels}")
    factor = 2 ** (len(vc.block_out_channels) - 1)
    scaling = float(vc.scaling_factor)
    shift = float(getattr(vc, "shift_factor", None) or 0.0)
    h = cfg.image_size
    module = VAEDecoder(vae, scaling, shift).eval()
    return GraphSpec(
        "vae_decoder", module, module,
        (TensorSpec("latents", "float32", (BATCH, cfg.in_channels, h, h)),),
        (TensorSpec("image", "float32", (BATCH, vc.out_channels, factor * h, factor * h)),),
        # sampler-scale latents: unit variance, i.e. scaling_factor times the VAE's own latents
        {"latents": _normal(cfg.in_channels, h, h)}, atol=VAE_ATOL,
        extra={"scaling_factor": scaling, "shift_factor": shift, "upsampling": factor,
               "source": os.path.basename(os.path.normpath(os.fspath(vae_dir)))})
