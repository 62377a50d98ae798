"""The device loop's coefficient plans of both contracts (loop_plan) against the NumPy samplers: each plan executed
in NumPy float64 from its update equations, term by term and as one matrix, on smooth fake denoisers."""

from __future__ import annotations

import numpy as np
import pytest

from diffit_port import samplers
from diffit_port.runtimes.loop_graph import LoopSpec
from diffit_port.runtimes.loop_plan import EDM_PLANS, PLANS, make_plan

SAMPLERS = sorted(samplers.SAMPLERS)
EDM_SAMPLERS = sorted(samplers.EDM_SAMPLERS)


def test_every_sampler_has_a_plan():
    assert set(PLANS) == set(samplers.SAMPLERS) and set(EDM_PLANS) == set(samplers.EDM_SAMPLERS)


# --------------------------------------------------------------------------------------------------
# Plans, executed in NumPy float64 from the update equations of loop_plan's docstring
# --------------------------------------------------------------------------------------------------

def run_plan(plan, denoise, x_T, y, noise_rows, channels: int, null_label=None, z0=None) -> np.ndarray:
    """The update of loop_plan's docstring, term by term, in float64 (guidance as samplers.guidance does it);
    `z0` the draw of the first state's noise (plan.init_noise)."""
    c = plan.coef
    x = plan.init_scale * x_T + (plan.init_noise * z0 if plan.init_noise else 0.0)
    base, hist = x.copy(), np.zeros_like(x)
    x_in = plan.in_scale0 * x
    for n in range(plan.num_calls):
        t = np.full(len(x), plan.t[n], np.float32)
        out = np.asarray(denoise(x_in.astype(np.float32), t, y), np.float64)
        if null_label is not None:
            unc = np.asarray(denoise(x_in.astype(np.float32), t, np.full_like(y, null_label)), np.float64)
            out[:, :channels] = unc[:, :channels] + c["s"][n] * (out[:, :channels] - unc[:, :channels])
        eps, var = out[:, :channels], out[:, channels:]
        d = c["a_x"][n] * x + c["a_o"][n] * eps
        d = np.clip(d, -1.0, 1.0) if plan.clip else d
        s = c["b_x"][n] * x + c["b_d"][n] * d + c["b_o"][n] * eps
        x_new = c["c_b"][n] * base + c["c_x"][n] * x + c["c_d"][n] * d + c["c_s"][n] * s + c["c_h"][n] * hist
        if plan.noise[n]:
            x_new = x_new + c["c_z"][n] * np.exp(c["g1"][n] * var if var.size else 0.0) * noise_rows[n]
        hist = c["h_d"][n] * d + c["h_s"][n] * s
        base = c["k_b"][n] * base + c["k_x"][n] * x + c["k_n"][n] * x_new
        x, x_in = x_new, c["i_s"][n] * x_new
    return x


def fake_denoiser(learned: bool):
    """A smooth function of x, t and y standing in for a network (outputs O(1), varied in t)."""
    def denoise(x, t, y):
        tt = t[:, None, None, None] / 1000.0
        eps = np.tanh(x * (0.5 + tt) + 0.1 * y[:, None, None, None])
        return np.concatenate([eps, np.cos(x + tt)], axis=1) if learned else eps
    return denoise


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("clip", [False, True])
def test_plan_reproduces_the_numpy_sampler(sampler, clip):
    schedule = samplers.Schedule(samplers.beta_schedule("cosine", 1000))
    shape, y = (2, 1, 4, 4), np.array([3, 10])
    cases = [(False, 0.0, 1.0)]
    if sampler == "ddpm":
        cases.append((True, 0.0, 1.0))          # learned variance
    if sampler == "ddim":
        cases.append((False, 0.7, 1.0))         # eta > 0: fresh noise every step
    cases.append((False, 0.0, 2.5))             # guidance
    for learned, eta, w in cases:
        denoise = fake_denoiser(learned)
        guided = samplers.classifier_free_guidance(denoise, w, 10) if w != 1 else denoise
        extra = dict(eta=eta) if sampler == "ddim" else {}
        host = samplers.sample(sampler, guided, samplers.NoiseSource(0, 2), shape, y, schedule, 7,
                               clip_denoised=clip, **extra)
        plan = make_plan(sampler, schedule, 7, clip=clip, eta=eta, learned_variance=learned, guidance=w)
        noise = samplers.NoiseSource(0, 2)
        x_T = noise.standard_normal(shape)
        rows = {n: noise.standard_normal(shape) for n in np.flatnonzero(plan.noise)}
        mine = run_plan(plan, denoise, x_T, y, rows, 1, null_label=10 if w != 1 else None)
        scale = max(1.0, float(np.abs(host).max()))
        assert np.abs(mine - host).max() <= 1e-9 * scale, (sampler, clip, learned, eta, w)


