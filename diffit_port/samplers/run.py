"""The sampler registry and the entry points every runtime uses: `sample` (one batch) and `sample_batches`,
dispatching on the schedule: a VP `Schedule` (eps contract) or an `EDMSchedule` (edm contract)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .calls import Callback, Denoise
from .edm import Churn, EDMSchedule, edm_dpmpp_2m, edm_heun, edm_stochastic
from .guidance import classifier_free_guidance
from .noise import NoiseSource
from .schedule import Schedule
from .vp import ddim, ddpm, dpmpp_2m, heun

AnySchedule = Schedule | EDMSchedule

# One registry per package contract (the manifest's `prediction`). Shared names mean the same method.
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "heun": heun}
EDM_SAMPLERS: dict[str, Callable[..., np.ndarray]] = {"heun": edm_heun, "edm-stochastic": edm_stochastic,
                                                      "dpmpp-2m": edm_dpmpp_2m}
SAMPLERS_BY_PREDICTION: dict[str, dict[str, Callable[..., np.ndarray]]] = {"eps": SAMPLERS, "edm": EDM_SAMPLERS}
SAMPLER_NAMES: tuple[str, ...] = tuple(sorted(set(SAMPLERS) | set(EDM_SAMPLERS)))
TWO_CALLS_PER_STEP = ("heun", "edm-stochastic")   # Heun's correction: 2 calls per step, 1 on the last


def schedule_from_config(cfg: Any) -> AnySchedule:
    """The sampler schedule of a `DiffusionConfig` (or its dict): EDMSchedule for prediction "edm", else the VP
    Schedule."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return EDMSchedule.from_config(d) if d.get("prediction") == "edm" else Schedule.from_config(d)


def prediction_of(schedule: AnySchedule) -> str:
    return "edm" if isinstance(schedule, EDMSchedule) else "eps"


def check_sampler(sampler: str, prediction: str | None = None) -> None:
    """Raise ValueError naming the choices unless `sampler` exists for the contract `prediction` ("eps" or
    "edm"; None: for any contract)."""
    if prediction is None:
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        return
    names = SAMPLERS_BY_PREDICTION[prediction]
    if sampler not in names:
        known = "unknown sampler" if sampler not in SAMPLER_NAMES else "sampler"
        raise ValueError(f"{known} {sampler!r} does not exist for {prediction} models; choose one of "
                         f"{', '.join(sorted(names))}")


def num_denoiser_calls(sampler: str, steps: int) -> int:
    """Denoiser calls one run makes (for progress bars); the same for both contracts."""
    check_sampler(sampler)
    return 2 * steps - 1 if sampler in TWO_CALLS_PER_STEP else steps


def sample(sampler: str, denoise: Denoise, noise: NoiseSource, shape: tuple[int, ...], y: np.ndarray,
           schedule: AnySchedule, steps: int, *, eta: float = 0.0, churn: Churn | None = None,
           clip_denoised: bool = False, callback: Callback | None = None) -> np.ndarray:
    """Draw x_T ~ N(0, I) from `noise` and run the named sampler of the schedule's contract; float64 `shape`
    x_0. `clip_denoised` clips each x_0 estimate (eps) or D (EDM) to [-1, 1], for pixel-space models;
    `eta` is DDIM's, `churn` edm-stochastic's (default `Churn()`)."""
    prediction = prediction_of(schedule)
    check_sampler(sampler, prediction)
    if eta != 0 and not (sampler == "ddim" and prediction == "eps"):
        raise ValueError(f"eta applies only to ddim, not {sampler!r}")
    if churn is not None and sampler != "edm-stochastic":
        raise ValueError(f"churn applies only to edm-stochastic, not {sampler!r}")
    x_T = noise.standard_normal(shape)
    if prediction == "eps" and sampler == "ddim":
        return ddim(denoise, x_T, y, schedule, steps, noise, eta=eta, clip_denoised=clip_denoised,
                    callback=callback)
    if sampler == "edm-stochastic":
        return edm_stochastic(denoise, x_T, y, schedule, steps, noise, churn=churn, clip_denoised=clip_denoised,
                              callback=callback)
    return SAMPLERS_BY_PREDICTION[prediction][sampler](denoise, x_T, y, schedule, steps, noise,
                                                       clip_denoised=clip_denoised, callback=callback)


def sample_batches(sampler: str, denoise: Denoise, noise: NoiseSource, shape_chw: tuple[int, ...],
                   labels: np.ndarray, schedule: AnySchedule, steps: int, *, batch_size: int, null_label: int | None,
                   guidance: float = 1.0, guidance_schedule: str = "constant", guidance_power: float = 4.0,
                   guide_channels: int = 0, eta: float = 0.0, churn: Churn | None = None,
                   clip_denoised: bool = False, callback: Callback | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Samples for all N = `noise.num_images` images, `batch_size` per sampler run; image i always draws
    from stream i of `noise` (label `labels[i]`), so the result does not depend on the batch size.

    With a `null_label` and `guidance` != 1 the denoiser is wrapped in `classifier_free_guidance` (the
    denoiser batch doubles); `null_label=None` uses `denoise` as given (an unconditional model, or a step
    that applies guidance itself). Writes into `out` ((N, *shape_chw), any float dtype) when given, else
    into a new float64 array, and returns it. EDM schedules take the constant guidance schedule only
    (power-cosine is defined on the training index t, which EDM has not)."""
    check_guidance_schedule(schedule, guidance_schedule)
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
        T = schedule.num_timesteps if isinstance(schedule, Schedule) else 1000   # unused by "constant"
        denoise = classifier_free_guidance(denoise, guidance, null_label, schedule=guidance_schedule,
                                           power=guidance_power, num_timesteps=T, guide_channels=guide_channels)
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        out[a:b] = sample(sampler, denoise, noise.split(a, b), (b - a, *shape_chw), labels[a:b], schedule, steps,
                          eta=eta, churn=churn, clip_denoised=clip_denoised, callback=callback)
    return out


def check_guidance_schedule(schedule: AnySchedule | str, guidance_schedule: str) -> None:
    """ValueError for a guidance schedule the contract (a schedule, or "eps" / "edm") cannot use."""
    prediction = schedule if isinstance(schedule, str) else prediction_of(schedule)
    if prediction == "edm" and guidance_schedule != "constant":
        raise ValueError(f"guidance schedule {guidance_schedule!r} is defined on the training index t; "
                         "EDM models take the constant schedule only")
