"""Atomic writes (diffit_port.atomic), the streaming writers (diffit_port.outputs) and the PNG band encoder
(diffit_port.images.PngStream), including a real "disk full" (RLIMIT_FSIZE) run of diffit-run."""

from __future__ import annotations

import io
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffit_port import atomic
from diffit_port.images import PngStream, make_grid, save_grid
from diffit_port.outputs import (GridWriter, ImageDirWriter, NpyWriter, OutputError, check_output_dir,
                                 check_output_file, discard_all, finish_all)
from runtime_helpers import package_path


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_replacing_keeps_the_old_file_on_any_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic.atomic_open(target) as f:
                f.write(b"new, half written")
                raise exc
        assert target.read_bytes() == b"old" and files(tmp_path) == ["f.bin"]
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and files(tmp_path) == ["f.bin"]
    assert (target.stat().st_mode & 0o777) == atomic.default_mode()          # not mkstemp's 0600


def test_png_stream_decodes_to_the_same_pixels():
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (4, 9, 3)):
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        buf = io.BytesIO()
        png = PngStream(buf, shape[1], shape[0], 1 if len(shape) == 2 else 3)
        for band in np.array_split(img, 3):                               # three bands, one of them empty or not
            png.write_rows(band)
        png.close()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), img)
    with pytest.raises(ValueError, match="rows written"):
        PngStream(io.BytesIO(), 2, 2, 1).close()


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_grid_writer_out_of_order_equals_make_grid(tmp_path, channels):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.2, 1.2, size=(11, channels, 5, 5)).astype(np.float32)
    w = GridWriter(tmp_path / "sub" / "g.png", 11, x.shape[1:], scale=2)              # 3 rows of 4 tiles
    for start in (0, 6, 3, 9):               # batches of 3 from two sessions, not aligned with the grid's rows
        w.write(start, x[start:start + 3])
    finish_all([w])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "g.png")), make_grid(x, scale=2))
    assert files(tmp_path / "sub") == ["g.png"]


def test_npy_writer_and_image_dir_writer(tmp_path):
    x = np.random.default_rng(2).standard_normal((5, 3, 4, 4)).astype(np.float32)
    npy, each = NpyWriter(tmp_path / "s.npy", 5, (3, 4, 4)), ImageDirWriter(tmp_path / "each", 5)
    for start in (3, 0):
        for w in (npy, each):
            w.write(start, x[start:start + 3])
    finish_all([npy, each])
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), x)
    assert files(tmp_path / "each") == [f"{i:06d}.png" for i in range(5)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "each" / "000004.png")), make_grid(x[4:], pad=0))
    assert files(tmp_path) == ["each", "s.npy"]


def test_discard_leaves_nothing_behind(tmp_path):
    (tmp_path / "old.png").write_bytes(b"old")
    ws = [NpyWriter(tmp_path / "a" / "b" / "s.npy", 3, (1, 2, 2)), GridWriter(tmp_path / "old.png", 3, (1, 2, 2)),
          ImageDirWriter(tmp_path / "c" / "each", 3)]
    ws[0].write(0, np.zeros((1, 1, 2, 2), np.float32))
    discard_all(ws)
    assert files(tmp_path) == ["old.png"] and (tmp_path / "old.png").read_bytes() == b"old"


def test_static_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output_file(tmp_path / "new" / "deeper" / "g.PNG", ".png", "--output")     # creatable, any case
    for path, msg in ((tmp_path / "f" / "g.png", "is a file, not a directory"), (tmp_path / "g", "must end in .png"),
                      (tmp_path, "must end in .png")):
        with pytest.raises(OutputError, match=msg):
            check_output_file(path, ".png", "--output")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "f", "--output-dir")
    assert files(tmp_path) == ["f"]


def test_save_grid_is_atomic(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    target = tmp_path / "g.png"
    save_grid(np.zeros((2, 1, 4, 4)), target)
    before = target.read_bytes()

    def fail(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", fail)
    with pytest.raises(OSError):
        save_grid(np.ones((2, 1, 4, 4)), target)
    assert target.read_bytes() == before and files(tmp_path) == ["g.png"]


# --------------------------------------------------------------------------------------------------
# A full disk for real: RLIMIT_FSIZE makes every write past the limit fail with EFBIG in that process only
# --------------------------------------------------------------------------------------------------

def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_full_disk_keeps_previous_outputs(tmp_path, tmp_path_factory):
    pkg = package_path("tiny", tmp_path_factory)
    (tmp_path / "g.png").write_bytes(b"previous grid")
    (tmp_path / "s.npy").write_bytes(b"previous npy")
    code = "from diffit_port.runtimes.cli import main; main()"
    base = [sys.executable, "-c", code, "--package", str(pkg), "--runtime", "onnx-cpu", "--num-images", "9",
            "--steps", "2", "--threads", "1"]
    # The grid is written while sampling (tiles to a scratch file, finished bands to the PNG): the first
    # batch's 9 tiles of 96x96 bytes pass the 2 KiB limit, so the run fails mid-write, after sampling began.
    r = subprocess.run([*base, "--output", "g.png"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limited(2048))
    assert r.returncode == 1, r.stderr
    assert "Error: cannot write --output g.png: File too large; nothing was written (any previous file is " \
           "unchanged)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "diffit-run onnx-cpu" in r.stderr                                # the progress bar: sampling had begun
    # The .npy is allocated in full when opened: the run stops before the first denoiser call.
    r = subprocess.run([*base, "--save-npy", "s.npy", "--output", "g.png"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, preexec_fn=_limited(4096))
    assert r.returncode == 1 and "cannot write --save-npy s.npy: File too large" in r.stderr, r.stderr
    assert "diffit-run onnx-cpu" not in r.stderr                            # no progress bar: no denoiser call
    assert files(tmp_path) == ["g.png", "s.npy"]
    assert (tmp_path / "g.png").read_bytes() == b"previous grid"
    assert (tmp_path / "s.npy").read_bytes() == b"previous npy"
