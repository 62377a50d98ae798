"""Samplers of the discrete VP process with an eps-prediction denoiser: DDPM, DDIM, DPM-Solver++(2M) and
EDM's Heun on the sigma parameterisation of that process."""

from __future__ import annotations

import math

import numpy as np

from .calls import Callback, Denoise, call, prepare, tick
from .noise import Noise
from .schedule import Schedule, karras_sigmas, posterior, respace


def predict_x0(x: np.ndarray, eps: np.ndarray, alpha_bar: float, clip: bool) -> np.ndarray:
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
    x, y = prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)
    # ADM respacing: the betas of the shorter chain are recomputed from the kept alpha_bar values.
    post = posterior(schedule.alphas_cumprod[ts])
    ab, betas, post_log_var = post.alpha_bar, post.betas, post.posterior_log_variance_clipped
    coef_x0, coef_xt = post.posterior_mean_coef_x0, post.posterior_mean_coef_xt
    for n, i in enumerate(range(steps - 1, -1, -1)):
        out = call(denoise, x, float(ts[i]), y, n)
        tick(callback, n, steps)
        x0 = predict_x0(x, out[:, :c], ab[i], clip_denoised)
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
    x, y = prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)
    ab = schedule.alphas_cumprod[ts]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    for n, i in enumerate(range(steps - 1, -1, -1)):
        eps = call(denoise, x, float(ts[i]), y, n)[:, :c]
        tick(callback, n, steps)
        x0 = predict_x0(x, eps, ab[i], clip_denoised)
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
    x, y = prepare(x_T, y)
    c = x.shape[1]
    ts = respace(schedule.num_timesteps, steps)[::-1]
    ab = schedule.alphas_cumprod[ts]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha / sigma)  # half log-SNR
    x0_prev, h_prev = None, 0.0
    for i in range(steps):
        eps = call(denoise, x, float(ts[i]), y, i)[:, :c]
        tick(callback, i, steps)
        x0 = predict_x0(x, eps, ab[i], clip_denoised)
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


def heun(denoise: Denoise, x_T: np.ndarray, y: np.ndarray, schedule: Schedule, steps: int,
         noise: Noise | None = None, *, clip_denoised: bool = False,
         callback: Callback | None = None) -> np.ndarray:
    """EDM Heun (Karras et al. 2022, Alg. 1, S_churn = 0) on the VP model; float64 (B, C, H, W) x_0."""
    x, y = prepare(x_T, y)
    c = x.shape[1]
    sigmas = karras_sigmas(schedule.sigmas[0], schedule.sigmas[-1], steps)
    n_calls, calls = 2 * steps - 1, 0  # one call per step, plus one per correction (none on the last)

    def slope(x_ve: np.ndarray, s: float) -> np.ndarray:
        # dx/dsigma = (x - D(x; s)) / s with D(x; s) = x - s * eps(x / sqrt(1 + s^2), t(s)): it is just eps,
        # evaluated on the VP input at the fractional training index of s (Karras et al. Table 1, VP column).
        nonlocal calls
        eps = call(denoise, x_ve / math.sqrt(1.0 + s * s), float(schedule.sigma_to_t(s)), y, calls)[:, :c]
        tick(callback, calls, n_calls)
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
