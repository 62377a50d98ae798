"""Training survives SIGKILL at random moments, inside checkpoint and metrics writes too: resumed after each kill, the run
ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffit_port.checkpoint import read_checkpoint
from diffit_port.optim import parameter_digest
from train_helpers import ARGS, ENV, losses, run_cli


# The training CLI with an optional pause inside one write, chosen by SOAK_PAUSE / SOAK_NTH:
#   torch-save: the NTH checkpoint's temporary file is half written (flushed), then the process sleeps;
#   rename:     the NTH checkpoint's temporary file is complete and fsynced, the rename not yet done;
#   metrics:    the NTH metrics.jsonl rewrite is complete in its temporary file, the rename not yet done.
SOAK_SCRIPT = textwrap.dedent("""
    import io, os, sys, time
    import torch
    from diffit_port import train
    mode, nth, seen = os.environ.get("SOAK_PAUSE", ""), int(os.environ.get("SOAK_NTH", "0")), []
    def pause(what):
        print("PAUSED", what, flush=True)
        time.sleep(300)
    real_save, real_replace = torch.save, os.replace
    def save(obj, f, *a, **k):
        seen.append("save")
        if mode == "torch-save" and seen.count("save") == nth:
            buf = io.BytesIO()
            real_save(obj, buf)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            pause(f)
        return real_save(obj, f, *a, **k)
    def replace(src, dst):
        kind = "rename" if str(dst).endswith(".pt") else "metrics" if str(dst).endswith(".jsonl") else None
        seen.append(kind)
        if kind == mode and seen.count(kind) == nth:
            pause(src)
        return real_replace(src, dst)
    torch.save, os.replace = save, replace
    train.main(sys.argv[1:])
""")
# Enough steps that 20 kills cannot finish the run: a pause kill comes at most 3 steps after its start, a
# random kill within about 5 (below), so 20 kills advance it by about 70 steps at most.
SOAK_STEPS = 100
SOAK_ARGS = ["--steps", str(SOAK_STEPS), "--ckpt-every", "1", "--sample-every", "0"]


def _check_after_kill(out: Path) -> None:
    """What a kill may never leave: an unloadable latest checkpoint, a partial metrics line."""
    if (out / "checkpoint-latest.pt").exists():
        assert read_checkpoint(out / "checkpoint-latest.pt")["step"] >= 1
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


def soak(out: Path, kills: int, seed: int) -> list[str]:
    """SIGKILL `kills` trainings of one run, each resumed (or, before the first checkpoint, overwritten) by the
    next, then let the last one finish. Returns the kind of every kill."""
    import random

    rng = random.Random(seed)
    kinds = ["random", "torch-save", "rename", "metrics"]
    done = []
    for k in range(kills):
        kind = kinds[k % len(kinds)]
        env = {**ENV, "SOAK_PAUSE": "" if kind == "random" else kind, "SOAK_NTH": str(rng.randint(1, 3))}
        again = ["--resume"] if (out / "checkpoint-latest.pt").exists() else (["--overwrite"] if out.exists() else [])
        cmd = [sys.executable, "-c", SOAK_SCRIPT, *ARGS, "--out", str(out), *SOAK_ARGS, *again]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = rng.randint(1, 3)   # random kills: after 1-3 logged steps, then anywhere within the next step
        try:
            for line in proc.stdout:
                if kind == "random" and line.startswith("{"):
                    lines -= 1
                    if lines == 0:
                        time.sleep(rng.uniform(0.0, 0.05))
                        break
                if line.startswith("PAUSED"):
                    assert Path(line.split(maxsplit=1)[1].strip()).exists()  # the temporary file is there
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"kill {k} ({kind}): the run ended before it was killed"
        done.append(kind)
        _check_after_kill(out)
    run_cli(out, *SOAK_ARGS, "--resume")
    return done


def _assert_like_uninterrupted(out: Path, ref: Path) -> None:
    a, b = read_checkpoint(out / "checkpoint-final.pt"), read_checkpoint(ref / "checkpoint-final.pt")
    assert a["step"] == b["step"] == SOAK_STEPS
    assert parameter_digest(a["model"]) == parameter_digest(b["model"])
    assert parameter_digest(a["ema"]) == parameter_digest(b["ema"])
    assert losses(out) == losses(ref)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-final.pt", "checkpoint-latest.pt", "config.json",
                                                    "metrics.jsonl"]           # no lock, no temporary file


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soak-ref") / "run"
    run_cli(out, *SOAK_ARGS)
    return out


def test_soak_a_few_kills(uninterrupted, tmp_path):
    kinds = soak(tmp_path / "run", kills=4, seed=0)
    assert set(kinds) == {"random", "torch-save", "rename", "metrics"}
    _assert_like_uninterrupted(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_soak_twenty_kills(uninterrupted, tmp_path):
    kinds = soak(tmp_path / "run", kills=20, seed=1)
    print(f"\nsoak: {len(kinds)} SIGKILLs: " + ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))))
    assert len(kinds) == 20
    _assert_like_uninterrupted(tmp_path / "run", uninterrupted)
