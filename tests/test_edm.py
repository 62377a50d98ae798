"""EDM in torch: the preconditioning against closed forms and diffusers, the loss against a hand computation, the
step helper, the configs (old dicts still load) and the ResBlock dropout."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffit_port import build_model
from diffit_port.config import PRESETS, DiffusionConfig, ModelConfig, Preset, get_preset, with_formulation
from diffit_port.diffusion import ForwardProcess, training_objective
from diffit_port.edm import EDMLoss, EDMPrecond, FloatIO, denoiser_step, edm_denoise

SD = 0.5
SIGMAS = torch.tensor([0.002, 0.3, 1.7, 80.0], dtype=torch.float32)


class Stub(nn.Module):
    """F(a, b, y) = a * (1 + b) + b + 0.01 y: depends on the scaled input a, the time input b and the label, so
    a wrong c_in, c_noise (e.g. ln(sigma) unscaled) or c_skip/c_out shows in D."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, a, b, y):
        self.seen.append((a, b))
        bb = b.to(a.dtype).reshape(-1, 1, 1, 1)
        return (a * (1 + bb) + bb + 0.01 * y.to(a.dtype).reshape(-1, 1, 1, 1)).to(self.dtype)


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 3, 3, generator=g) * 5, torch.arange(b)


def test_precond_matches_the_closed_form():
    """D = c_skip x + c_out F(c_in x, ln(sigma) / 4) with Karras et al. Table 1's EDM coefficients, computed here
    in float64 NumPy from the formulas."""
    x, y = inputs()
    stub = Stub()
    d = EDMPrecond(stub, SD)(x, SIGMAS, y)
    s = SIGMAS.double().numpy().reshape(-1, 1, 1, 1)
    xn = x.double().numpy()
    c_skip, c_out, c_in = SD**2 / (s**2 + SD**2), s * SD / np.sqrt(s**2 + SD**2), 1 / np.sqrt(s**2 + SD**2)
    c_noise = np.log(s) / 4
    f = c_in * xn * (1 + c_noise) + c_noise + 0.01 * y.numpy().reshape(-1, 1, 1, 1)
    want = c_skip * xn + c_out * f
    assert d.dtype == torch.float32 and d.shape == x.shape
    np.testing.assert_allclose(d.double().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stub.seen[0][1].numpy(), np.log(SIGMAS.numpy()) / 4, rtol=1e-6)   # time input
    # A swap is not a near miss: c_out x + c_skip F differs from D by O(1) here.
    assert np.abs((c_out * xn + c_skip * f) - want).max() > 0.5


def test_precond_matches_diffusers():
    """The same D from diffusers' EDMEulerScheduler preconditioning (precondition_inputs / _noise / _outputs)."""
    from diffusers import EDMEulerScheduler

    sch = EDMEulerScheduler(sigma_data=SD, prediction_type="epsilon")
    x, y = inputs(seed=1)
    x, s = x.double(), SIGMAS.double().reshape(-1, 1, 1, 1)
    want = sch.precondition_outputs(x, Stub(torch.float64)(sch.precondition_inputs(x, s),
                                                           sch.precondition_noise(SIGMAS.double()), y), s)
    got = EDMPrecond(Stub(torch.float64), SD, torch.float64)(x, SIGMAS.double(), y)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_precond_keeps_its_arithmetic_in_float32_around_a_half_network():
    """With a float16 network, the network sees float16 c_in x, but c_skip x (the image itself at small sigma) is
    added in float32: a network returning 0 gives exactly float32 c_skip x, not a float16-rounded one."""

    class Zero(nn.Module):
        def forward(self, a, b, y):
            assert a.dtype == torch.float16 and b.dtype == torch.float32
            return torch.zeros_like(a)

    x, y = inputs()
    x = x + 1e-3 * torch.arange(x.numel()).reshape(x.shape)      # values float16 cannot hold
    d = EDMPrecond(Zero(), SD, torch.float16)(x, SIGMAS, y)
    s = SIGMAS.reshape(-1, 1, 1, 1)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, SD**2 / (s * s + SD**2) * x, rtol=1e-6, atol=0)
    assert not torch.equal(d[0], (SD**2 / (s[0] ** 2 + SD**2) * x[0]).half().float())


