"""Bad checkpoint files (diffit_port.checkpoint): each a CheckpointError naming the file, and a one-line exit 1 from
diffit-export, diffit-run --runtime torch and train --resume; torch's weights_only=False advice never shown."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffit_port.checkpoint import CheckpointError, load_model, read_checkpoint, save_atomic
from runtime_helpers import package_path


class Foreign:
    """A class that only this test defines: unpickling it would run import machinery."""


def bad_checkpoints(directory: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    data = good.read_bytes()
    made = {}

    def put(name: str, content: bytes, msg: str) -> None:
        (directory / name).write_bytes(content)
        made[name] = (directory / name, msg)

    put("empty.pt", b"", "is empty (0 bytes)")
    put("truncated.pt", data[: len(data) // 2], "is truncated or not a PyTorch checkpoint file")
    put("junk.pt", b"not a checkpoint at all " * 20, "is truncated or not a PyTorch checkpoint file")
    put("plain-pickle.pt", pickle.dumps({"a": 1}), "holds Python objects other than tensors")
    torch.save({"f": Foreign, "d": collections.OrderedDict()}, directory / "objects.pt")
    made["objects.pt"] = (directory / "objects.pt", "holds Python objects other than tensors")
    torch.save({"model": {}}, directory / "foreign-dict.pt")
    made["foreign-dict.pt"] = (directory / "foreign-dict.pt", "is not a diffit-port checkpoint")
    ckpt = torch.load(good, weights_only=True)
    ckpt["model"] = {k: v[:1] for k, v in ckpt["model"].items()}
    ckpt["ema"] = None
    torch.save(ckpt, directory / "wrong-shapes.pt")
    made["wrong-shapes.pt"] = (directory / "wrong-shapes.pt", "the weights do not fit the checkpoint's model config")
    (directory / "a-directory.pt").mkdir()
    made["a-directory.pt"] = (directory / "a-directory.pt", "is not a file")
    return made


@pytest.fixture(scope="module")
def bad(tmp_path_factory, checkpoint_file):
    return bad_checkpoints(tmp_path_factory.mktemp("bad"), checkpoint_file("tiny"))


def test_every_bad_file_is_a_checkpoint_error_naming_it(bad):
    for name, (path, msg) in bad.items():
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        text = str(e.value)
        assert str(path) in text and msg in text, (name, text)
        assert "weights_only" not in text and "\n" not in text, (name, text)


def test_no_torch_warning_reaches_the_user(bad, recwarn):
    with pytest.raises(CheckpointError):
        read_checkpoint(bad["plain-pickle.pt"][0])
    assert not [w for w in recwarn if "pickle" in str(w.message)]


def test_save_atomic_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_atomic({"step": 1}, path)
    real = torch.save

    def half_then_fail(obj, f, *a, **k):
        real(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and sorted(os.listdir(tmp_path)) == ["c.pt"]


def one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("Error:")]
    assert "Traceback" not in output and "weights_only" not in output and "Aborted" not in output, output
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize("name", ["empty.pt", "truncated.pt", "plain-pickle.pt", "wrong-shapes.pt"])
def test_export_run_and_resume_give_one_line(bad, name, tmp_path, tmp_path_factory):
    from diffit_port.export.cli import main as export_main
    from diffit_port.runtimes.cli import main as run_main

    path, msg = bad[name]
    r = CliRunner().invoke(export_main, [str(path), "-o", str(tmp_path / "pkg"), "-q"])
    assert r.exit_code == 1 and msg in one_line_error(r.output) and not (tmp_path / "pkg").exists()

    pkg = package_path("tiny", tmp_path_factory)
    r = CliRunner().invoke(run_main, ["--package", str(pkg), "--runtime", "torch", "--checkpoint", str(path),
                                      "--output", str(tmp_path / "g.png")])
    assert r.exit_code == 1 and msg in one_line_error(r.output) and not (tmp_path / "g.png").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-latest.pt").write_bytes(path.read_bytes())
    r = subprocess.run([sys.executable, "-m", "diffit_port.train", "--preset", "tiny", "--out", str(run),
                        "--resume", "--steps", "2", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if name == "wrong-shapes.pt":                # a model-only checkpoint: no optimizer state to resume
        msg = "is not a training checkpoint (it lacks opt, step, rng, train_config, ema); cannot resume from it"
    assert r.returncode == 1 and msg in one_line_error(r.stderr), r.stderr
