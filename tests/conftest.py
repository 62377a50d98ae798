"""Shared fixtures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest


def write_checkpoint(preset: str, path: Path, seed: int = 0) -> Path:
    """A checkpoint file of a freshly initialised `preset` model with its zero-initialised output layer
    randomised (an all-zero output would make parity checks vacuous), and a slightly perturbed EMA copy."""
    import torch

    from diffit_port import build_model, get_preset
    from diffit_port.checkpoint import make_checkpoint, save_atomic
    from diffit_port.models import randomize_zero_init_

    torch.manual_seed(seed)
    model = randomize_zero_init_(build_model(preset), seed=seed)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    save_atomic(make_checkpoint(model, preset=preset, diffusion=get_preset(preset).diffusion, ema=ema), path)
    return path


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory):
    """Factory: preset name -> path of a `write_checkpoint` file (one per preset per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def make(preset: str) -> Path:
        if preset not in made:
            made[preset] = write_checkpoint(preset, root / f"{preset}.pt")
        return made[preset]

    return make


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """Factory: package kind (runtime_helpers.PACKAGE_KINDS) -> the path of that tiny package, exported once."""
    from runtime_helpers import package_path     # here, not at the top: it imports onnxruntime for every test run

    return lambda kind: package_path(kind, tmp_path_factory)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """The tiny image-space package (runtime_helpers.PACKAGE_KINDS["tiny"])."""
    from runtime_helpers import package_path

    return package_path("tiny", tmp_path_factory)
