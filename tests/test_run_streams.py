"""What `diffit-run` leaves on stderr and stdout besides its own lines, in a subprocess: onnxruntime's log writes to
the process's stderr from C++, which click's CliRunner does not see."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffit_port.package import default_package_path
from diffit_port.runtimes.fastest import NO_OPENVINO_NOTE
from runtime_helpers import has_cuda_provider


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
def test_onnxruntime_log_stays_out_of_diffit_run_fastest(tmp_path):
    """The shipped package with --fastest: onnxruntime's CUDA EP logs cuDNN errors it recovers from ("No execution
    plans support the graph", a dozen on an H100) and its transformer tools print while the graph is prepared (a
    "fusion" progress bar, a failed shape inference); none of it reaches diffit-run's stderr, which stays empty
    without the progress bar, and stdout holds the one summary line."""
    run = subprocess.run([sys.executable, "-m", "diffit_port.runtimes.cli", "--package", str(default_package_path()),
                          "--fastest", "--num-images", "64", "--batch-size", "32", "--no-progress",
                          "--output", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1 and run.stdout.startswith("runtime=onnx-cuda"), run.stdout
    assert run.stderr == "", run.stderr


def test_fastest_on_a_cpu_host_prints_only_its_summary(tmp_path):
    """The same on a host without CUDA, where --fastest runs OpenVINO (or onnx-cpu, with its one-line note)."""
    if has_cuda_provider():
        pytest.skip("this onnxruntime has the CUDA provider (the test above covers it)")
    run = subprocess.run([sys.executable, "-m", "diffit_port.runtimes.cli", "--package", str(default_package_path()),
                          "--fastest", "--num-images", "4", "--batch-size", "4", "--steps", "2", "--no-progress",
                          "--output", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1 and run.stdout.startswith("runtime="), run.stdout
    assert run.stderr in ("", NO_OPENVINO_NOTE + "\n"), run.stderr