def fake_edm_denoiser(x, sigma, y):
    """A smooth stand-in for D(x; sigma): near x at small sigma, a bounded function of x / sigma and y at large."""
    s, label = sigma[:, None, None, None].astype(np.float64), y[:, None, None, None]
    return (0.25 / (s * s + 0.25)) * x + (s / np.sqrt(s * s + 0.25)) * np.tanh(x / (1 + s) + 0.1 * label)


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
@pytest.mark.parametrize("clip", [False, True])
def test_edm_plan_reproduces_the_numpy_sampler(sampler, clip):
    schedule = samplers.EDMSchedule()
    shape, y = (2, 1, 4, 4), np.array([3, 10])
    # churn: the default (no churn at sigma_max = 80 > S_max) and one that churns from the first step on
    churns = [None, samplers.Churn(s_churn=30.0, s_max=100.0)] if sampler == "edm-stochastic" else [None]
    for churn in churns:
        for w in (1.0, 2.5):
            guided = samplers.classifier_free_guidance(fake_edm_denoiser, w, 10) if w != 1 else fake_edm_denoiser
            host = samplers.sample(sampler, guided, samplers.NoiseSource(0, 2), shape, y, schedule, 7,
                                   clip_denoised=clip, churn=churn)
            plan = make_plan(sampler, schedule, 7, clip=clip, churn=churn, guidance=w)
            assert (plan.init_noise > 0) == (churn is not None)
            noise = samplers.NoiseSource(0, 2)
            x_T = noise.standard_normal(shape)
            z0 = noise.standard_normal(shape) if plan.init_noise else None
            rows = {n: noise.standard_normal(shape) for n in np.flatnonzero(plan.noise)}
            assert (len(rows) > 0) == (sampler == "edm-stochastic")
            mine = run_plan(plan, fake_edm_denoiser, x_T, y, rows, 1, null_label=10 if w != 1 else None, z0=z0)
            assert np.abs(mine - host).max() <= 1e-9 * max(1.0, float(np.abs(host).max())), (sampler, clip, churn, w)


def run_matrix(plan, denoise, x_T, y, noise_rows, null_label=None, z0=None) -> np.ndarray:
    """The update as LoopPlan.matrix's product over the rows [*state, E, z], in float64; E guided as the host does
    it (rounded to the denoiser's output dtype, as the device loop rounds it to float32)."""
    guided, noise = null_label is not None, bool(plan.noise.any())
    state = LoopSpec(plan.used(), False, noise, guided, 1, 1, 1).state()
    m = plan.matrix(state, guided, noise)
    x = plan.init_scale * x_T + (plan.init_noise * z0 if plan.init_noise else 0.0)
    rows = {"x": x, "base": x.copy(), "hist": np.zeros_like(x)}
    x_in = plan.in_scale0 * x
    for n in range(plan.num_calls):
        t = np.full(len(x), plan.t[n], np.float32)
        c = np.asarray(denoise(x_in.astype(np.float32), t, y))
        e = c.astype(np.float64)
        if guided:
            u = np.asarray(denoise(x_in.astype(np.float32), t, np.full_like(y, null_label)), np.float64)
            e = (u + plan.coef["s"][n] * (e - u)).astype(c.dtype).astype(np.float64)
        stack = [rows[k] for k in state] + [e] + ([noise_rows.get(n, np.zeros_like(x))] if noise else [])
        new = np.einsum("rk,k...->r...", m[n], np.stack(stack))
        rows.update(zip(state, new))
        x_in = new[len(state)]
        assert all(np.array_equal(new[len(state)], r) for r in new[len(state):])   # one input row per half
    return rows["x"]


MATRIX_CASES = [("eps", s, kw) for s in SAMPLERS for kw in ([{}, {"eta": 0.7}] if s == "ddim" else [{}])] + \
    [("edm", s, kw) for s in EDM_SAMPLERS
     for kw in ([{}, {"churn": samplers.Churn(s_churn=30.0, s_max=100.0)}] if s == "edm-stochastic" else [{}])]


@pytest.mark.parametrize("contract, sampler, kw", MATRIX_CASES)
def test_matrix_plan_reproduces_the_numpy_sampler(contract, sampler, kw):
    """LoopPlan.matrix (the update composed into one matrix, unclipped plans without learned variance) against the
    NumPy samplers, float64, guidance off and on."""
    schedule = (samplers.Schedule(samplers.beta_schedule("cosine", 1000)) if contract == "eps" else
                samplers.EDMSchedule())
    denoise = fake_denoiser(False) if contract == "eps" else fake_edm_denoiser
    shape, y = (2, 1, 4, 4), np.array([3, 10])
    for w in (1.0, 2.5):
        guided = samplers.classifier_free_guidance(denoise, w, 10) if w != 1 else denoise
        host = samplers.sample(sampler, guided, samplers.NoiseSource(0, 2), shape, y, schedule, 7, **kw)
        plan = make_plan(sampler, schedule, 7, clip=False, guidance=w, **kw)
        noise = samplers.NoiseSource(0, 2)
        x_T = noise.standard_normal(shape)
        z0 = noise.standard_normal(shape) if plan.init_noise else None
        rows = {n: noise.standard_normal(shape) for n in np.flatnonzero(plan.noise)}
        mine = run_matrix(plan, denoise, x_T, y, rows, null_label=10 if w != 1 else None, z0=z0)
        assert np.abs(mine - host).max() <= 1e-9 * max(1.0, float(np.abs(host).max())), (sampler, kw, w)


def test_matrix_refuses_clipped_and_learned_variance_plans():
    schedule = samplers.Schedule(samplers.beta_schedule("cosine", 1000))
    for plan in (make_plan("ddim", schedule, 4, clip=True), make_plan("ddpm", schedule, 4, clip=False,
                                                                       learned_variance=True)):
        with pytest.raises(ValueError, match="not one matrix"):
            plan.matrix(("x",), False, True)


def test_make_plan_checks_the_arguments_as_the_samplers_do():
    vp, edm = samplers.Schedule(samplers.beta_schedule("linear", 1000)), samplers.EDMSchedule()
    with pytest.raises(ValueError, match="'ddim' does not exist for edm models"):
        make_plan("ddim", edm, 5, clip=False)
    with pytest.raises(ValueError, match="'edm-stochastic' does not exist for eps models"):
        make_plan("edm-stochastic", vp, 5, clip=False)
    with pytest.raises(ValueError, match="constant schedule only"):
        make_plan("heun", edm, 5, clip=False, guidance=2.0, guidance_schedule="power-cosine")
    with pytest.raises(ValueError, match="churn applies only to edm-stochastic"):
        make_plan("heun", edm, 5, clip=False, churn=samplers.Churn())
