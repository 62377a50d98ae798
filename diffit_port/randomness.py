"""Training randomness and data order as pure functions of (seed, step), so a resumed run repeats exactly."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .diffusion import Objective


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one purpose (e.g. ("noise", step)), stable across processes and versions."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class BatchOrder:
    """Epoch-wise shuffling without replacement: global position p = step * B + i reads example
    perm_e[p mod N] with e = p // N and perm_e a permutation seeded by (seed, e). Rank r takes the r-th
    contiguous slice of each global batch (DistributedSampler's split, but per step). Permutations are
    drawn on the CPU (the same order on any device) and kept on `device`, so a step costs no host sync."""

    def __init__(self, seed: int, num_examples: int, batch_size: int, device: str | torch.device = "cpu"):
        self.seed, self.n, self.batch_size, self.device = seed, num_examples, batch_size, torch.device(device)
        self._perms: dict[int, torch.Tensor] = {}                     # a cache; the order depends on nothing else

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self._perms[epoch]

    def indices(self, step: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """int64 dataset indices of positions lo..hi-1 (default: all) of global batch `step` (0-based)."""
        hi = self.batch_size if hi is None else hi
        first, last = step * self.batch_size + lo, step * self.batch_size + hi      # global positions [first, last)
        parts = []
        for e in range(first // self.n, (last - 1) // self.n + 1):
            a, b = max(first, e * self.n), min(last, (e + 1) * self.n)
            parts.append(self._perm(e)[a - e * self.n:b - e * self.n])
        return torch.cat(parts)

    def state(self, step: int) -> dict[str, int]:
        return {"seed": self.seed, "num_examples": self.n, "batch_size": self.batch_size, "next_step": step,
                "epoch": step * self.batch_size // self.n}


def step_randomness(seed: int, step: int, batch: int, shape: tuple[int, ...], objective: Objective,
                    label_dropout: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t (B,), noise (B, *shape), drop bool (B,)) of global batch `step`, from one generator on `device`;
    t is the objective's draw (int64 training index for eps, the standard normal behind ln(sigma) for EDM)."""
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "noise", step))
    t = objective.sample_t(g, batch, device)
    noise = torch.randn((batch, *shape), generator=g, device=device)
    drop = torch.rand(batch, generator=g, device=device) < label_dropout
    return t, noise, drop


def rng_state() -> dict[str, Any]:
    """The global generators (unused by the loop itself, which derives its own; saved so that any
    stochastic layer added later resumes exactly too)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
