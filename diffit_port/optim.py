"""The optimisation step of training: AdamW, gradient clipping, the EMA of the weights, and a digest of them."""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from .diffusion import Objective


class EMA:
    """The exponential moving average of `model`'s parameters, kept in `module` (a copy of the same
    architecture). Both parameter lists are built once; buffers are left alone, since the models' only
    buffer is the constant, non-persistent `rel_index`, equal in any two copies."""

    def __init__(self, module: nn.Module, model: nn.Module):
        self.module = module
        self._avg, self._src = list(module.parameters()), list(model.parameters())
        if [p.shape for p in self._avg] != [p.shape for p in self._src]:
            raise ValueError("the EMA copy and the model have different parameters")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """module <- decay * module + (1 - decay) * model, over all parameters."""
        torch._foreach_lerp_(self._avg, self._src, 1.0 - decay)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the fixed position embedding is not one); the fused CUDA
    kernel on GPUs (one launch for the whole update instead of a few per parameter group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused)


def train_step(step_model: nn.Module, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
               objective: Objective, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, *,
               bf16: bool, max_norm: float, decay: float) -> torch.Tensor:
    """One optimizer step: loss under (optional) bf16 autocast, backward, clip, AdamW, EMA. `step_model`
    is what runs forward (DDP- or compile-wrapped), `model` the plain module it wraps. Returns the detached
    float32 (4,) [loss, mse, vb, grad_norm before clipping] without a host sync."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        losses = objective.losses(step_model, x0, t, y, noise)
    loss = losses["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    ema.update(decay)
    return torch.stack([loss, losses["mse"].mean(), losses["vb"].mean(), grad_norm]).detach()


def parameter_digest(module_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict: equal iff bit-identical."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state[name].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
