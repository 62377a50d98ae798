"""NumPy samplers (DDPM, DDIM, DPM-Solver++ 2M, Heun) over any `denoise(x, t, y)` callable, torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, NamedTuple

import numpy as np

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Callback = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# The discrete forward process
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------------------------

class NoiseSource:
    """Per-image random streams: image i of a run with seed S always gets the same noise, whatever the batch
    split (EDM's StackedRandomGenerator idea), so runs split across batches / GPUs / runtimes agree."""

    def __init__(self, seed: int, num_images: int, first: int = 0):
        self.seed, self.num_images, self.first = int(seed), int(num_images), int(first)
        if self.seed < 0 or self.num_images < 0 or self.first < 0:
            raise ValueError("seed, num_images and first must be non-negative")
        self._generators = [np.random.default_rng([self.seed, self.first + i]) for i in range(self.num_images)]

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """float64 `shape` with shape[0] == num_images; row i continues image (first + i)'s own stream."""
        shape = tuple(int(n) for n in shape)
        if not shape or shape[0] != self.num_images:
            raise ValueError(f"shape[0] must be num_images={self.num_images}, got shape {shape}")
        out = np.empty(shape, dtype=np.float64)
        for row, g in zip(out, self._generators):
            row[...] = g.standard_normal(shape[1:])
        return out

    def split(self, start: int, stop: int) -> "NoiseSource":
        """Images start..stop-1 (relative); a view that shares those images' streams with this source."""
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"split({start}, {stop}) outside 0..{self.num_images}")
        sub = NoiseSource(self.seed, 0, self.first + start)
        sub.num_images, sub._generators = stop - start, self._generators[start:stop]
        return sub


Noise = NoiseSource | np.random.Generator


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------

def guidance_scale(t: np.ndarray, w: float, schedule: str = "constant", power: float = 4.0,
                   num_timesteps: int = 1000) -> np.ndarray:
    """float64 guidance scale at training indices `t` (same shape as t)."""
    t = np.asarray(t, dtype=np.float64)
    if schedule == "constant":
        return np.full(t.shape, float(w))
    if schedule == "power-cosine":
        # DiffiT §5.8 (after MDT): the scale rises from ~1 at the start of sampling (t = T-1) to w at t = 0.
        ramp = 0.5 * (1.0 - np.cos(math.pi * (1.0 - t / num_timesteps) ** power))
        return 1.0 + (w - 1.0) * ramp
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose 'constant' or 'power-cosine'")


def classifier_free_guidance(denoise: Denoise, w: float, null_label: int, *, schedule: str = "constant",
                             power: float = 4.0, num_timesteps: int = 1000, guide_channels: int = 0) -> Denoise:
    """Wrap `denoise` so one call on the doubled batch returns u + s(t) (c - u) on the guided channels."""
    if w == 1 and schedule == "constant":
        return denoise

    def guided(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        b, c_eps = x.shape[0], x.shape[1]
        k = guide_channels or c_eps
        if not 0 < k <= c_eps:
            raise ValueError(f"guide_channels={guide_channels} must be in 0..{c_eps}")
        y_null = np.full_like(y, null_label)
        out = denoise(np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, y_null]))
        cond, uncond = out[:b], out[b:]
        s = guidance_scale(t, w, schedule, power, num_timesteps).reshape(-1, *([1] * (x.ndim - 1)))
        # Only the first k eps channels are guided (DiT/DiffiT guide 3 of 4 latent channels); the other eps
        # channels and the learned-variance channels stay conditional.
        res = np.array(cond, copy=True)
        guided_k = uncond[:, :k].astype(np.float64) + s * (cond[:, :k].astype(np.float64) - uncond[:, :k])
        res[:, :k] = guided_k.astype(res.dtype)
        return res

    return guided


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------

def _call(denoise: Denoise, x: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
    """One denoiser call in the runtime dtypes (float32 x and t, int64 y); the output comes back as float64."""
    b, c = x.shape[0], x.shape[1]
    out = np.asarray(denoise(x.astype(np.float32), np.full(b, t, dtype=np.float32), y), dtype=np.float64)
    if out.shape[0] != b or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"denoiser returned shape {out.shape} for input {x.shape}; expected C or 2C channels")
    return out


def _tick(callback: Callback | None, i: int, n: int) -> None:
    if callback is not None:
        callback(i, n)


