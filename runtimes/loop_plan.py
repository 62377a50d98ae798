"""Per-call coefficients of every sampler as one affine update, computed on the host in float64, so that the
device loop (`device_loop`) runs each sampler as the same small graph with a different coefficient table.

After denoiser call n, with E the (guided) eps channels of the output and V its variance channels:

    D      = clip?(a_x x + a_o E)                                   # the data prediction x_0 (or EDM's D)
    S      = b_x x + b_d D + b_o E                                  # the slope / the eps consistent with D
    x'     = c_b base + c_x x + c_d D + c_s S + c_h hist + c_z exp(g1 V) z_n
    hist'  = h_d D + h_s S                                          # DPM-Solver++ x0_prev, Heun's first slope
    base'  = k_b base + k_x x + k_n x'                              # where a Heun step started
    input of call n + 1 = i_s x'  (doubled for guidance), at time t[n + 1]

A column that is zero for every call drops its term from the graph, a column of ones its multiply; `s` is
the guidance scale of the call. A sampler is one function that fills these columns: the VP eps samplers on a
`Schedule` (`PLANS`) and EDM's samplers on an `EDMSchedule` (`EDM_PLANS`, where E is the denoiser's D itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from diffit_port import samplers
from diffit_port.samplers import Churn, EDMSchedule, Schedule, karras_sigmas, posterior, respace

COLUMNS = ("s", "a_x", "a_o", "b_x", "b_d", "b_o", "c_b", "c_x", "c_d", "c_s", "c_h", "c_z", "g1",
           "h_d", "h_s", "k_b", "k_x", "k_n", "i_s")
ONE_BY_DEFAULT = ("s", "i_s")   # the guidance scale and the input scale; every other column defaults to 0


@dataclass
class LoopPlan:
    """One sampler run as n denoiser calls: time inputs, coefficient columns (float64 (n,) each), which calls
    draw fresh noise for their update, whether D is clipped to [-1, 1], and how x_T becomes the first state."""

    t: np.ndarray                                  # (n,) float64: the time input of each call
    coef: dict[str, np.ndarray] = field(default_factory=dict)
    noise: np.ndarray | None = None                # (n,) bool: the update after call n adds c_z z_n
    clip: bool = False
    init_scale: float = 1.0                        # first state x = init_scale * x_T + init_noise * z_0
    init_noise: float = 0.0                        # z_0: a draw after x_T (EDM's churn before the first call)
    in_scale0: float = 1.0                         # first denoiser input = in_scale0 * x

    def __post_init__(self):
        n = len(self.t)
        for name in COLUMNS:
            self.coef.setdefault(name, np.full(n, 1.0 if name in ONE_BY_DEFAULT else 0.0))
        unknown = set(self.coef) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown coefficient columns {sorted(unknown)}")
        if self.noise is None:
            self.noise = np.zeros(n, dtype=bool)

    @property
    def num_calls(self) -> int:
        return len(self.t)

    def set(self, n: int, **values: float) -> None:
        for name, v in values.items():
            self.coef[name][n] = v

    def used(self) -> tuple[str, ...]:
        """The columns the update graph needs: not identically zero (ones for the scale columns)."""
        return tuple(c for c in COLUMNS if np.any(self.coef[c] != (1.0 if c in ONE_BY_DEFAULT else 0.0)))

    def ones(self) -> tuple[str, ...]:
        """The used columns that are 1 in every call (EDM's a_o, DPM-Solver++'s h_d): the graph adds them unscaled."""
        return tuple(c for c in self.used() if np.all(self.coef[c] == 1.0))

    def table(self, columns: tuple[str, ...]) -> np.ndarray:
        """float64 (n, K, 1, 1): row n holds call n's coefficients (each broadcasts against (B, C, H, W))."""
        return np.stack([self.coef[c] for c in columns], axis=1).astype(np.float64)[:, :, None, None]

    def matrix(self, state: tuple[str, ...], guided: bool, noise: bool) -> np.ndarray:
        """float64 (n, len(state) + G, K): the update of call n as one matrix over the rows [*state, E, z] (z only
        with `noise`; E the guided output, rounded to float32 first as the host rounds it), for plans
        without clipping or learned variance. Its rows give the new state (in `state` order: x, then base / hist
        where present), then the next input, repeated for the two halves of the doubled batch when `guided`
        (G = 2, else 1): the docstring's equations composed, every term being affine in those rows."""
        if self.clip or np.any(self.coef["g1"] != 0):
            raise ValueError("a clipped or learned-variance update is not one matrix")
        c, n = self.coef, self.num_calls
        names = [*state, "E", *(["z"] if noise else [])]
        unit = {k: np.zeros((n, len(names))) for k in ("x", "base", "hist", "E", "z")}
        for i, k in enumerate(names):
            unit[k][:, i] = 1.0
        col = lambda name: c[name][:, None]  # noqa: E731
        d = col("a_x") * unit["x"] + col("a_o") * unit["E"]
        s = col("b_x") * unit["x"] + col("b_d") * d + col("b_o") * unit["E"]
        x_new = (col("c_b") * unit["base"] + col("c_x") * unit["x"] + col("c_d") * d + col("c_s") * s
                 + col("c_h") * unit["hist"] + col("c_z") * unit["z"])
        new = {"x": x_new, "hist": col("h_d") * d + col("h_s") * s,
               "base": col("k_b") * unit["base"] + col("k_x") * unit["x"] + col("k_n") * x_new}
        return np.stack([new[k] for k in state] + [col("i_s") * x_new] * (2 if guided else 1), axis=1)


