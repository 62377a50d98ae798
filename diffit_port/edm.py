"""EDM's preconditioning and loss (Karras et al. 2022), and the package's denoiser step for either formulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import DiffusionConfig, ModelConfig, check_formulation


def edm_denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, sigma_data: float,
                net_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, y) with Karras et al. Table 1's EDM column:
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4 (fed as the network's time input). x (B, C, H, W), sigma (B,) -> float32 (B, C, H, W).

    The coefficients and both sums are float32 whatever `net_dtype` (the network's input dtype) is: c_skip x
    carries the image at small sigma, where float16 would round it to 3 digits."""
    x = x.float()
    s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))                         # (B, 1, 1, 1)
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / (s * s + sd2)
    c_out = s * sigma_data * torch.rsqrt(s * s + sd2)
    c_in = torch.rsqrt(s * s + sd2)
    c_noise = sigma.float().log() / 4                                            # (B,)
    f = net((c_in * x).to(net_dtype), c_noise, y)                                # (B, C, H, W)
    return c_skip * x + c_out * f.float()


class EDMPrecond(nn.Module):
    """The preconditioned denoiser D(x; sigma, y) around a raw network F (NVlabs/edm's separation of network and
    preconditioning): forward(x float (B, C, H, W), sigma float (B,), y int64 (B,)) -> float32 D."""

    def __init__(self, net: nn.Module, sigma_data: float, net_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.net_dtype = net_dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return edm_denoise(self.net, x, sigma, y, self.sigma_data, self.net_dtype)


class FloatIO(nn.Module):
    """The eps step: the network with float32 inputs and output around it, whatever its own precision."""

    def __init__(self, net: nn.Module, net_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = net
        self.net_dtype = net_dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net_dtype), t, y).float()                     # (B, C or 2C, H, W)


def denoiser_step(net: nn.Module, diffusion: DiffusionConfig, net_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The package's denoiser step for a network of `net_dtype` weights: x float32, the time input (t for eps,
    sigma for EDM) float32, y int64 -> float32. EDM: EDMPrecond (returns D); eps: the network (returns eps
    and any variance channels). The exporter, the torch runtime, training's sample grids and evaluation all
    build their step here. Raises ValueError for a learn_sigma network with EDM."""
    cfg: ModelConfig = net.cfg
    check_formulation(cfg, diffusion)
    if diffusion.is_edm:
        return EDMPrecond(net, diffusion.sigma_data, net_dtype)
    return FloatIO(net, net_dtype)


@dataclass(frozen=True)
class EDMLoss:
    """EDM's training objective: ln(sigma) ~ N(p_mean, p_std^2) and the weighted denoising loss
    lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2 (Karras et al. §5,
    Table 1), so that the network's effective target has unit variance at every noise level."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "EDMLoss":
        if not cfg.is_edm:
            raise ValueError(f"EDMLoss needs prediction 'edm', got {cfg.prediction!r}")
        return cls(cfg.sigma_data, cfg.p_mean, cfg.p_std)

    def sample_t(self, generator: torch.Generator, batch: int, device: torch.device) -> torch.Tensor:
        """The per-sample noise draw of one step: z ~ N(0, 1) float32 (B,); `sigma(z)` is its noise level."""
        return torch.randn(batch, generator=generator, device=device)

    def sigma(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.p_mean + self.p_std * z.float())

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd2 = self.sigma_data ** 2
        return (sigma * sigma + sd2) / (sigma * self.sigma_data) ** 2

    def losses(self, model: nn.Module, x0: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
               noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vb"}, each float32 (B,), for the raw network `model` (DDP / compile wrappers welcome).
        loss = lambda(sigma) * mean over pixels of (D - x0)^2; mse = that mean without the weight; vb = 0.
        NVlabs/edm sums over pixels instead of averaging: a constant factor C*H*W, which Adam ignores but a
        gradient-norm clip would not."""
        sigma = self.sigma(z)                                                    # (B,)
        x_noisy = x0.float() + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise.float()
        d = edm_denoise(model, x_noisy, sigma, y, self.sigma_data)
        mse = (d - x0.float()).square().flatten(1).mean(1)
        return {"loss": self.weight(sigma) * mse, "mse": mse, "vb": torch.zeros_like(mse)}

