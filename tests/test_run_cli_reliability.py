"""diffit-run's reliability (docs/RELIABILITY.md): non-finite output stops the run and writes nothing, guidance is
checked, bad output paths are refused before any session opens, outputs stream as they are made, and errors after the
outputs opened come out as one line."""

from __future__ import annotations

import re
import warnings

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli_helpers import BASE, assert_only, error_line, poisoned_package, run
from diffit_port.runtimes.cli import main
from runtime_helpers import has_cuda_provider, require_openvino

@pytest.fixture(scope="module")
def nan_pkg(pkg, tmp_path_factory):
    return poisoned_package(pkg, tmp_path_factory.mktemp("poisoned") / "nan")


@pytest.mark.parametrize("runtime,cfg", [("onnx-cpu", "sampler"), ("onnx-cpu", "in-graph"), ("openvino", "sampler"),
                                         ("openvino", "in-graph"), ("torch", "sampler")])
def test_nan_weights_stop_the_run_and_write_nothing(nan_pkg, tmp_path, runtime, cfg):
    """Weights that make the denoiser output NaN: exit 1 with one line naming the call, t and the runtime; the
    previous grid and .npy are unchanged and no other file appears."""
    (tmp_path / "g.png").write_bytes(b"previous grid")
    (tmp_path / "s.npy").write_bytes(b"previous npy")
    r = CliRunner().invoke(main, ["--package", str(nan_pkg), "--runtime", runtime, "--cfg", cfg, *map(str, BASE),
                                  "--output", str(tmp_path / "g.png"), "--save-npy", str(tmp_path / "s.npy"),
                                  "--output-dir", str(tmp_path / "each")])
    assert r.exit_code == 1, r.output
    line = error_line(r)
    assert re.search(rf"non-finite values in the denoiser output at denoiser call 1 \(t = 999\) on the {runtime} "
                     r"runtime \(batch of images 0\.\.1\); nothing was written", line), line
    assert_only(tmp_path, {"g.png": b"previous grid", "s.npy": b"previous npy"})


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider")
def test_nan_weights_stop_onnx_cuda(nan_pkg, tmp_path):
    r = CliRunner().invoke(main, ["--package", str(nan_pkg), "--runtime", "onnx-cuda", *map(str, BASE),
                                  "--output", str(tmp_path / "g.png")])
    assert r.exit_code == 1 and "on the onnx-cuda runtime" in error_line(r), r.output
    assert list(tmp_path.iterdir()) == []


def test_inf_weights_stop_the_run(pkg, tmp_path):
    """+inf weights: guidance turns inf - inf into NaN; the run stops with the one line, and no NumPy warning
    reaches the user (warnings are errors here, which would change the exit message)."""
    inf_pkg = poisoned_package(pkg, tmp_path / "inf", float("inf"))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["--package", str(inf_pkg), "--runtime", "onnx-cpu", *map(str, BASE),
                                      "--output", str(out / "g.png")])
    assert r.exit_code == 1 and "non-finite values in the denoiser output" in error_line(r), r.output
    assert not out.exists()                                   # not even the parent directory it would have made


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "-0.5"])
def test_guidance_must_be_finite_and_non_negative(pkg, tmp_path, value):
    r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cpu", "--guidance", value,
                                  "--output", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and "Invalid value for '--guidance': must be a finite number >= 0" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_guidance_zero_is_the_unconditional_sample(pkg, tmp_path):
    """guidance 0 is allowed (u + 0 (c - u) = u): it equals sampling every image with the null label."""
    common = ["--package", pkg, "--runtime", "onnx-cpu", *BASE]
    zero = run([*common, "--guidance", "0", "--output", tmp_path / "a.png", "--save-npy", tmp_path / "a.npy"])
    null = run([*common, "--guidance", "1", "--labels", "10", "--output", tmp_path / "b.png",
                "--save-npy", tmp_path / "b.npy"])
    assert zero.exit_code == null.exit_code == 0, (zero.output, null.output)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-5, rtol=0)


@pytest.fixture
def no_sessions(monkeypatch):
    """Fails the test if diffit-run gets as far as opening a runtime session."""
    from diffit_port.runtimes import cli

    def refuse(*args, **kwargs):
        raise AssertionError("a session was opened: the bad path was not caught before sampling")

    monkeypatch.setattr(cli, "_open_sessions", refuse)