def _prepare(x_T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.array(x_T, dtype=np.float64, copy=True)
    if x.ndim != 4:
        raise ValueError(f"x_T must be (B, C, H, W), got shape {x.shape}")
    return x, np.asarray(y, dtype=np.int64)


def _predict_x0(x: np.ndarray, eps: np.ndarray, alpha_bar: float, clip: bool) -> np.ndarray:
    """x_0 from x_t and eps (Ho et al. eq. 4 inverted); clipped to the data range [-1, 1] when `clip`.

    Pixel-space models need the clip (ADM's clip_denoised): near t = T-1, sqrt(alpha_bar) is tiny (the
    cosine schedule reaches 6e-5), so the x_0 estimate amplifies any eps error by 1/sqrt(alpha_bar) and
    the deterministic samplers carry that error to the end. Latent models are sampled unclipped (DiT).
    """
    x0 = (x - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return np.clip(x0, -1.0, 1.0) if clip else x0


def ddpm(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: Schedule, steps: int, noise: Noise, *,
         clip_denoised: bool = False, callback: Callback | None = None) -> np.ndarray:
    """Ancestral sampling (Ho et al. eq. 6-7) on the respaced process; float64 (B, C, H, W) x_0."""
    x, y = _prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)
    # ADM respacing: the betas of the shorter chain are recomputed from the kept alpha_bar values.
    post = posterior(schedule.alphas_cumprod[ts])
    ab, betas, post_log_var = post.alpha_bar, post.betas, post.posterior_log_variance_clipped
    coef_x0, coef_xt = post.posterior_mean_coef_x0, post.posterior_mean_coef_xt
    for n, i in enumerate(range(steps - 1, -1, -1)):
        out = _call(denoise, x, float(ts[i]), y)
        _tick(callback, n, steps)
        x0 = _predict_x0(x, out[:, :c], ab[i], clip_denoised)
        mean = coef_x0[i] * x0 + coef_xt[i] * x  # posterior mean, Ho et al. eq. 7
        if i == 0:
            x = mean  # alpha_bar_prev = 1: the mean is the x0 prediction; no noise at the last step
            break
        if out.shape[1] == 2 * c:
            # Learned variance (Nichol & Dhariwal eq. 15): interpolate log-variances between beta and beta-tilde.
            frac = (out[:, c:] + 1.0) / 2.0
            log_var = frac * np.log(betas[i]) + (1.0 - frac) * post_log_var[i]
        else:
            log_var = post_log_var[i]  # the fixed "small" posterior variance beta-tilde
        x = mean + np.exp(0.5 * log_var) * noise.standard_normal(x.shape)
    return x


def ddim(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: Schedule, steps: int,
         noise: Noise | None = None, *, eta: float = 0.0, clip_denoised: bool = False,
         callback: Callback | None = None) -> np.ndarray:
    """DDIM (Song et al. 2021, eq. 12); eta=0 is deterministic; float64 (B, C, H, W) x_0."""
    if eta != 0 and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source")
    x, y = _prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)
    ab = schedule.alphas_cumprod[ts]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    for n, i in enumerate(range(steps - 1, -1, -1)):
        eps = _call(denoise, x, float(ts[i]), y)[:, :c]
        _tick(callback, n, steps)
        x0 = _predict_x0(x, eps, ab[i], clip_denoised)
        if clip_denoised:
            eps = (x - math.sqrt(ab[i]) * x0) / math.sqrt(1.0 - ab[i])  # the eps consistent with the clipped x_0
        # eq. 16: sigma_t(eta); it vanishes on the last step, where alpha_bar_prev = 1.
        sigma = eta * math.sqrt((1.0 - ab_prev[i]) / (1.0 - ab[i]) * (1.0 - ab[i] / ab_prev[i]))
        x = math.sqrt(ab_prev[i]) * x0 + math.sqrt(max(1.0 - ab_prev[i] - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise.standard_normal(x.shape)
    return x


def dpmpp_2m(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: Schedule, steps: int,
             noise: Noise | None = None, *, clip_denoised: bool = False,
             callback: Callback | None = None) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction; float64 (B, C, H, W) x_0."""
    x, y = _prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)[::-1]
    ab = schedule.alphas_cumprod[ts]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha / sigma)  # half log-SNR
    x0_prev, h_prev = None, 0.0
    for i in range(steps):
        eps = _call(denoise, x, float(ts[i]), y)[:, :c]
        _tick(callback, i, steps)
        x0 = _predict_x0(x, eps, ab[i], clip_denoised)
        if i == steps - 1:
            # Last step to sigma = 0 (lambda = inf): the first-order update is exactly the data prediction.
            return x0
        h = lam[i + 1] - lam[i]
        if x0_prev is None or i == steps - 2:
            # First step: no history yet. Step into t = 0: lower-order final step (Lu et al.'s reference code,
            # `lower_order_final`): index spacing makes this lambda step several times longer than the one
            # before, and the 2M extrapolation weight 1/(2r) would amplify the data-prediction error instead.
            d = x0
        else:
            r = h_prev / h
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * np.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """float64 (steps + 1,) noise levels of Karras et al. eq. 5, descending, with a final 0."""
    if steps == 1:
        return np.array([sigma_max, 0.0])
    ramp = np.arange(steps, dtype=np.float64) / (steps - 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # pin the ends exactly to the table
    return np.append(s, 0.0)


def heun(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: Schedule, steps: int,
         noise: Noise | None = None, *, clip_denoised: bool = False,
         callback: Callback | None = None) -> np.ndarray:
    """EDM Heun (Karras et al. 2022, Alg. 1, S_churn = 0) on the VP model; float64 (B, C, H, W) x_0."""
    x, y = _prepare(x_T, y)
    c = x.shape[1]
    sigmas = karras_sigmas(schedule.sigmas[0], schedule.sigmas[-1], steps)
    n_calls, calls = num_denoiser_calls("heun", steps), 0

    def slope(x_ve: np.ndarray, s: float) -> np.ndarray:
        # dx/dsigma = (x - D(x; s)) / s with D(x; s) = x - s * eps(x / sqrt(1 + s^2), t(s)): it is just eps,
        # evaluated on the VP input at the fractional training index of s (Karras et al. Table 1, VP column).
        nonlocal calls
        eps = _call(denoise, x_ve / math.sqrt(1.0 + s * s), float(schedule.sigma_to_t(s)), y)[:, :c]
        _tick(callback, calls, n_calls)
        calls += 1
        if clip_denoised:
            return (x_ve - np.clip(x_ve - s * eps, -1.0, 1.0)) / s  # (x - D) / s with D clipped to [-1, 1]
        return eps

    x = x * math.sqrt(1.0 + sigmas[0] ** 2)  # VP unit variance -> VE units at sigma_max
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = slope(x, s)
        x_next = x + (s_next - s) * d  # Euler step (Alg. 1, line 5)
        if s_next > 0:
            # Second-order correction (Alg. 1, lines 7-8), skipped on the final step to sigma = 0.
            x_next = x + (s_next - s) * 0.5 * (d + slope(x_next, s_next))
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "heun": heun}


def check_sampler(sampler: str) -> None:
    """Raise ValueError naming the choices unless `sampler` is a key of SAMPLERS."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")


def num_denoiser_calls(sampler: str, steps: int) -> int:
    """Denoiser calls one run makes (for progress bars)."""
    check_sampler(sampler)
    return 2 * steps - 1 if sampler == "heun" else steps


def sample(sampler: str, denoise: Denoise, noise: NoiseSource, shape: tuple[int, ...], y: np.ndarray,
           schedule: Schedule, steps: int, *, eta: float = 0.0, clip_denoised: bool = False,
           callback: Callback | None = None) -> np.ndarray:
    """Draw x_T from `noise` and run the named sampler; float64 `shape` x_0 (`clip_denoised`: clip each
    x_0 estimate to [-1, 1], for pixel-space models; see `_predict_x0`)."""
    check_sampler(sampler)
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies only to ddim, not {sampler!r}")
    x_T = noise.standard_normal(shape)
    if sampler == "ddim":
        return ddim(denoise, x_T, y, schedule, steps, noise, eta=eta, clip_denoised=clip_denoised,
                    callback=callback)
    return SAMPLERS[sampler](denoise, x_T, y, schedule, steps, noise, clip_denoised=clip_denoised,
                             callback=callback)


def sample_batches(sampler: str, denoise: Denoise, noise: NoiseSource, shape_chw: tuple[int, ...],
                   labels: np.ndarray, schedule: Schedule, steps: int, *, batch_size: int, null_label: int | None,
                   guidance: float = 1.0, guidance_schedule: str = "constant", guidance_power: float = 4.0,
                   guide_channels: int = 0, eta: float = 0.0, clip_denoised: bool = False,
                   callback: Callback | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Samples for all N = `noise.num_images` images, `batch_size` per sampler run; image i always draws
    from stream i of `noise` (label `labels[i]`), so the result does not depend on the batch size.

    With a `null_label` and `guidance` != 1 the denoiser is wrapped in `classifier_free_guidance` (the
    denoiser batch doubles); `null_label=None` uses `denoise` as given (an unconditional model, or a step
    that applies guidance itself). Writes into `out` ((N, *shape_chw), any float dtype) when given, else
    into a new float64 array, and returns it."""
    n, shape_chw = noise.num_images, tuple(int(d) for d in shape_chw)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out is None:
        out = np.empty((n, *shape_chw), dtype=np.float64)
    elif out.shape != (n, *shape_chw):
        raise ValueError(f"out has shape {out.shape}, expected {(n, *shape_chw)}")
    if null_label is not None and guidance != 1.0:
        denoise = classifier_free_guidance(denoise, guidance, null_label, schedule=guidance_schedule,
                                           power=guidance_power, num_timesteps=schedule.num_timesteps,
                                           guide_channels=guide_channels)
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        out[a:b] = sample(sampler, denoise, noise.split(a, b), (b - a, *shape_chw), labels[a:b], schedule, steps,
                          eta=eta, clip_denoised=clip_denoised, callback=callback)
    return out
