"""Samplers of EDM's formulation (Karras et al. 2022) over a denoiser that returns D(x; sigma): the noise-level
grid, Algorithm 1 (deterministic Heun), Algorithm 2 (stochastic) and DPM-Solver++(2M) on the same grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calls import Callback, Denoise, call, prepare, tick
from .noise import Noise
from .schedule import karras_sigmas


@dataclass(frozen=True)
class EDMSchedule:
    """The noise levels an EDM denoiser was trained for and its sampler grid; x = x_0 + sigma n (VE)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5      # not used by the samplers (the preconditioning is inside the denoiser)

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max or self.rho <= 0 or self.sigma_data <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and positive rho, sigma_data; got {self}")

    @classmethod
    def from_config(cls, cfg: Any) -> "EDMSchedule":
        """From a `DiffusionConfig` or its dict with prediction "edm"."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if d.get("prediction") != "edm":
            raise ValueError(f"an EDMSchedule needs prediction 'edm', got {d.get('prediction', 'eps')!r}")
        return cls(float(d["sigma_min"]), float(d["sigma_max"]), float(d["rho"]), float(d["sigma_data"]))

    def sigmas(self, steps: int) -> np.ndarray:
        """float64 (steps + 1,): sigma_max .. sigma_min on Karras et al. eq. 5's grid, then 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho)


@dataclass(frozen=True)
class Churn:
    """Algorithm 2's stochasticity: where S_min <= sigma <= S_max, raise sigma by gamma = min(S_churn / N,
    sqrt(2) - 1) with fresh noise scaled by S_noise. The defaults are EDM's ImageNet-64 settings."""

    s_churn: float = 40.0
    s_min: float = 0.05
    s_max: float = 50.0
    s_noise: float = 1.003

    def gamma(self, sigma: float, steps: int) -> float:
        if not self.s_min <= sigma <= self.s_max:
            return 0.0
        return min(self.s_churn / steps, math.sqrt(2.0) - 1.0)


class _Calls:
    """D(x; sigma) through `call`, with a running call index, progress ticks and optional clipping of D."""

    def __init__(self, denoise: Denoise, y: np.ndarray, total: int, clip: bool, callback: Callback | None):
        self.denoise, self.y, self.total, self.clip, self.callback = denoise, y, total, clip, callback
        self.n = 0

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        d = call(self.denoise, x, sigma, self.y, self.n)
        tick(self.callback, self.n, self.total)
        self.n += 1
        return np.clip(d, -1.0, 1.0) if self.clip else d


def edm_heun(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: EDMSchedule, steps: int,
             noise: Noise | None = None, *, churn: Churn | None = None, clip_denoised: bool = False,
             callback: Callback | None = None) -> np.ndarray:
    """EDM's sampler: Algorithm 1 (Heun on dx/dsigma = (x - D) / sigma, the correction skipped on the last step
    to sigma = 0) and, with `churn`, Algorithm 2 (noise added before each step). x_T (B, C, H, W) is unit
    normal; the chain starts at sigma_max x_T. `clip_denoised` clips D to [-1, 1]. float64 (B, C, H, W)."""
    if churn is not None and noise is None:
        raise ValueError("stochastic EDM sampling needs a noise source")
    x, y = prepare(x_T, y)
    sigmas = schedule.sigmas(steps)
    denoised = _Calls(denoise, y, 2 * steps - 1, clip_denoised, callback)
    x = x * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = churn.gamma(s, steps) if churn is not None else 0.0
        s_hat = s * (1.0 + gamma)
        if gamma > 0:
            # Alg. 2 lines 5-6: move up to s_hat by adding noise of variance s_hat^2 - s^2.
            x = x + math.sqrt(s_hat * s_hat - s * s) * churn.s_noise * noise.standard_normal(x.shape)
        d = (x - denoised(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d                                        # Euler step (Alg. 1 line 5)
        if s_next > 0:
            d_next = (x_next - denoised(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)                   # trapezoid (Alg. 1 lines 7-8)
        x = x_next
    return x


def edm_stochastic(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: EDMSchedule, steps: int,
                   noise: Noise, *, churn: Churn | None = None, clip_denoised: bool = False,
                   callback: Callback | None = None) -> np.ndarray:
    """Algorithm 2 with `churn` (default: `Churn()`); see edm_heun."""
    return edm_heun(denoise, x_T, y, schedule, steps, noise, churn=churn or Churn(), clip_denoised=clip_denoised,
                    callback=callback)


def edm_dpmpp_2m(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: EDMSchedule, steps: int,
                 noise: Noise | None = None, *, clip_denoised: bool = False,
                 callback: Callback | None = None) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with data prediction D on the EDM grid, where alpha_t = 1,
    sigma_t = sigma and lambda = -ln(sigma). The first step (no history) and the last (to sigma = 0, where
    the update is D itself) are first order. float64 (B, C, H, W)."""
    x, y = prepare(x_T, y)
    sigmas = schedule.sigmas(steps)
    denoised = _Calls(denoise, y, steps, clip_denoised, callback)
    x = x * sigmas[0]
    d_prev, h_prev = None, 0.0
    for i in range(steps):
        d = denoised(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return d                                       # lambda = inf: the first-order update is D
        h = math.log(sigmas[i] / sigmas[i + 1])            # lambda_{i+1} - lambda_i
        if d_prev is None:
            dd = d
        else:
            r = h_prev / h
            dd = (1.0 + 1.0 / (2.0 * r)) * d - (1.0 / (2.0 * r)) * d_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * dd
        d_prev, h_prev = d, h
    return x
