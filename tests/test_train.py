"""`python -m diffit_port.train` on the tiny preset: exact resume, a kill mid-save, two gloo ranks, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffit_port.checkpoint import load_model, read_checkpoint
from diffit_port.train import BatchOrder, derive_seed, main, parameter_digest

ARGS = ["--preset", "tiny", "--data", "digits", "--batch-size", "8", "--lr", "1e-3", "--ema-decay", "0.9",
        "--log-every", "1", "--sample-every", "0", "--device", "cpu", "--seed", "3"]
# One thread everywhere: identical arithmetic in every subprocess, and no fight over the two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Runs the CLI with os.replace delayed on the second write of checkpoint-latest.pt (after the temporary
# file is complete, before the rename), so the test can SIGKILL the process in the middle of a save.
PAUSE_IN_SAVE = textwrap.dedent("""
    import os, sys, time
    from diffit_port import train
    real_replace, calls = os.replace, []
    def replace(src, dst):
        if str(dst).endswith("checkpoint-latest.pt"):
            calls.append(dst)
            if len(calls) == 2:
                print("PAUSED-IN-SAVE", src, flush=True)
                time.sleep(300)
        return real_replace(src, dst)
    os.replace = replace
    train.main(sys.argv[1:])
""")


def run_cli(out: Path, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "diffit_port.train"]
    proc = subprocess.run([*cmd, *ARGS, "--out", str(out), *extra], env=ENV, capture_output=True, text=True,
                          timeout=120)
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


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_cli(out, "--steps", "6", "--ckpt-every", "2")
    return out


def test_resume_is_bit_exact(straight, tmp_path):
    out = tmp_path / "run"
    run_cli(out, "--steps", "3", "--ckpt-every", "3")
    run_cli(out, "--steps", "6", "--ckpt-every", "3", "--resume")
    assert losses(out) == losses(straight) and [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(out / "checkpoint-final.pt", straight / "checkpoint-final.pt")
    assert_same_weights(out / "checkpoint-latest.pt", straight / "checkpoint-final.pt")


def test_kill_during_checkpoint_write_then_resume(straight, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", PAUSE_IN_SAVE, *ARGS, "--out", str(out), "--steps", "6", "--ckpt-every", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        paused = next((line for line in proc.stdout if line.startswith("PAUSED-IN-SAVE")), None)
        assert paused is not None, "the run never reached its second checkpoint save"
        tmp_file = Path(paused.split()[1])
        assert tmp_file.exists() and tmp_file.stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The previous checkpoint (step 2) is intact and loads without unpickling code.
    ckpt = torch.load(out / "checkpoint-latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and not (out / "checkpoint-final.pt").exists()
    assert max(s for s, _ in losses(out)) == 4                           # logged past the checkpoint
    run_cli(out, "--steps", "6", "--ckpt-every", "2", "--resume")
    assert not list(out.glob(".checkpoint-*.tmp"))
    assert losses(out) == losses(straight)
    assert_same_weights(out / "checkpoint-final.pt", straight / "checkpoint-final.pt")


def test_two_gloo_ranks_hold_identical_replicas(tmp_path, straight):
    """Two gloo ranks end with bit-identical replicas, and, since each rank takes its slice of the same
    (seed, step)-derived global batch, their all-reduced losses are those of the one-process run of the
    same seed (equal up to the order of float reductions)."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "diffit_port.train", *ARGS, "--out", str(out), "--steps", "3", "--ckpt-every", "0"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2 parameters sha256 ([0-9a-f]{64})", proc.stdout + proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert parameter_digest(read_checkpoint(out / "checkpoint-final.pt")["model"]) == digests["0"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    single = dict(losses(straight))
    for step, loss in losses(out):
        assert loss == pytest.approx(single[step], rel=1e-4), (step, loss, single[step])


def test_checkpoint_contents_and_load_model(straight):
    ckpt = read_checkpoint(straight / "checkpoint-final.pt")
    assert {"model", "ema", "opt", "step", "rng", "data_state", "train_config", "model_config"} <= ckpt.keys()
    assert ckpt["step"] == 6 and ckpt["data_state"]["next_step"] == 6 and ckpt["train_config"]["seed"] == 3
    model, _ = load_model(straight / "checkpoint-final.pt")
    assert not model.training
    for name, p in model.state_dict().items():
        assert torch.equal(p, ckpt["ema"][name])
    assert not torch.equal(ckpt["ema"]["head.2.weight"], ckpt["model"]["head.2.weight"])


def test_dry_run_prints_the_resolved_config():
    res = CliRunner().invoke(main, ["--preset", "tiny", "--steps", "7", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["out"] == "runs/tiny" and cfg["train"]["label_dropout"] == 0.1
    assert cfg["train"]["device"] in ("cpu", "cuda") and cfg["model"]["num_classes"] == 10


def test_resume_takes_unspecified_options_from_the_run(straight):
    res = CliRunner().invoke(main, ["--out", str(straight), "--resume", "--log-every", "7", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)["train"]
    assert (cfg["preset"], cfg["seed"], cfg["lr"], cfg["steps"], cfg["batch_size"]) == ("tiny", 3, 1e-3, 6, 8)
    assert cfg["log_every"] == 7


def test_refuses_to_overwrite_or_resume_nothing(straight, tmp_path):
    res = CliRunner().invoke(main, [*ARGS, "--out", str(straight), "--steps", "6"])
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(main, [*ARGS, "--out", str(tmp_path / "none"), "--steps", "6", "--resume"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_batch_order_is_a_pure_function_of_seed_and_step():
    order = BatchOrder(seed=1, num_examples=10, batch_size=4)
    seen = torch.cat([order.indices(s) for s in range(5)])               # 20 positions = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(1, 10, 4).indices(3), order.indices(3))
    assert torch.equal(order.indices(2, 1, 3), order.indices(2)[1:3])               # a rank's slice
    big = BatchOrder(1, 10, 25).indices(0)                                          # a batch larger than N
    assert torch.equal(big[:20], seen) and len(big) == 25 and len(set(big[20:].tolist())) == 5
    assert not torch.equal(BatchOrder(2, 10, 4).indices(0), order.indices(0))
    assert derive_seed(0, "noise", 1) != derive_seed(0, "noise", 2) < 2 ** 63
