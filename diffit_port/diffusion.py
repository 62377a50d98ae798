"""The forward process q(x_t | x_0) and the ADM / DiT hybrid training loss, in torch; `training_objective`
picks it or EDM's (edm.py) from the diffusion config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .config import DiffusionConfig
from .edm import EDMLoss
from .samplers import Schedule, posterior


@dataclass(frozen=True, eq=False)
class ForwardProcess:
    """The float64 schedule of `samplers.Schedule` as torch tensors on one device, plus the derived
    posterior quantities of Ho et al. (2020) eqs. 6-7 and the square-root and log tables the loss reads
    every step (computed once, on the device). All tensors are float64 (T,)."""

    betas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    posterior_variance: torch.Tensor              # beta-tilde_t, eq. 7
    posterior_log_variance_clipped: torch.Tensor  # log beta-tilde_t, with entry 0 replaced by entry 1 (it is 0)
    posterior_mean_coef_x0: torch.Tensor          # eq. 7, the weight of x_0 in mu-tilde
    posterior_mean_coef_xt: torch.Tensor          # eq. 7, the weight of x_t in mu-tilde
    sqrt_alpha_bar: torch.Tensor = field(init=False)
    sqrt_one_minus_alpha_bar: torch.Tensor = field(init=False)
    log_betas: torch.Tensor = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "sqrt_alpha_bar", self.alpha_bar.sqrt())
        object.__setattr__(self, "sqrt_one_minus_alpha_bar", (1.0 - self.alpha_bar).sqrt())
        object.__setattr__(self, "log_betas", self.betas.log())

    @classmethod
    def from_schedule(cls, schedule: Schedule, device: str | torch.device = "cpu") -> "ForwardProcess":
        # The arrays are derived in NumPy float64 from the one torch-free schedule, then moved once.
        arrays = posterior(schedule.alphas_cumprod, schedule.betas)._asdict()
        return cls(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()})

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, device: str | torch.device = "cpu") -> "ForwardProcess":
        return cls.from_schedule(Schedule.from_config(cfg), device)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def sample_t(self, generator: torch.Generator, batch: int, device: torch.device) -> torch.Tensor:
        """The per-sample time draw of one training step: int64 (B,) uniform over 0..T-1."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def losses(self, model: Callable[..., torch.Tensor] | nn.Module, x0: torch.Tensor, t: torch.Tensor,
               y: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """`training_losses` on this process (the interface EDMLoss shares)."""
        return training_losses(model, x0, t, y, self, noise)


def as_forward_process(schedule: ForwardProcess | Schedule, device: torch.device) -> ForwardProcess:
    """Accept either form; a NumPy `Schedule` is converted (cheap, but do it once in a training loop)."""
    if isinstance(schedule, ForwardProcess):
        return schedule if schedule.device == device else ForwardProcess(
            **{f.name: getattr(schedule, f.name).to(device) for f in fields(schedule) if f.init})
    return ForwardProcess.from_schedule(schedule, device)


