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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffit_port.checkpoint import load_model, read_checkpoint
from diffit_port.optim import parameter_digest
from diffit_port.randomness import BatchOrder, derive_seed
from diffit_port.train import main
from train_helpers import ARGS, ENV, assert_same_weights, losses, run_cli

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


# --------------------------------------------------------------------------------------------------
# Run directories: the lock, new runs into non-empty directories, --overwrite, failures mid-run
# --------------------------------------------------------------------------------------------------

def test_a_second_training_on_the_same_out_is_refused(tmp_path):
    """A live training holds DIR/train.lock (with its PID): a second one on the same --out exits 1 naming that
    PID and writes nothing; once the first is SIGKILLed, its stale lock is taken over by --resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", PAUSE_IN_SAVE, *ARGS, "--out", str(out), "--steps", "6", "--ckpt-every", "2"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert any(line.startswith("PAUSED-IN-SAVE") for line in first.stdout)
        lock = json.loads((out / "train.lock").read_text())
        assert lock["pid"] == first.pid
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        for extra in ([], ["--resume"], ["--overwrite"]):
            res = CliRunner().invoke(main, [*ARGS, "--out", str(out), "--steps", "6", *extra])
            assert res.exit_code == 1, res.output
            assert f"{out} is in use by process {first.pid} (lock file {out / 'train.lock'})" in res.output
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert json.loads((out / "train.lock").read_text())["pid"] == first.pid      # stale: its owner is dead
    run_cli(out, "--steps", "6", "--ckpt-every", "2", "--resume")
    assert not (out / "train.lock").exists() and (out / "checkpoint-final.pt").exists()


def test_new_run_into_a_non_empty_directory(straight, tmp_path):
    """Without --resume a non-empty --out is refused (exit 2, untouched); --overwrite replaces a previous run, but
    never a directory holding other files."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    for extra, msg in (([], "is not empty (it holds thesis.tex); pass --resume"),
                       (["--overwrite"], "--overwrite replaces a previous run only, and")):
        res = CliRunner().invoke(main, [*ARGS, "--out", str(other), "--steps", "2", *extra])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert sorted(p.name for p in other.iterdir()) == ["thesis.tex"]
    res = CliRunner().invoke(main, [*ARGS, "--out", str(straight), "--steps", "2", "--resume", "--overwrite"])
    assert res.exit_code == 2 and "give one of them" in res.output

    old = tmp_path / "old"
    run_cli(old, "--steps", "3", "--ckpt-every", "1", "--sample-every", "3")
    assert (old / "samples" / "step-000003.png").exists()
    run_cli(old, "--steps", "2", "--ckpt-every", "0", "--overwrite")
    assert [s for s, _ in losses(old)] == [1, 2] and read_checkpoint(old / "checkpoint-final.pt")["step"] == 2
    assert not (old / "samples").exists() and sorted(p.name for p in old.iterdir()) == [
        "checkpoint-final.pt", "checkpoint-latest.pt", "config.json", "metrics.jsonl"]


def test_refused_runs_leave_no_directory(tmp_path):
    res = CliRunner().invoke(main, [*ARGS, "--out", str(tmp_path / "none"), "--steps", "2", "--resume"])
    assert res.exit_code == 2 and not (tmp_path / "none").exists()


def test_non_finite_sample_grid_and_loss_exit_1(tmp_path, monkeypatch):
    import numpy as np

    from diffit_port import train

    def nan_denoiser(model, device):
        return lambda x, t, y: np.full(x.shape, np.nan, np.float32)

    monkeypatch.setattr(train, "numpy_denoiser", nan_denoiser)
    out = tmp_path / "grid"
    res = CliRunner().invoke(main, [*ARGS, "--out", str(out), "--steps", "2", "--sample-every", "1"])
    assert res.exit_code == 1, res.output
    assert ("the sample grid of step 1 stopped: non-finite values in the denoiser output at denoiser call 1 "
            "(t = 999) on the torch runtime (cpu); no grid was written") in res.output
    assert not (out / "samples").exists() or not list((out / "samples").iterdir())

    # One step whose [loss, mse, vb, grad_norm] comes back NaN, as a diverging run's would.
    monkeypatch.setattr(train, "train_step", lambda *a, **k: torch.full((4,), float("nan")))
    res = CliRunner().invoke(main, [*ARGS, "--out", str(tmp_path / "loss"), "--steps", "2", "--sample-every", "0"])
    assert res.exit_code == 1 and "loss is nan at step 1; lower --lr or set --grad-clip" in res.output, res.output
    assert "Traceback" not in res.output


