"""EDM samplers against the closed-form Gaussian-data denoiser and against diffusers' schedulers (float64)."""

import math

import numpy as np
import pytest

from diffit_port.config import DiffusionConfig
from diffit_port.samplers import (
    EDM_SAMPLERS,
    SAMPLER_NAMES,
    Churn,
    EDMSchedule,
    NoiseSource,
    Schedule,
    check_sampler,
    edm_dpmpp_2m,
    edm_heun,
    num_denoiser_calls,
    sample,
    sample_batches,
    schedule_from_config,
)

# Data distribution: x0 ~ N(MU, S^2) independently per pixel; x = x0 + sigma n.
MU, S = 0.3, 0.5
EDM = EDMSchedule()                       # sigma in [0.002, 80], rho 7 (EDM's)

# Max-abs error against the exact PF-ODE end point, with x_T from NoiseSource(0, 64) of shape (64, 1, 2, 2); each
# bound is ~1.5x the measured error (docs/SAMPLERS.md), tight enough that losing an order of accuracy fails.
HEUN_18_TOL = 0.12        # measured 7.8e-2 at 18 steps (35 calls), 1.7e-2 at 36, 5.0e-4 at 200
DPMPP_20_TOL = 0.105      # measured 7.0e-2 at 20 steps, 1.5e-2 at 40
# Where diffusers and we follow the same convention the whole trajectories agree to float64 rounding, plus one
# float32 rounding of the denoiser's inputs (both runs feed it float32 x and sigma, as every runtime does).
DIFFUSERS_TOL = 1e-6
# Statistics: N iid pixels; a 4-standard-error band on mean and variance (as tests/test_samplers.py).
STAT_SHAPE = (512, 1, 8, 8)
STAT_N = math.prod(STAT_SHAPE)
STAT_Z = 4.0


