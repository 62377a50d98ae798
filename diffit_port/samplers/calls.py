"""How every sampler calls the denoiser: the runtime dtypes, the output shape check and progress ticks."""

from __future__ import annotations

from typing import Callable

import numpy as np

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Callback = Callable[[int, int], None]


class NonFiniteError(FloatingPointError):
    """A sampler met NaN or infinity in the state x or in the denoiser output: the run stops there, so that
    nothing is written from it. `step` is the 0-based denoiser call of the sampler run, `t` its time input
    (training index, or sigma for an EDM denoiser)."""

    def __init__(self, what: str, step: int, t: float):
        self.what, self.step, self.t = what, step, t
        super().__init__(f"non-finite values in the {what} at denoiser call {step + 1} (t = {t:g})")


def call(denoise: Denoise, x: np.ndarray, t: float, y: np.ndarray, step: int) -> np.ndarray:
    """One denoiser call in the runtime dtypes (float32 x and t, int64 y); the output comes back as float64.
    Raises NonFiniteError when x or the output holds NaN or infinity (`step` names the call)."""
    b, c = x.shape[0], x.shape[1]
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise NonFiniteError("sampler state x", step, t)
    out = np.asarray(denoise(x32, np.full(b, t, dtype=np.float32), y), dtype=np.float64)
    if out.shape[0] != b or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"denoiser returned shape {out.shape} for input {x.shape}; expected C or 2C channels")
    if not np.isfinite(out).all():
        raise NonFiniteError("denoiser output", step, t)
    return out


def tick(callback: Callback | None, i: int, n: int) -> None:
    if callback is not None:
        callback(i, n)


def prepare(x_T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.array(x_T, dtype=np.float64, copy=True)
    if x.ndim != 4:
        raise ValueError(f"x_T must be (B, C, H, W), got shape {x.shape}")
    return x, np.asarray(y, dtype=np.int64)