def test_resume_with_an_unreadable_config_json(tmp_path):
    for name, text in (("bad-json", "[1, 2"), ("no-train", '{"model": {}}'), ("not-an-object", "[]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        res = CliRunner().invoke(main, ["--out", str(tmp_path / name), "--resume", "--dry-run"])
        assert res.exit_code == 2 and "config.json is not a readable run config" in res.output, res.output


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from diffit_port.runlock import LOCK_FILE, RunLocked, run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": 0}))
    with run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked, match="is locked by process 1 on host 'elsewhere'"):
            other = tmp_path / "other"
            other.mkdir()
            (other / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
            with run_lock(other):
                pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_leftover_lock_temporary_file_is_no_obstacle(tmp_path):
    """A process killed while writing its lock leaves `.train.lock.*.tmp`; a later process, even one with the
    same PID (PID 1 in containers), still takes the lock, and the leftover is not the one removed."""
    from diffit_port.runlock import LOCK_FILE, run_lock

    leftover = tmp_path / f".{LOCK_FILE}.{os.getpid()}.tmp"
    leftover.write_text("half a record")
    with run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists() and leftover.read_text() == "half a record"


TRAIN_JUNK = st.sampled_from(["", "-1", "0", "1", "nan", "inf", "1e400", "abc", "2.5", "99999999999999999999"])
RUN_DIRS = st.sampled_from(["run", "afile", "garbage-config", "config-without-train", "adir/run"])
TRAIN_OPTIONS = {
    "--preset": st.sampled_from(["tiny", "digits", "nope"]), "--data": st.sampled_from(["digits", "x.npz", "adir"]),
    "--steps": TRAIN_JUNK,
    "--batch-size": TRAIN_JUNK, "--lr": TRAIN_JUNK, "--warmup": TRAIN_JUNK, "--weight-decay": TRAIN_JUNK,
    "--grad-clip": TRAIN_JUNK, "--ema-decay": TRAIN_JUNK, "--label-dropout": TRAIN_JUNK, "--seed": TRAIN_JUNK,
    "--device": st.sampled_from(["auto", "cpu", "cuda", "tpu"]), "--ckpt-every": TRAIN_JUNK,
    "--sample-every": TRAIN_JUNK, "--log-every": TRAIN_JUNK,
}


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(out=RUN_DIRS, opts=st.lists(st.sampled_from(sorted(TRAIN_OPTIONS)), max_size=6).flatmap(
    lambda keys: st.tuples(*[TRAIN_OPTIONS[k].map(lambda v, k=k: [k, v]) for k in keys])),
       flags=st.lists(st.sampled_from(["--resume", "--resume", "--overwrite", "--bf16", "--compile"]), max_size=2))
def test_any_train_command_line_exits_0_or_2(tmp_path, out, opts, flags):
    """--dry-run resolves and checks everything a run would (options, a resumed run's config.json) and exits."""
    work = tmp_path / "w"
    if not work.exists():
        work.mkdir()
        (work / "afile").write_text("x")
        (work / "adir").mkdir()
        (work / "garbage-config").mkdir()
        (work / "garbage-config" / "config.json").write_text("[1, 2")
        (work / "config-without-train").mkdir()
        (work / "config-without-train" / "config.json").write_text('{"model": {}}')
    args = ["--out", out, *[a for pair in opts for a in pair], *sorted(set(flags)), "--dry-run"]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = CliRunner().invoke(main, args)
    finally:
        os.chdir(cwd)
    assert r.exit_code in (0, 2), (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output, repr(r.exception))
