"""The sampler registry and the entry points every runtime uses: `sample` (one batch) and `sample_batches`."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .calls import Callback, Denoise
from .guidance import classifier_free_guidance
from .noise import NoiseSource
from .schedule import Schedule
from .vp import ddim, ddpm, dpmpp_2m, heun


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