def _x0_terms(plan: LoopPlan, n: int, alpha_bar: float, clip: bool) -> None:
    # x_0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (Ho et al. eq. 4 inverted, as samplers.vp.predict_x0).
    plan.set(n, a_x=1.0 / math.sqrt(alpha_bar), a_o=-math.sqrt(1.0 - alpha_bar) / math.sqrt(alpha_bar))


def ddim_plan(schedule: Schedule, steps: int, *, clip: bool, eta: float = 0.0, **_: object) -> LoopPlan:
    """samplers.ddim (Song et al. 2021, eqs. 12 and 16) as coefficients."""
    ts = respace(schedule.num_timesteps, steps)
    ab = schedule.alphas_cumprod[ts]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    order = list(range(steps - 1, -1, -1))
    plan = LoopPlan(ts[order].astype(np.float64), clip=clip)
    for n, i in enumerate(order):
        _x0_terms(plan, n, ab[i], clip)
        if clip:  # the eps consistent with the clipped x_0
            plan.set(n, b_x=1.0 / math.sqrt(1.0 - ab[i]), b_d=-math.sqrt(ab[i]) / math.sqrt(1.0 - ab[i]))
        else:
            plan.set(n, b_o=1.0)
        sigma = eta * math.sqrt((1.0 - ab_prev[i]) / (1.0 - ab[i]) * (1.0 - ab[i] / ab_prev[i]))
        plan.set(n, c_d=math.sqrt(ab_prev[i]), c_s=math.sqrt(max(1.0 - ab_prev[i] - sigma**2, 0.0)), c_z=sigma)
        plan.noise[n] = sigma > 0
    return plan


def ddpm_plan(schedule: Schedule, steps: int, *, clip: bool, learned_variance: bool = False,
              **_: object) -> LoopPlan:
    """samplers.ddpm (Ho et al. eqs. 6-7; learned variance as Nichol & Dhariwal eq. 15) as coefficients."""
    ts = respace(schedule.num_timesteps, steps)
    post = posterior(schedule.alphas_cumprod[ts])
    order = list(range(steps - 1, -1, -1))
    plan = LoopPlan(ts[order].astype(np.float64), clip=clip)
    for n, i in enumerate(order):
        _x0_terms(plan, n, post.alpha_bar[i], clip)
        plan.set(n, c_d=post.posterior_mean_coef_x0[i], c_x=post.posterior_mean_coef_xt[i])
        if i == 0:
            continue  # the last step adds no noise
        log_small = post.posterior_log_variance_clipped[i]
        if learned_variance:
            # 0.5 log var = 0.5 (f log beta + (1 - f) log beta~), f = (v + 1) / 2: exp(g0) * exp(g1 v)
            g1 = 0.25 * (math.log(post.betas[i]) - log_small)
            plan.set(n, c_z=math.exp(0.5 * log_small + g1), g1=g1)
        else:
            plan.set(n, c_z=math.exp(0.5 * log_small))
        plan.noise[n] = True
    return plan


