"""Forward process, hybrid loss and the NumPy bridge of diffit_port.diffusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffit_port.config import DiffusionConfig
from diffit_port.diffusion import (ForwardProcess, discretized_gaussian_log_likelihood, normal_kl, numpy_denoiser,
                                   q_sample, training_losses, vb_terms)
from diffit_port.models import build_model, randomize_zero_init_
from diffit_port.samplers import Schedule


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request) -> Schedule:
    return Schedule.from_config(DiffusionConfig(schedule=request.param))


class FixedOutput(nn.Module):
    """A 'model' whose output is a trainable tensor, so gradients per output channel can be read."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.out


def test_forward_process_matches_the_numpy_schedule(schedule):
    fp = ForwardProcess.from_schedule(schedule)
    assert fp.alpha_bar.dtype == torch.float64 and fp.num_timesteps == schedule.num_timesteps
    np.testing.assert_array_equal(fp.alpha_bar.numpy(), schedule.alphas_cumprod)
    np.testing.assert_array_equal(fp.betas.numpy(), schedule.betas)
    # The posterior variance lies between 0 and beta (beta-tilde <= beta).
    assert torch.all(fp.posterior_variance[1:] > 0) and torch.all(fp.posterior_variance <= fp.betas)
    assert torch.isfinite(fp.posterior_log_variance_clipped).all()


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_statistics(schedule, t):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((4096, 1, 4, 4), 0.5)
    noise = torch.randn(x0.shape, generator=gen)
    tt = torch.full((x0.shape[0],), t, dtype=torch.int64)
    x_t = q_sample(x0, tt, noise, schedule)
    ab = schedule.alphas_cumprod[t]
    assert abs(x_t.mean().item() - 0.5 * math.sqrt(ab)) < 0.01
    assert abs(x_t.std().item() - math.sqrt(1 - ab)) < 0.01 * max(math.sqrt(1 - ab), 0.05)
    # No noise gives the scaled signal; the ForwardProcess and the Schedule agree.
    torch.testing.assert_close(q_sample(x0, tt, torch.zeros_like(x0), schedule), x0 * math.sqrt(ab))
    torch.testing.assert_close(q_sample(x0, tt, noise, ForwardProcess.from_schedule(schedule)), x_t)


def test_loss_is_eps_mse_for_a_fixed_variance_model(schedule):
    torch.manual_seed(0)
    model = build_model("tiny")
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    t = torch.tensor([0, 3, 500, 999])
    y = torch.tensor([0, 1, 2, 10])
    noise = torch.randn_like(x0)
    out = training_losses(model, x0, t, y, schedule, noise)
    eps = model(q_sample(x0, t, noise, schedule), t.float(), y)
    expected = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    assert torch.equal(out["loss"], out["mse"]) and torch.equal(out["vb"], torch.zeros(4))
    torch.testing.assert_close(out["mse"], expected)
    assert out["loss"].shape == (4,) and out["loss"].dtype == torch.float32


def test_vb_is_finite_nonnegative_and_trains_only_the_variance(schedule):
    torch.manual_seed(1)
    C = 4
    x0 = (torch.rand(6, C, 8, 8) * 2 - 1).mul(255 / 2).round().div(255 / 2)   # 8-bit data, as L_0 assumes
    t = torch.tensor([0, 1, 2, 50, 600, 999])
    model = FixedOutput(torch.randn(6, 2 * C, 8, 8) * 0.5)
    out = training_losses(model, x0, t, torch.zeros(6, dtype=torch.int64), schedule)
    vb = out["vb"]
    assert torch.isfinite(vb).all() and (vb >= 0).all() and (vb[1:] > 0).all()
    torch.testing.assert_close(out["loss"], out["mse"] + vb)
    (grad,) = torch.autograd.grad(vb.sum(), model.out)
    assert torch.count_nonzero(grad[:, :C]) == 0                              # the eps prediction is detached
    assert torch.isfinite(grad).all() and grad[:, C:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(out["mse"].sum(), model.out)
    assert torch.count_nonzero(grad_mse[:, C:]) == 0                          # and mse never sees v


def test_vb_at_t0_is_the_decoder_nll_and_the_t_over_1000_scale():
    schedule = Schedule.from_config(DiffusionConfig(num_timesteps=500))
    fp = ForwardProcess.from_schedule(schedule)
    torch.manual_seed(2)
    x0, x_t = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    eps, v = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 0])
    vb = vb_terms(eps, v, x0, x_t, t, fp)
    ab = fp.alpha_bar[0].float()
    mean = fp.posterior_mean_coef_xt[0].float() * x_t + fp.posterior_mean_coef_x0[0].float() * (
        (x_t - (1 - ab).sqrt() * eps) / ab.sqrt())
    log_var = (v + 1) / 2 * fp.betas[0].log().float() + (1 - v) / 2 * fp.posterior_log_variance_clipped[0].float()
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb, nll)
    # 500 steps: the hybrid loss weights vb by 500 / 1000.
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 7])
    out = training_losses(FixedOutput(torch.cat([eps, v], 1)), x0, t, torch.zeros(2, dtype=torch.int64), fp, noise)
    torch.testing.assert_close(out["vb"], 0.5 * vb_terms(eps, v, x0, q_sample(x0, t, noise, fp), t, fp))


def test_normal_kl():
    m, lv = torch.randn(10), torch.randn(10)
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(10))
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert abs(kl.item() - (math.log(2) + 2 / 8 - 0.5)) < 1e-6
    assert (normal_kl(m, lv, torch.randn(10), torch.randn(10)) >= 0).all()


@pytest.mark.parametrize("mean,scale", [(0.0, 0.3), (0.7, 0.01), (-0.999, 0.002), (3.0, 0.5), (0.2, 20.0)])
def test_discretized_likelihood_sums_to_one_over_the_bins(mean, scale):
    bins = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(math.log(scale)))
    assert (ll <= 0).all() and torch.isfinite(ll).all()
    assert abs(ll.exp().sum().item() - 1.0) < 1e-4


def test_numpy_denoiser_matches_the_module():
    model = randomize_zero_init_(build_model("tiny-latent")).eval()
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    t, y = np.array([0, 5, 999], np.float32), np.array([1, 2, 10], np.int64)
    out = numpy_denoiser(model)(x, t, y)
    assert out.dtype == np.float32 and out.shape == (3, 8, 8, 8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(out, ref)
