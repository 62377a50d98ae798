"""The discrete forward process in float64: beta schedules, the `Schedule` table, the posterior of a
(respaced) chain, respacing and the Karras et al. noise-level grid (NumPy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """float64 (T,) betas: "linear" (ADM, scaled to T) or "cosine" (Nichol & Dhariwal 2021, eq. 17)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        # ADM scales the DDPM endpoints by 1000/T so any T gives roughly the same alpha_bar curve.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        f = np.cos((np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        # beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999 to avoid the singularity at t = T.
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


# eq=False: the dataclass-generated __eq__ would compare arrays as booleans, which raises.
@dataclass(frozen=True, eq=False)
class Schedule:
    """The training schedule, all derived arrays float64 and indexed by training step 0..T-1."""

    betas: np.ndarray  # float64 (T,)

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_config(cls, cfg: Any) -> "Schedule":
        """From a `DiffusionConfig` or a dict with keys `schedule` and `num_timesteps`."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if d.get("prediction", "eps") != "eps":
            raise ValueError(f"the samplers need an eps-prediction model, got {d['prediction']!r}")
        return cls(beta_schedule(d["schedule"], int(d.get("num_timesteps", 1000))))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @cached_property
    def sigmas(self) -> np.ndarray:
        # The VE noise level of x / sqrt(alpha_bar) (Karras et al. 2022, Table 1, VP column).
        ab = self.alphas_cumprod
        return np.sqrt((1.0 - ab) / ab)

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    def sigma_to_t(self, sigma: np.ndarray | float) -> np.ndarray:
        """Fractional training index of a noise level, linear in log-sigma between table entries."""
        return np.interp(np.log(sigma), self.log_sigmas, np.arange(self.num_timesteps, dtype=np.float64))

    def t_to_sigma(self, t: np.ndarray | float) -> np.ndarray:
        """Inverse of `sigma_to_t`: the noise level at a (fractional) training index."""
        return np.exp(np.interp(t, np.arange(self.num_timesteps, dtype=np.float64), self.log_sigmas))


class Posterior(NamedTuple):
    """q(x_{t-1} | x_t, x_0) along a chain (Ho et al. 2020, eqs. 6-7); every field float64 (K,)."""

    betas: np.ndarray
    alpha_bar: np.ndarray
    alpha_bar_prev: np.ndarray                    # 1 before the first entry
    posterior_variance: np.ndarray                # beta-tilde, eq. 7
    posterior_log_variance_clipped: np.ndarray    # log beta-tilde, entry 0 (log 0) replaced by entry 1
    posterior_mean_coef_x0: np.ndarray            # eq. 7, the weight of x_0 in mu-tilde
    posterior_mean_coef_xt: np.ndarray            # eq. 7, the weight of x_t in mu-tilde


def posterior(alpha_bar: np.ndarray, betas: np.ndarray | None = None) -> Posterior:
    """The posterior of the chain whose alpha_bar values are `alpha_bar` (alphas_cumprod at ascending
    training indices). `betas` defaults to 1 - alpha_bar / alpha_bar_prev: ADM's respacing, where the
    shorter chain's betas follow from the kept alpha_bar values; pass the schedule's own for the full chain."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    ab_prev = np.append(1.0, ab[:-1])
    betas = 1.0 - ab / ab_prev if betas is None else np.asarray(betas, dtype=np.float64)
    var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # ADM clips log(0) at the first step by reusing the second entry (the first step adds no noise anyway).
    log_var = np.log(np.append(var[1], var[1:])) if len(ab) > 1 else np.log(betas)
    return Posterior(betas, ab, ab_prev, var, log_var, betas * np.sqrt(ab_prev) / (1.0 - ab),
                     (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab))


def respace(num_timesteps: int, steps: int) -> np.ndarray:
    """int64 (steps,) ascending, evenly spaced training indices from 0 to T-1 inclusive ([T-1] for one step)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    # floor(x + 0.5), not np.round: banker's rounding can merge neighbours when the spacing is exactly 1.
    return np.floor(np.linspace(0, num_timesteps - 1, steps) + 0.5).astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """float64 (steps + 1,) noise levels of Karras et al. eq. 5, descending, with a final 0."""
    if steps == 1:
        return np.array([sigma_max, 0.0])
    ramp = np.arange(steps, dtype=np.float64) / (steps - 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # pin the ends exactly to the table
    return np.append(s, 0.0)