def test_edm_loss_by_hand():
    """loss_i = (s^2 + sd^2) / (s sd)^2 * mean((D(x0 + s n; s) - x0)^2) with ln s = p_mean + p_std z."""
    loss = EDMLoss(sigma_data=SD, p_mean=-1.2, p_std=1.2)
    g = torch.Generator().manual_seed(3)
    x0, noise, z = torch.rand(3, 2, 3, 3, generator=g) * 2 - 1, torch.randn(3, 2, 3, 3, generator=g), \
        torch.tensor([-1.5, 0.0, 2.0])
    y = torch.tensor([0, 1, 2])
    out = loss.losses(Stub(), x0, z, y, noise)
    s = np.exp(-1.2 + 1.2 * z.double().numpy()).reshape(-1, 1, 1, 1)
    xn = x0.double().numpy() + s * noise.double().numpy()
    c_noise = np.log(s) / 4
    f = xn / np.sqrt(s**2 + SD**2) * (1 + c_noise) + c_noise + 0.01 * y.numpy().reshape(-1, 1, 1, 1)
    d = SD**2 / (s**2 + SD**2) * xn + s * SD / np.sqrt(s**2 + SD**2) * f
    mse = ((d - x0.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    weight = (s.ravel() ** 2 + SD**2) / (s.ravel() * SD) ** 2
    np.testing.assert_allclose(out["mse"].double().numpy(), mse, rtol=1e-5)
    np.testing.assert_allclose(out["loss"].double().numpy(), weight * mse, rtol=1e-5)
    assert out["loss"].shape == (3,) and torch.equal(out["vb"], torch.zeros(3))
    assert torch.equal(loss.sample_t(torch.Generator().manual_seed(0), 4, torch.device("cpu")),
                       torch.randn(4, generator=torch.Generator().manual_seed(0)))


def test_training_objective_and_denoiser_step():
    edm, eps = get_preset("tiny-edm"), get_preset("tiny")
    assert training_objective(edm.diffusion) == EDMLoss(0.5, -1.2, 1.2)
    assert isinstance(training_objective(eps.diffusion), ForwardProcess)
    net = build_model("tiny").eval()
    step = denoiser_step(net, edm.diffusion)
    assert isinstance(step, EDMPrecond) and step.net is net and step.sigma_data == 0.5
    plain = denoiser_step(net, eps.diffusion)
    assert isinstance(plain, FloatIO) and plain.net is net
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(plain(x, t, y), net(x, t, y))
        assert torch.equal(step(x, t, y), edm_denoise(net, x, t, y, 0.5))
    latent = build_model("tiny-latent")
    with pytest.raises(ValueError, match="learn_sigma model cannot use EDM"):
        denoiser_step(latent, DiffusionConfig(prediction="edm"))


# Configs ---------------------------------------------------------------------------------------------------------

def test_diffusion_config_validation_and_old_dicts():
    """Old dicts (no EDM keys) load and compare equal to what they were; eps configs serialise without the EDM
    fields, EDM configs with them; bad values are refused."""
    old = {"schedule": "cosine", "num_timesteps": 1000, "prediction": "eps"}
    cfg = DiffusionConfig.from_dict(old)
    assert cfg == DiffusionConfig(schedule="cosine") and cfg.to_dict() == old and not cfg.is_edm
    edm = DiffusionConfig(prediction="edm")
    d = edm.to_dict()
    assert d == {"prediction": "edm", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
                 "p_mean": -1.2, "p_std": 1.2}
    assert DiffusionConfig.from_dict(json.loads(json.dumps(d))) == edm
    for bad, match in ((dict(prediction="v"), "prediction"), (dict(prediction="edm", sigma_min=0.0), "sigma_min"),
                       (dict(prediction="edm", sigma_min=90.0), "below sigma_max"),
                       (dict(prediction="edm", sigma_data=-1.0), "sigma_data"),
                       (dict(prediction="edm", p_std=0.0), "p_std"),
                       (dict(sigma_data=1.0), "sigma_data: only for prediction='edm'"),
                       (dict(prediction="edm", schedule="cosine"), "schedule: only for prediction='eps'"),
                       (dict(num_timesteps=0), "num_timesteps")):
        with pytest.raises(ValueError, match=match):
            DiffusionConfig(**bad)


def test_manifests_written_before_edm_load_unchanged():
    """The model and diffusion dicts of the embedded package as exported before EDM and dropout existed (copied
    here, so the check survives a re-export) load to the digits preset's configs and serialise back to the same
    dicts; an eps package written now has exactly those keys."""
    model = {"kind": "image", "image_size": 32, "in_channels": 1, "num_classes": 10, "learn_sigma": False,
             "num_heads": 0, "head_dim": 32, "mlp_ratio": 2.0, "freq_dim": 256, "time_dim": 192,
             "class_dropout_prob": 0.1, "hidden_size": 0, "depth": 0, "patch_size": 2, "channels": [64, 128, 128],
             "blocks": [1, 2, 2], "window_size": 8, "gn_groups": 16}
    diffusion = {"schedule": "cosine", "num_timesteps": 1000, "prediction": "eps"}
    m, d = ModelConfig.from_dict(model), DiffusionConfig.from_dict(diffusion)
    assert m == PRESETS["digits"].model and d == PRESETS["digits"].diffusion
    assert m.to_dict() == model and d.to_dict() == diffusion


def test_presets_and_with_formulation():
    for name in ("image-cifar10", "image-ffhq64"):
        p = PRESETS[name]
        assert p.diffusion.is_edm and p.sampler == "heun" and not p.clip_denoised and p.model.num_classes == 0
    assert (PRESETS["image-cifar10"].model.dropout, PRESETS["image-cifar10"].steps) == (0.13, 18)
    assert (PRESETS["image-ffhq64"].model.dropout, PRESETS["image-ffhq64"].steps) == (0.05, 40)
    de = PRESETS["digits-edm"]
    assert de.model == PRESETS["digits"].model and de.diffusion.is_edm and de.guidance == 1.5
    assert PRESETS["tiny-edm"].model == PRESETS["tiny"].model and PRESETS["tiny-edm"].model.num_classes == 10
    eps = with_formulation(PRESETS["image-cifar10"], "eps", 0.0)
    assert eps.diffusion == DiffusionConfig() and eps.model.dropout == 0 and eps.clip_denoised
    assert with_formulation(PRESETS["digits"], "edm").diffusion == DiffusionConfig(prediction="edm")
    assert with_formulation(PRESETS["digits"]) == PRESETS["digits"]
    with pytest.raises(ValueError, match="learn_sigma"):
        with_formulation(PRESETS["tiny-latent"], "edm")
    with pytest.raises(ValueError, match="learn_sigma"):
        Preset("bad", PRESETS["tiny-latent"].model, DiffusionConfig(prediction="edm"))
    with pytest.raises(ValueError, match="image-space"):
        dataclasses.replace(PRESETS["tiny-latent"].model, dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        dataclasses.replace(PRESETS["tiny"].model, dropout=1.0)
    assert "dropout" not in PRESETS["tiny"].model.to_dict() and PRESETS["image-cifar10"].model.to_dict()["dropout"]


# Dropout ---------------------------------------------------------------------------------------------------------

def test_dropout_changes_training_only():
    """Dropout adds no parameters (state dicts load both ways), is the identity in eval mode, and acts in train
    mode; at 0 it draws no random numbers, so runs without it are bit-exact to before it existed."""
    cfg = dataclasses.replace(PRESETS["tiny"].model, dropout=0.3)
    torch.manual_seed(0)
    plain = build_model("tiny")
    dropped = build_model(cfg)
    dropped.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x, t, y), plain.eval()(x, t, y), rtol=0, atol=0)
        dropped.train(), plain.train()
        assert (dropped(x, t, y) - plain(x, t, y)).abs().max() > 1e-3
        state = torch.get_rng_state()
        plain(x, t, y)
        assert torch.equal(state, torch.get_rng_state())
    drops = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == sum(cfg.blocks) + sum(cfg.blocks[:-1]) and all(m.p == 0.3 for m in drops)
    assert not [m for m in plain.modules() if isinstance(m, nn.Dropout)]


def test_dropout_sits_before_the_resblock_conv():
    """The conv of every ResBlock sees the dropped activations (EDM's place: before the last conv of the branch)."""
    cfg = dataclasses.replace(PRESETS["tiny"].model, dropout=0.999)
    m = build_model(cfg).train()
    seen = []
    for blk in m.encoder[0]:
        blk.conv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        m(torch.randn(1, 1, 16, 16), torch.tensor([5.0]), torch.tensor([0]))
    zero_share = float((seen[0] == 0).float().mean())
    assert zero_share > 0.99, zero_share