def test_bad_output_paths_are_refused_before_any_session(pkg, tmp_path, no_sessions):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"x")
    cases = [
        (["--output", tmp_path / "afile" / "g.png"], "afile is a file, not a directory"),
        (["--output", tmp_path / "afile" / "deeper" / "g.png"], "afile is a file, not a directory"),
        (["--output", tmp_path / "grid"], "the file name must end in .png"),
        (["--output", tmp_path / "grid.jpg"], "the file name must end in .png"),
        (["--output", tmp_path / "grid.npy"], "the file name must end in .png"),
        (["--save-npy", tmp_path / "s.png"], "the file name must end in .npy"),
        (["--save-npy", tmp_path / "afile" / "s.npy"], "afile is a file, not a directory"),
        (["--output", tmp_path / "x.png", "--save-npy", tmp_path / "adir"], "is a directory"),
        (["--output-dir", tmp_path / "afile"], "is a file"),
        (["--output-dir", tmp_path / "full"], "is not empty"),
        (["--output-dir", tmp_path / "new", "--output", tmp_path / "new" / "g.png"], "is inside --output-dir"),
        (["--output", pkg / "g.png"], "is inside the package"),
        (["--runtime", "openvino", "--ov-cache-dir", pkg / "cache"], "is inside the package"),
        (["--output", "/proc/x.png"], "cannot write --output /proc/x.png"),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra, msg in cases:
        r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cpu", *map(str, extra)])
        assert r.exit_code == 2 and msg in error_line(r), (extra, r.output)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "g.png" not in {p.name for p in pkg.iterdir()}


def test_streamed_outputs_match_the_gathered_samples(pkg, tmp_path):
    """--output-dir, the streamed grid and the .npy written at offsets agree with generate() and make_grid, also
    with two sessions (batches arrive out of order)."""
    from diffit_port.images import make_grid

    for devices in (["--devices", "cpu"], ["--devices", "cpu,cpu"]):
        out = tmp_path / devices[1].replace(",", "-")
        r = run(["--package", pkg, "--runtime", "onnx-cpu", *BASE, *devices, "--output", out / "g.png",
                 "--save-npy", out / "s.npy", "--output-dir", out / "each"])
        assert r.exit_code == 0, r.output
        x = np.load(out / "s.npy")
        assert x.shape == (5, 1, 16, 16)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "g.png")), make_grid(x, scale=6))
        names = sorted(p.name for p in (out / "each").iterdir())
        assert names == [f"{i:06d}.png" for i in range(5)]
        for i, name in enumerate(names):
            np.testing.assert_array_equal(np.asarray(Image.open(out / "each" / name)), make_grid(x[i:i + 1], pad=0))
        assert sorted(p.name for p in out.iterdir()) == ["each", "g.png", "s.npy"]   # no temporary files
    np.testing.assert_allclose(np.load(tmp_path / "cpu-cpu" / "s.npy"), np.load(tmp_path / "cpu" / "s.npy"),
                               atol=1e-4, rtol=0)


def test_output_dir_alone_writes_no_grid(pkg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # where the default grid would land
    r = run(["--package", pkg, "--runtime", "onnx-cpu", *BASE, "--output-dir", "each"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["each"] and len(list((tmp_path / "each").iterdir())) == 5


def test_errors_after_the_outputs_opened_map_to_one_line():
    """What can stop a run once its writers exist (the VAE decoder's backend, the disk, a usage problem found
    by the sampler) becomes a click error with the right exit code, never a traceback."""
    from diffit_port.outputs import OutputError, WriteError
    from diffit_port.runtimes.base import RuntimeUnavailable
    from diffit_port.runtimes.cli_outputs import reraise_cleanly

    cases = [(RuntimeUnavailable("the openvino runtime needs openvino"), 2, "needs openvino"),
             (WriteError("cannot write --output g.png: No space left on device"), 1, "any previous file is unchanged"),
             (OutputError("--output x: bad"), 2, "--output x: bad"),
             (OSError(5, "Input/output error", "g.png"), 1, "g.png: Input/output error; nothing was written"),
             (ValueError("denoiser returned shape (1, 3)"), 2, "denoiser returned shape")]
    for exc, code, msg in cases:
        with pytest.raises(click.ClickException) as e:
            reraise_cleanly(exc)
        assert e.value.exit_code == code and msg in e.value.format_message(), (exc, e.value.format_message())


def test_openvino_absent_device_is_a_clean_error(pkg, tmp_path):
    require_openvino()
    for device in ("GPU", "NPU.3", "NO_SUCH_DEVICE"):
        r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "openvino", "--device", device,
                                      "--output", str(tmp_path / "g.png")])
        line = error_line(r)
        assert r.exit_code == 2 and f"openvino cannot compile the model for device {device!r}" in line, r.output
        assert "available devices: CPU" in line
    assert list(tmp_path.iterdir()) == []
    # "cpu", as the other runtimes spell it, is OpenVINO's "CPU" (its device names are case-sensitive)
    r = run(["--package", pkg, "--runtime", "openvino", "--device", "cpu", *BASE, "--output", tmp_path / "g.png"])
    assert r.exit_code == 0 and "device=CPU" in r.stdout, r.output