def exact_d(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[x0 | x] for Gaussian data: linear in x (the exact denoiser D(x; sigma))."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_denoiser(calls: list | None = None):
    """A Denoise returning the exact D for the float32 x and sigma it is given (as a runtime would)."""

    def denoise(x, sigma, y):
        assert x.dtype == np.float32 and sigma.dtype == np.float32 and y.dtype == np.int64
        if calls is not None:
            calls.append((x.astype(np.float64), sigma.astype(np.float64)))
        s = sigma.astype(np.float64).reshape(-1, 1, 1, 1)
        return exact_d(x.astype(np.float64), s).astype(np.float32)

    return denoise


def ode_start() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-normal x_T, labels and the exact PF-ODE end point from x = sigma_max x_T: (x - MU) / sqrt(S^2 +
    sigma^2) is constant along dx/dsigma = (x - D) / sigma for Gaussian data."""
    x_T = NoiseSource(0, 64).standard_normal((64, 1, 2, 2))
    exact = MU + S * (EDM.sigma_max * x_T - MU) / math.sqrt(S**2 + EDM.sigma_max**2)
    return x_T, np.zeros(64, np.int64), exact


# 1. The grid and the schedule ---------------------------------------------------------------------------------

def test_schedule_grid_and_from_config():
    cfg = DiffusionConfig(prediction="edm", sigma_min=0.01, sigma_max=50.0, rho=5.0, sigma_data=1.0)
    sch = schedule_from_config(cfg)
    assert isinstance(sch, EDMSchedule) and (sch.sigma_min, sch.sigma_max, sch.rho, sch.sigma_data) == (0.01, 50, 5, 1)
    assert schedule_from_config(cfg.to_dict()) == sch
    assert isinstance(schedule_from_config(DiffusionConfig()), Schedule)
    with pytest.raises(ValueError, match="edm"):
        EDMSchedule.from_config(DiffusionConfig())
    with pytest.raises(ValueError):
        Schedule.from_config(cfg)
    with pytest.raises(ValueError):
        EDMSchedule(sigma_min=1.0, sigma_max=1.0)
    s = EDM.sigmas(18)
    assert s.dtype == np.float64 and s.shape == (19,) and s[0] == 80.0 and s[-2] == 0.002 and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)
    i = np.arange(18) / 17          # Karras et al. eq. 5
    np.testing.assert_allclose(s[:-1], (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-13)
    np.testing.assert_array_equal(EDM.sigmas(1), [80.0, 0.0])


def test_grid_matches_diffusers():
    """Our float64 grid equals diffusers' EDM Karras sigmas (its formula, evaluated in float64), and its float32
    copy from set_timesteps to float32 rounding."""
    torch = pytest.importorskip("torch")
    from diffusers import EDMDPMSolverMultistepScheduler

    sch = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    for n in (2, 18, 40):
        ours = EDM.sigmas(n)
        theirs = sch._compute_karras_sigmas(torch.linspace(0, 1, n, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ours[:-1], theirs, rtol=1e-13, atol=0)
        sch.set_timesteps(n)
        np.testing.assert_allclose(ours, sch.sigmas.double().numpy(), rtol=1e-6, atol=0)   # float32 in diffusers
        assert sch.sigmas[-1] == 0


# 2. Against the exact PF-ODE --------------------------------------------------------------------------------------

def test_heun_matches_ode_at_second_order():
    """EDM Algorithm 1 at 18 steps (35 calls, EDM's CIFAR-10 setting) lands on the PF-ODE solution, with
    second-order convergence (~4x smaller error per halving of the step)."""
    x_T, y, exact = ode_start()
    calls: list = []
    err = {n: float(np.abs(edm_heun(gaussian_denoiser(calls if n == 18 else None), x_T, y, EDM, n) - exact).max())
           for n in (18, 36)}
    print(f"\nedm heun max error vs PF-ODE: 18 steps {err[18]:.3e}, 36 steps {err[36]:.3e}")
    assert len(calls) == num_denoiser_calls("heun", 18) == 35
    assert calls[0][1][0] == np.float32(80.0) and calls[-1][1][0] == np.float32(0.002)   # no call at sigma = 0
    assert err[18] < HEUN_18_TOL
    assert err[18] / err[36] > 3.5


def test_dpmpp_2m_matches_ode_at_second_order():
    x_T, y, exact = ode_start()
    err = {n: float(np.abs(edm_dpmpp_2m(gaussian_denoiser(), x_T, y, EDM, n) - exact).max()) for n in (20, 40)}
    print(f"\nedm dpmpp-2m max error vs PF-ODE: 20 steps {err[20]:.3e}, 40 steps {err[40]:.3e}")
    assert err[20] < DPMPP_20_TOL
    assert err[20] / err[40] > 3.5        # second order


def chain_moments(steps: int, churn: Churn) -> tuple[float, float]:
    """Exact mean and variance of Algorithm 2's output for Gaussian data: with the exact (linear) D every step
    maps u = x - MU to g u plus independent Gaussian churn noise, so both moments propagate in closed form."""
    sig = EDM.sigmas(steps)
    k = lambda s: S**2 / (S**2 + s**2)           # noqa: E731  D = MU + k (x - MU)
    mean, var = -MU, EDM.sigma_max**2             # u = sigma_max x_T - MU
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        gamma = min(churn.s_churn / steps, math.sqrt(2) - 1) if churn.s_min <= s <= churn.s_max else 0.0  # Alg. 2
        s_hat = s * (1 + gamma)
        var += (s_hat**2 - s**2) * churn.s_noise**2
        slope = (1 - k(s_hat)) / s_hat           # dx/dsigma = slope * u
        g = 1 + (s_next - s_hat) * slope
        if s_next > 0:
            g = 1 + (s_next - s_hat) * 0.5 * (slope + (1 - k(s_next)) / s_next * g)
        mean, var = g * mean, g * g * var
    return MU + mean, var


def test_churn_gamma():
    """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0 (Karras et al. Alg. 2, line 4)."""
    c = Churn()
    assert (c.s_churn, c.s_min, c.s_max, c.s_noise) == (40.0, 0.05, 50.0, 1.003)
    assert c.gamma(10.0, 18) == math.sqrt(2) - 1                 # 40 / 18 is above the cap
    assert Churn(s_churn=5.0).gamma(10.0, 18) == 5.0 / 18
    assert c.gamma(0.049, 18) == 0.0 and c.gamma(50.5, 18) == 0.0 and c.gamma(0.05, 18) > 0 and c.gamma(50, 18) > 0


def test_stochastic_sampler_moments():
    """Algorithm 2 (EDM's ImageNet churn settings, 18 steps) reproduces the exact moments of its own chain (whose
    variance, 0.318, is 27% above the data's at 18 steps and converges to it with more steps: 0.2525 at 256);
    with S_churn = 0 it is Algorithm 1 exactly."""
    churn = Churn()
    y = np.zeros(STAT_SHAPE[0], np.int64)
    x = sample("edm-stochastic", gaussian_denoiser(), NoiseSource(1, STAT_SHAPE[0]), STAT_SHAPE, y, EDM, 18,
               churn=churn)
    mean, var = chain_moments(18, churn)
    se_mean, se_var = math.sqrt(var / STAT_N), var * math.sqrt(2 / (STAT_N - 1))
    print(f"\nedm-stochastic: mean {x.mean():.5f} (chain {mean:.5f} +- {STAT_Z * se_mean:.4f}), var {x.var():.5f} "
          f"(chain {var:.5f} +- {STAT_Z * se_var:.4f}); data {MU}, {S**2}")
    assert abs(x.mean() - mean) < STAT_Z * se_mean and abs(x.var() - var) < STAT_Z * se_var
    m256, v256 = chain_moments(256, churn)
    assert abs(m256 - MU) < 1e-6 and abs(v256 - S**2) < 0.004
    assert chain_moments(18, Churn(s_churn=0))[1] != pytest.approx(var, rel=1e-3)   # the churn changes the chain
    det = sample("heun", gaussian_denoiser(), NoiseSource(1, 8), (8, 1, 2, 2), y[:8], EDM, 6)
    np.testing.assert_array_equal(det, sample("edm-stochastic", gaussian_denoiser(), NoiseSource(1, 8), (8, 1, 2, 2),
                                              y[:8], EDM, 6, churn=Churn(s_churn=0)))


# 3. Against diffusers, step by step ---------------------------------------------------------------------------

def _diffusers_loop(scheduler, x: np.ndarray, model_output, calls: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    scheduler.set_begin_index(0)
    sample_ = torch.from_numpy(x)
    for i in range(calls):
        k = 0 if scheduler.step_index is None else scheduler.step_index     # set by the first step()
        out = model_output(sample_.numpy(), float(scheduler.sigmas[k]))
        sample_ = scheduler.step(torch.from_numpy(out), scheduler.timesteps[i], sample_).prev_sample
    return sample_.numpy()


def _recorded(calls: list) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([c[0] for c in calls]), np.array([c[1][0] for c in calls])


def test_heun_matches_diffusers_heun_discrete_step_by_step():
    """diffusers' HeunDiscreteScheduler (prediction_type "sample": the model output is D) on our float64 sigma grid
    (its own grid comes from a VP beta table; we replace it, interleaved as it stores it). Same convention
    otherwise: Euler then trapezoid, one Euler step into sigma = 0. Every denoiser input and the end point agree."""
    torch = pytest.importorskip("torch")
    from diffusers import HeunDiscreteScheduler

    x_T, y, _ = ode_start()
    n = 18
    ours_calls: list = []
    ours = edm_heun(gaussian_denoiser(ours_calls), x_T, y, EDM, n)
    sch = HeunDiscreteScheduler(prediction_type="sample")
    sch.set_timesteps(n)
    s = torch.from_numpy(EDM.sigmas(n))
    sch.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    their_calls: list = []
    den = gaussian_denoiser(their_calls)

    def model_output(x, sigma):
        return den(x.astype(np.float32), np.full(len(x), sigma, np.float32), y).astype(np.float64)

    theirs = _diffusers_loop(sch, EDM.sigma_max * x_T, model_output, 2 * n - 1)
    (xa, sa), (xb, sb) = _recorded(ours_calls), _recorded(their_calls)
    err = {"inputs": float(np.abs(xa - xb).max()), "sigmas": float(np.abs(sa - sb).max()),
           "end": float(np.abs(ours - theirs).max())}
    print(f"\nedm heun vs diffusers HeunDiscreteScheduler, {n} steps: max abs " + ", ".join(
        f"{k} {v:.1e}" for k, v in err.items()))
    assert len(ours_calls) == len(their_calls) == 2 * n - 1
    assert max(err.values()) <= DIFFUSERS_TOL, err


@pytest.mark.parametrize("n", [6, 20])
def test_dpmpp_2m_matches_diffusers_edm_dpmsolver_step_by_step(n):
    """diffusers' EDMDPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma 0) fed the raw
    network output F = (D - c_skip x) / c_out that its own preconditioning turns back into D, on the float64 grid
    (diffusers keeps a float32 copy). Both take first-order first and final steps, so everything agrees."""
    torch = pytest.importorskip("torch")
    from diffusers import EDMDPMSolverMultistepScheduler

    x_T, y, _ = ode_start()
    ours_calls: list = []
    ours = edm_dpmpp_2m(gaussian_denoiser(ours_calls), x_T, y, EDM, n)
    sch = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0,
                                         algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    sch.set_timesteps(n)
    sch.sigmas = torch.from_numpy(EDM.sigmas(n))
    their_calls: list = []
    den = gaussian_denoiser(their_calls)

    def model_output(x, sigma):
        d = den(x.astype(np.float32), np.full(len(x), sigma, np.float32), y).astype(np.float64)
        sd = sch.config.sigma_data
        return (d - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / math.sqrt(sigma**2 + sd**2))

    theirs = _diffusers_loop(sch, EDM.sigma_max * x_T, model_output, n)
    (xa, sa), (xb, sb) = _recorded(ours_calls), _recorded(their_calls)
    err = {"inputs": float(np.abs(xa - xb).max()), "sigmas": float(np.abs(sa - sb).max()),
           "end": float(np.abs(ours - theirs).max())}
    print(f"\nedm dpmpp-2m vs diffusers EDMDPMSolverMultistepScheduler, {n} steps: max abs " + ", ".join(
        f"{k} {v:.1e}" for k, v in err.items()))
    assert len(ours_calls) == len(their_calls) == n
    assert max(err.values()) <= DIFFUSERS_TOL, err


# 4. Registry, dispatch, guidance and batching -------------------------------------------------------------------

def test_registry_per_contract():
    assert set(EDM_SAMPLERS) == {"heun", "edm-stochastic", "dpmpp-2m"}
    assert SAMPLER_NAMES == ("ddim", "ddpm", "dpmpp-2m", "edm-stochastic", "heun")
    check_sampler("edm-stochastic")
    with pytest.raises(ValueError, match="'ddim' does not exist for edm models; choose one of dpmpp-2m, "
                                         "edm-stochastic, heun"):
        check_sampler("ddim", "edm")
    with pytest.raises(ValueError, match="'edm-stochastic' does not exist for eps models"):
        check_sampler("edm-stochastic", "eps")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        check_sampler("euler")
    assert [num_denoiser_calls(s, 10) for s in ("heun", "edm-stochastic", "dpmpp-2m")] == [19, 19, 10]
    y = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="does not exist for edm"):
        sample("ddpm", gaussian_denoiser(), NoiseSource(0, 2), (2, 1, 2, 2), y, EDM, 4)
    with pytest.raises(ValueError, match="eta"):
        sample("heun", gaussian_denoiser(), NoiseSource(0, 2), (2, 1, 2, 2), y, EDM, 4, eta=0.5)
    with pytest.raises(ValueError, match="churn"):
        sample("heun", gaussian_denoiser(), NoiseSource(0, 2), (2, 1, 2, 2), y, EDM, 4, churn=Churn())


@pytest.mark.parametrize("sampler", sorted(EDM_SAMPLERS))
def test_callbacks_and_determinism(sampler):
    """Every EDM sampler ticks num_denoiser_calls times; the same seed gives the same images, another seed others."""
    ticks: list = []
    y = np.zeros(3, np.int64)
    run = lambda seed, cb=None: sample(sampler, gaussian_denoiser(), NoiseSource(seed, 3), (3, 1, 2, 2), y, EDM, 5,  # noqa: E731
                                       callback=cb)
    out = run(0, lambda i, n: ticks.append((i, n)))
    n = num_denoiser_calls(sampler, 5)
    assert ticks == [(i, n) for i in range(n)] and out.dtype == np.float64
    np.testing.assert_array_equal(out, run(0))
    assert not np.array_equal(out, run(1))


@pytest.mark.parametrize("sampler", ["heun", "edm-stochastic"])
def test_guided_batches_do_not_depend_on_the_batch_size(sampler):
    """EDM through sample_batches with guidance 3: batches of 2 (2 + 2 + 1) equal one batch of 5, the churn noise
    included (it comes from each image's own stream); guidance changes the result; power-cosine is refused."""
    null = 10

    def conditional(x, sigma, y):
        shift = np.where(y == null, -0.05, 0.02 * (y + 1)).astype(np.float32).reshape(-1, 1, 1, 1)
        return gaussian_denoiser()(x, sigma, y) + shift

    labels = np.array([0, 3, 7, 1, 9], np.int64)

    def run(batch_size, guidance=3.0, schedule="constant"):
        return sample_batches(sampler, conditional, NoiseSource(5, 5), (1, 4, 4), labels, EDM, 8,
                              batch_size=batch_size, null_label=null, guidance=guidance, guidance_schedule=schedule)

    np.testing.assert_array_equal(run(2), run(5))
    assert not np.array_equal(run(5), run(5, guidance=1.0))
    with pytest.raises(ValueError, match="power-cosine.*EDM models take the constant schedule"):
        run(5, schedule="power-cosine")


def test_clip_denoised_clips_d():
    """clip_denoised clips D to [-1, 1]: with data far outside the range the clipped samples end inside it."""
    def far(x, sigma, y):
        return np.full_like(x, 3.0)

    y = np.zeros(2, np.int64)
    for name in sorted(EDM_SAMPLERS):
        out = sample(name, far, NoiseSource(0, 2), (2, 1, 2, 2), y, EDM, 4, clip_denoised=True)
        np.testing.assert_allclose(out, 1.0, atol=1e-9)
        np.testing.assert_allclose(sample(name, far, NoiseSource(0, 2), (2, 1, 2, 2), y, EDM, 4), 3.0, atol=1e-9)