def dpmpp_2m_plan(schedule: Schedule, steps: int, *, clip: bool, **_: object) -> LoopPlan:
    """samplers.dpmpp_2m (Lu et al. 2022, Alg. 2, lower order at the first and the final steps) as coefficients."""
    ts = respace(schedule.num_timesteps, steps)[::-1]
    ab = schedule.alphas_cumprod[ts]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha / sigma)
    plan = LoopPlan(ts.astype(np.float64), clip=clip)
    h_prev = 0.0
    for i in range(steps):
        _x0_terms(plan, i, ab[i], clip)
        if i == steps - 1:
            plan.set(i, c_d=1.0)  # the last step to sigma = 0 returns the data prediction
            continue
        h = lam[i + 1] - lam[i]
        m = -alpha[i + 1] * math.expm1(-h)
        if i == 0 or i == steps - 2:
            plan.set(i, c_d=m)
        else:
            r = h_prev / h
            plan.set(i, c_d=m * (1.0 + 1.0 / (2.0 * r)), c_h=-m / (2.0 * r))
        plan.set(i, c_x=sigma[i + 1] / sigma[i], h_d=1.0)
        h_prev = h
    return plan


def heun_plan(schedule: Schedule, steps: int, *, clip: bool, **_: object) -> LoopPlan:
    """samplers.heun (Karras et al. 2022, Alg. 1, S_churn = 0, VE units of the VP model) as coefficients."""
    sig = karras_sigmas(schedule.sigmas[0], schedule.sigmas[-1], steps)
    times, rows = [], []
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        times.append(s)
        # Euler predictor: x' = x + (s_next - s) S; keep S and the step's start for the corrector.
        rows.append(dict(c_x=1.0, c_s=s_next - s, h_s=1.0, k_x=1.0, i_s=1.0 / math.sqrt(1.0 + s_next**2)))
        if s_next > 0:
            times.append(s_next)
            # Corrector: x' = base + (s_next - s) (hist + S) / 2.
            rows.append(dict(c_b=1.0, c_h=0.5 * (s_next - s), c_s=0.5 * (s_next - s),
                             i_s=1.0 / math.sqrt(1.0 + s_next**2)))
    rows[-1] = {k: v for k, v in rows[-1].items() if k in ("c_x", "c_s")}  # the final Euler step to sigma = 0
    sigmas = np.array(times)
    plan = LoopPlan(schedule.sigma_to_t(sigmas), clip=clip, init_scale=math.sqrt(1.0 + sig[0] ** 2),
                    in_scale0=1.0 / math.sqrt(1.0 + sig[0] ** 2))
    for n, (s, row) in enumerate(zip(sigmas, rows)):
        if clip:   # S = (x - clip(x - s eps)) / s
            plan.set(n, a_x=1.0, a_o=-s, b_x=1.0 / s, b_d=-1.0 / s)
        else:      # S = eps
            plan.set(n, b_o=1.0)
        plan.set(n, **row)
    return plan


def edm_heun_plan(schedule: EDMSchedule, steps: int, *, clip: bool, churn: Churn | None = None,
                  **_: object) -> LoopPlan:
    """samplers.edm_heun (Karras et al. 2022, Alg. 1; with `churn` Alg. 2) as coefficients, on D itself:
    S = (x - D) / sigma. The churn noise of step i + 1 is added by the update after step i's last call (the
    host draws it at the start of step i + 1: the same draw order); step 0's goes into the first state."""
    sig = schedule.sigmas(steps)
    hats = [s * (1.0 + (churn.gamma(s, steps) if churn is not None else 0.0)) for s in sig[:-1]]
    # Alg. 2 line 6: the noise that raises sigma_i to sigma_hat_i, scaled by S_noise
    lift = [math.sqrt(h * h - s * s) * churn.s_noise if churn is not None else 0.0 for h, s in zip(hats, sig)]
    times, rows = [], []
    for i in range(steps):
        s_hat, s_next = hats[i], sig[i + 1]
        times.append(s_hat)
        # Euler predictor from x_hat: x' = x + (s_next - s_hat) S; keep S (hist) and x_hat (base).
        rows.append(dict(b_x=1.0 / s_hat, b_d=-1.0 / s_hat, c_x=1.0, c_s=s_next - s_hat, h_s=1.0, k_x=1.0))
        if s_next > 0:
            times.append(s_next)
            # Corrector: x' = x_hat + (s_next - s_hat) (S_hat + S') / 2.
            rows.append(dict(b_x=1.0 / s_next, b_d=-1.0 / s_next, c_b=1.0, c_h=0.5 * (s_next - s_hat),
                             c_s=0.5 * (s_next - s_hat)))
        if i + 1 < steps and lift[i + 1] > 0:
            rows[-1].update(c_z=lift[i + 1])
    plan = LoopPlan(np.array(times), clip=clip, init_scale=sig[0], init_noise=lift[0])
    for n, row in enumerate(rows):
        plan.set(n, a_o=1.0, **row)      # D = clip?(E): the EDM denoiser returns D
        plan.noise[n] = row.get("c_z", 0.0) > 0
    return plan


