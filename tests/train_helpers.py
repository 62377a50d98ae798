"""What the training tests share: the tiny preset's command line, one thread in every subprocess, a CLI run that must
succeed, the logged losses of a run, and two checkpoints' weights compared bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ARGS = ["--preset", "tiny", "--data", "digits", "--batch-size", "8", "--lr", "1e-3", "--ema-decay", "0.9",
        "--log-every", "1", "--sample-every", "0", "--device", "cpu", "--seed", "3"]
# One thread everywhere: identical arithmetic in every subprocess, and no fight over the two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(out: Path, *extra: str, script: str | None = None, args: list[str] = ARGS,
            timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "diffit_port.train"]
    proc = subprocess.run([*cmd, *args, "--out", str(out), *extra], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    for key in ("model", "ema"):
        assert ca[key].keys() == cb[key].keys()
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs"
    assert ca["step"] == cb["step"]
