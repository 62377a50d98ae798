"""`python -m diffit_port.train` with EDM (tiny-edm, with dropout): the loss falls, resume is exact, the checkpoint
records the formulation; --prediction / --dropout override a preset and are checked on resume."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from diffit_port.checkpoint import read_checkpoint
from diffit_port.train import main
import train_helpers
from train_helpers import assert_same_weights, losses

ARGS = ["--preset", "tiny-edm", "--dropout", "0.1", "--data", "digits", "--batch-size", "8", "--lr", "1e-3",
        "--ema-decay", "0.9", "--log-every", "1", "--device", "cpu", "--seed", "3"]


def run_cli(out: Path, *extra: str, args: list[str] = ARGS) -> subprocess.CompletedProcess:
    return train_helpers.run_cli(out, *extra, args=args, timeout=180)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edm-straight")
    run_cli(out, "--steps", "6", "--ckpt-every", "3", "--sample-every", "6")
    return out


def test_edm_loss_decreases(tmp_path):
    """40 CPU steps: the mean EDM loss of the last 10 steps is well below that of the first 10 (measured 1.13 ->
    0.66 for this seed)."""
    out = tmp_path / "run"
    run_cli(out, "--steps", "40", "--ckpt-every", "0", "--sample-every", "0")
    loss = np.array([v for _, v in losses(out)])
    print(f"\nedm loss: first 10 steps {loss[:10].mean():.3f}, last 10 {loss[-10:].mean():.3f}")
    assert len(loss) == 40 and np.isfinite(loss).all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] != r["mse"] and r["vb"] == 0 for r in records)     # weighted: EDM's loss, not eps MSE
    assert loss[-10:].mean() < 0.75 * loss[:10].mean()


def test_edm_resume_is_bit_exact(straight, tmp_path):
    """3 steps, then 3 more with --resume (prediction and dropout come from the run) equal 6 straight steps, the
    dropout masks included (the global generator is restored from the checkpoint)."""
    out = tmp_path / "run"
    run_cli(out, "--steps", "3", "--ckpt-every", "3", "--sample-every", "0")
    run_cli(out, "--resume", "--steps", "6", "--sample-every", "0", args=[])
    assert losses(out) == losses(straight) and [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(out / "checkpoint-final.pt", straight / "checkpoint-final.pt")


def test_edm_checkpoint_records_the_formulation(straight):
    ckpt = read_checkpoint(straight / "checkpoint-final.pt")
    assert ckpt["diffusion_config"]["prediction"] == "edm" and ckpt["diffusion_config"]["sigma_data"] == 0.5
    assert ckpt["model_config"]["dropout"] == 0.1
    assert ckpt["train_config"]["prediction"] == "edm" and ckpt["train_config"]["dropout"] == 0.1
    assert (ckpt["sampling"]["sampler"], ckpt["sampling"]["steps"], ckpt["sampling"]["clip_denoised"]) == \
        ("heun", 6, False)
    assert (straight / "samples" / "step-000006.png").is_file()          # the sample grid runs the EDM sampler
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["diffusion"]["prediction"] == "edm" and cfg["model"]["dropout"] == 0.1


def test_prediction_and_dropout_override_the_preset():
    res = CliRunner().invoke(main, ["--preset", "digits", "--prediction", "edm", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["train"]["prediction"] == "edm" and cfg["diffusion"]["prediction"] == "edm"
    res = CliRunner().invoke(main, ["--preset", "image-cifar10", "--dry-run"])
    cfg = json.loads(res.output)
    assert (cfg["train"]["prediction"], cfg["train"]["dropout"], cfg["model"]["dropout"]) == ("edm", 0.13, 0.13)
    res = CliRunner().invoke(main, ["--preset", "image-cifar10", "--prediction", "eps", "--dropout", "0", "--dry-run"])
    cfg = json.loads(res.output)
    assert cfg["diffusion"] == {"schedule": "linear", "num_timesteps": 1000, "prediction": "eps"}
    assert "dropout" not in cfg["model"]
    res = CliRunner().invoke(main, ["--preset", "tiny-latent", "--prediction", "edm", "--dry-run"])
    assert res.exit_code == 2 and "learn_sigma" in res.output
    res = CliRunner().invoke(main, ["--preset", "tiny-latent", "--dropout", "0.1", "--dry-run"])
    assert res.exit_code == 2 and "image-space" in res.output


def test_resume_refuses_another_formulation(straight, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    for extra, what in ((["--prediction", "eps"], "prediction 'edm'"), (["--dropout", "0.2"], "dropout 0.1")):
        res = CliRunner().invoke(main, ["--out", str(out), "--resume", "--steps", "8", "--device", "cpu", *extra])
        assert res.exit_code == 2 and what in res.output and "--prediction" in res.output, res.output


def test_sample_grid_samples_the_preconditioned_step(monkeypatch, tmp_path):
    """Training's sample grids run the EDM step (EDMPrecond around the EMA network) with the EDM samplers."""
    import torch

    from diffit_port import build_model, train
    from diffit_port.config import get_preset
    from diffit_port.edm import EDMPrecond
    from diffit_port.samplers import EDMSchedule

    seen = []
    real = train.numpy_denoiser
    monkeypatch.setattr(train, "numpy_denoiser", lambda module, device: seen.append(module) or real(module, device))
    preset = get_preset("tiny-edm")
    ema = build_model(preset.model).eval()
    path = train.sample_grid(ema, preset, EDMSchedule(), torch.device("cpu"), tmp_path / "grid.png", seed=0, rows=1)
    assert path.is_file() and len(seen) == 1 and isinstance(seen[0], EDMPrecond) and seen[0].net is ema