def edm_stochastic_plan(schedule: EDMSchedule, steps: int, *, clip: bool, churn: Churn | None = None,
                        **_: object) -> LoopPlan:
    """samplers.edm_stochastic: Alg. 2 with `churn` (default Churn())."""
    return edm_heun_plan(schedule, steps, clip=clip, churn=churn or Churn())


def edm_dpmpp_2m_plan(schedule: EDMSchedule, steps: int, *, clip: bool, **_: object) -> LoopPlan:
    """samplers.edm_dpmpp_2m (Lu et al. 2022, Alg. 2 with alpha = 1, lambda = -ln sigma; first order on the
    first step, D itself on the last) as coefficients."""
    sig = schedule.sigmas(steps)
    plan = LoopPlan(sig[:-1].copy(), clip=clip, init_scale=sig[0])
    h_prev = 0.0
    for i in range(steps):
        plan.set(i, a_o=1.0, h_d=1.0)
        if sig[i + 1] == 0:
            plan.set(i, c_d=1.0)
            continue
        h = math.log(sig[i] / sig[i + 1])
        m = -math.expm1(-h)
        if i == 0:
            plan.set(i, c_d=m)
        else:
            r = h_prev / h
            plan.set(i, c_d=m * (1.0 + 1.0 / (2.0 * r)), c_h=-m / (2.0 * r))
        plan.set(i, c_x=sig[i + 1] / sig[i])
        h_prev = h
    return plan


# sampler name -> plan(schedule, steps, *, clip, eta, learned_variance, churn) -> LoopPlan, one registry per
# contract with the keys of samplers.SAMPLERS / samplers.EDM_SAMPLERS (test_device_loop checks both).
PLANS: dict[str, Callable[..., LoopPlan]] = {"ddim": ddim_plan, "ddpm": ddpm_plan, "dpmpp-2m": dpmpp_2m_plan,
                                             "heun": heun_plan}
EDM_PLANS: dict[str, Callable[..., LoopPlan]] = {"heun": edm_heun_plan, "edm-stochastic": edm_stochastic_plan,
                                                 "dpmpp-2m": edm_dpmpp_2m_plan}
PLANS_BY_PREDICTION = {"eps": PLANS, "edm": EDM_PLANS}


def make_plan(sampler: str, schedule: Schedule | EDMSchedule, steps: int, *, clip: bool, eta: float = 0.0,
              learned_variance: bool = False, churn: Churn | None = None, guidance: float = 1.0,
              guidance_schedule: str = "constant", guidance_power: float = 4.0) -> LoopPlan:
    """The plan of one run of `sampler` on the schedule's contract (a VP `Schedule`: eps samplers; an
    `EDMSchedule`: EDM's), with the guidance scale s(t) of each call in column `s`. The arguments are checked
    as samplers.sample and sample_batches check them."""
    prediction = samplers.prediction_of(schedule)
    samplers.check_sampler(sampler, prediction)
    samplers.check_guidance_schedule(prediction, guidance_schedule)
    if eta != 0 and not (sampler == "ddim" and prediction == "eps"):
        raise ValueError(f"eta applies only to ddim, not {sampler!r}")
    if churn is not None and sampler != "edm-stochastic":
        raise ValueError(f"churn applies only to edm-stochastic, not {sampler!r}")
    plans = PLANS_BY_PREDICTION[prediction]
    if sampler not in plans:
        raise ValueError(f"the device loop has no plan for sampler {sampler!r}")
    plan = plans[sampler](schedule, steps, clip=clip, eta=eta, learned_variance=learned_variance, churn=churn)
    if guidance != 1.0 or guidance_schedule != "constant":
        T = schedule.num_timesteps if isinstance(schedule, Schedule) else 1000   # unused by "constant"
        plan.coef["s"] = samplers.guidance_scale(plan.t, guidance, guidance_schedule, guidance_power, T)
    assert plan.num_calls == samplers.num_denoiser_calls(sampler, steps)
    return plan
