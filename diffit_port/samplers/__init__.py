"""NumPy samplers over any `denoise(x, t, y)` callable, torch-free: the schedules (`schedule`), per-image noise
(`noise`), classifier-free guidance (`guidance`), the VP eps samplers (`vp`) and the registry (`run`)."""

from .calls import Callback, Denoise, NonFiniteError
from .guidance import classifier_free_guidance, guidance_scale
from .noise import Noise, NoiseSource
from .run import SAMPLERS, check_sampler, num_denoiser_calls, sample, sample_batches
from .schedule import Posterior, Schedule, beta_schedule, karras_sigmas, posterior, respace
from .vp import ddim, ddpm, dpmpp_2m, heun

__all__ = ["SAMPLERS", "Callback", "Denoise", "Noise", "NoiseSource", "NonFiniteError", "Posterior", "Schedule",
           "beta_schedule", "check_sampler", "classifier_free_guidance", "ddim", "ddpm", "dpmpp_2m",
           "guidance_scale", "heun", "karras_sigmas", "num_denoiser_calls", "posterior", "respace", "sample",
           "sample_batches"]
