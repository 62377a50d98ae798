"""Classifier-free guidance around any denoiser step: the scale schedules and the batch-doubling wrapper."""

from __future__ import annotations

import math

import numpy as np

from .calls import Denoise


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