def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as (B, 1, 1, ...) in the dtype of `like` (gathered in float64, then cast, as ADM does)."""
    return arr[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the batch axis, (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------
# Forward process
# --------------------------------------------------------------------------------------------

def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: ForwardProcess | Schedule
             ) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4).

    x0, noise (B, C, H, W) float; t (B,) int64 training index -> (B, C, H, W) in x0's dtype.
    """
    fp = as_forward_process(schedule, x0.device)
    return _at(fp.sqrt_alpha_bar, t, x0) * x0 + _at(fp.sqrt_one_minus_alpha_bar, t, x0) * noise


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, fp: ForwardProcess
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7); (B, C, H, W) and (B, 1, 1, 1)."""
    mean = _at(fp.posterior_mean_coef_x0, t, x_t) * x0 + _at(fp.posterior_mean_coef_xt, t, x_t) * x_t
    return mean, _at(fp.posterior_log_variance_clipped, t, x_t)


# --------------------------------------------------------------------------------------------
# Gaussian log-densities
# --------------------------------------------------------------------------------------------

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    # Grouped so that identical arguments give exactly 0: (lv2 - lv1) + exp(0) - 1 + 0.
    return 0.5 * ((logvar2 - logvar1) + torch.exp(logvar1 - logvar2) - 1.0
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper >= lower, stable in both tails."""
    # In the right tail both CDFs round to 1; use the mirror image Phi(-lower) - Phi(-upper) there.
    flip = lower > 0
    a = torch.where(flip, -lower, upper)
    b = torch.where(flip, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    # log(Phi(a) - Phi(b)) = log Phi(a) + log(1 - exp(log Phi(b) - log Phi(a))); floored at log(1e-12).
    return log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-12)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    """Log-probability (nats, elementwise) of 8-bit data x in [-1, 1] under a Gaussian discretised into
    256 bins of width 2/255; the end bins extend to +-infinity (Ho et al. §3.3), so bins sum to one."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    inf = torch.full_like(upper, math.inf)
    upper = torch.where(x > 1.0 - half_bin, inf, upper)      # the top bin takes everything above it
    lower = torch.where(x < -1.0 + half_bin, -inf, lower)    # the bottom bin everything below
    return _log_cdf_difference(upper, lower)


# --------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------

def vb_terms(eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             fp: ForwardProcess) -> torch.Tensor:
    """One term of the variational bound in bits per dimension, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0 (L_{t-1}) and the discretised decoder NLL -log p(x_0|x_1) at t = 0 (L_0), Ho et al. eq. 5.

    p has its mean from `eps` (Ho et al. eq. 11) and the learned log-variance of Nichol & Dhariwal eq. 15:
    frac * log beta_t + (1 - frac) * log beta-tilde_t with frac = (v + 1) / 2.
    """
    true_mean, true_log_var = q_posterior(x0, x_t, t, fp)
    x0_pred = (x_t - _at(fp.sqrt_one_minus_alpha_bar, t, x_t) * eps) / _at(fp.sqrt_alpha_bar, t, x_t)
    model_mean, _ = q_posterior(x0_pred, x_t, t, fp)       # no clipping of x0_pred in the loss (ADM)
    frac = (v + 1.0) / 2.0
    model_log_var = frac * _at(fp.log_betas, t, x_t) + (1.0 - frac) * true_log_var
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(model: Callable[..., torch.Tensor] | nn.Module, x0: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor, schedule: ForwardProcess | Schedule, noise: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """The loss of ADM / DiT for eps prediction: {"loss", "mse", "vb"}, each float32 (B,).

    x0 (B, C, H, W) data; t (B,) int64 training index; y (B,) int64 labels (the null label where dropped).
    mse = ||eps - eps_theta(x_t, t, y)||^2 averaged over pixels (Ho et al. "L_simple"). When the model
    outputs 2C channels it also learns its variance: vb is the bound term above with the eps prediction
    detached, so vb trains only the variance channels and mse only the mean (Nichol & Dhariwal "L_hybrid"),
    scaled by T / 1000 as ADM does, so that it carries the weight it has in the full bound (T terms, each
    weighted like one of 1000). For a C-channel (fixed variance) model vb is zero and loss == mse.
    """
    fp = as_forward_process(schedule, x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(x0, t, noise, fp)
    out = model(x_t, t.float(), y).float()                  # (B, C or 2C, H, W); fp32 loss under autocast
    C = x0.shape[1]
    if out.shape[1] not in (C, 2 * C) or out.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model output {tuple(out.shape)} does not match x0 {tuple(x0.shape)} (C or 2C channels)")
    eps = out[:, :C]
    mse = mean_flat((noise.float() - eps) ** 2)
    if out.shape[1] == 2 * C:
        vb = vb_terms(eps.detach(), out[:, C:], x0.float(), x_t.float(), t, fp) * (fp.num_timesteps / 1000.0)
    else:
        vb = torch.zeros_like(mse)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


Objective = ForwardProcess | EDMLoss


def training_objective(cfg: DiffusionConfig, device: str | torch.device = "cpu") -> Objective:
    """What a training step draws and minimises: the VP process's eps loss, or EDM's (`sample_t` and `losses`)."""
    return EDMLoss.from_config(cfg) if cfg.is_edm else ForwardProcess.from_config(cfg, device)


# --------------------------------------------------------------------------------------------
# Bridge to the NumPy samplers
# --------------------------------------------------------------------------------------------

NumpyDenoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def numpy_denoiser(model: nn.Module, device: str | torch.device = "cpu",
                   autocast_dtype: torch.dtype | None = None) -> NumpyDenoise:
    """Wrap a torch denoiser in the samplers' contract: x float32 (B, C, H, W), t float32 (B,),
    y int64 (B,) NumPy arrays -> float32 NumPy (B, C or 2C, H, W). Runs without gradients."""
    device = torch.device(device)

    @torch.no_grad()
    def denoise(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        tt = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(device)
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(xt, tt, yt)
        return out.float().cpu().numpy()

    return denoise
