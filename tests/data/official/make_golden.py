"""Regenerate the golden files of this folder from the official DiffiT code (see README.md for the environment).

    PYTHONPATH=<official checkout> python make_golden.py OUT_DIR

Builds the official `diffit.diffit.DiffiT` with a small config, gives every parameter non-zero random values,
and writes its state dict (official key layout, safetensors) and its outputs for fixed inputs (.npz).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffit.diffit as official

CONFIG = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4,
              num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
NULL = CONFIG["num_classes"]
CFG_SCALE, SCALE_POW, STEPS = 4.4, 4.0, 1000


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter but the fixed pos_embed drawn anew: N(0, 1/fan_in) weights, N(0, 0.5^2) biases, and
    N(0, 1) for the relative-bias tables and the label table, so that an error there moves the output by O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name == "pos_embed":
            continue
        if name.endswith("relative_position_bias_table") or name.endswith("embedding_table.weight"):
            std = 1.0
        elif p.ndim >= 2:
            std = float(np.prod(p.shape[1:])) ** -0.5
        else:
            std = 0.5
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = official.DiffiT(**CONFIG)
    randomize(model, seed=1)
    model.eval()

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 16, 16, generator=gen)
    t = torch.tensor([0.0, 1.0, 250.5, 499.0, 999.0, 737.25])
    y = torch.tensor([0, 3, NULL, 9, NULL, 5])
    # forward_with_cfg's batch: [conditional half, null-label half], x duplicated, t the same in both halves.
    xc = torch.randn(4, 4, 16, 16, generator=gen)
    cfg_x = torch.cat([xc, xc])
    cfg_t = torch.tensor([999.0, 600.0, 250.0, 0.0] * 2)
    cfg_y = torch.tensor([1, 7, 2, 9] + [NULL] * 4)
    with torch.no_grad():
        eps = model(x, t, y)
        guided = model.forward_with_cfg(cfg_x, cfg_t, cfg_y, cfg_scale=CFG_SCALE, diffusion_steps=STEPS,
                                        scale_pow=SCALE_POW)

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "diffit_small.safetensors"))
    np.savez(out / "golden.npz", x=x.numpy(), t=t.numpy(), y=y.numpy(), out=eps.numpy(),
             cfg_x=cfg_x.numpy(), cfg_t=cfg_t.numpy(), cfg_y=cfg_y.numpy(), cfg_out=guided.numpy(),
             cfg_scale=np.float64(CFG_SCALE), scale_pow=np.float64(SCALE_POW))
    print(f"out: max |eps| {eps.abs().max():.3g}, std {eps.std():.3g}; guided: max {guided.abs().max():.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
