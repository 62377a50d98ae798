"""NumPy samplers over any `denoise(x, t, y)` callable, torch-free: the schedules (`schedule`), per-image noise
(`noise`), classifier-free guidance (`guidance`), the VP eps samplers (`vp`), EDM's samplers (`edm`) and the
registry (`run`)."""

from .calls import Callback, Denoise, NonFiniteError
from .edm import Churn, EDMSchedule, edm_dpmpp_2m, edm_heun, edm_stochastic
from .guidance import classifier_free_guidance, guidance_scale
from .noise import Noise, NoiseSource
from .run import (EDM_SAMPLERS, SAMPLER_NAMES, SAMPLERS, SAMPLERS_BY_PREDICTION, check_guidance_schedule,
                  check_sampler, num_denoiser_calls, prediction_of, sample, sample_batches, schedule_from_config)
from .schedule import Posterior, Schedule, beta_schedule, karras_sigmas, posterior, respace
from .vp import ddim, ddpm, dpmpp_2m, heun

__all__ = ["EDM_SAMPLERS", "SAMPLERS", "SAMPLERS_BY_PREDICTION", "SAMPLER_NAMES", "Callback", "Churn", "Denoise",
           "EDMSchedule", "Noise", "NoiseSource", "NonFiniteError", "Posterior", "Schedule", "beta_schedule",
           "check_guidance_schedule", "check_sampler", "classifier_free_guidance", "ddim", "ddpm", "dpmpp_2m",
           "edm_dpmpp_2m", "edm_heun", "edm_stochastic", "guidance_scale", "heun", "karras_sigmas",
           "num_denoiser_calls", "posterior", "prediction_of", "respace", "sample",
           "sample_batches", "schedule_from_config"]
