"""What the two int8 paths' tests share (onnx-cpu's and openvino's): the inputs of every call of a sampling run, the
bound of int8 against fp32 on a trajectory the calibration did not see, and one batch run whole and in parts."""

from __future__ import annotations

import numpy as np

from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, generate

INT8_REL_L2 = 1.5e-2   # a call's relative L2 error against fp32 (measured 2e-3 to 7.5e-3 on the digits trajectory)


def trajectory(package, seed: int, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The inputs of every call of the package's default sampling of `labels` with `seed` (fp32 onnx-cpu)."""
    fp32, calls = create_denoiser("onnx-cpu", package), []

    def record(x, t, y, guidance=None):
        calls.append((x.copy(), t.copy(), y.copy()))
        return fp32(x, t, y)

    record.name, record.device, record.precision, record.provider = "rec", "cpu", "fp32", "cpu"
    record.close = lambda: None
    cfg = SamplingConfig.from_package(package, num_images=len(labels), batch_size=len(labels), seed=seed)
    generate([record], package, cfg, labels)
    return calls


def assert_close_to_fp32_on_another_trajectory(package, int8, fp32) -> None:
    """Each call of a trajectory the calibration did not see: `int8` within INT8_REL_L2 of `fp32`, and not equal."""
    errors = []
    for x, t, y in trajectory(package, 7, np.array([5, 9, 2])):
        a, b = fp32(x, t, y), int8(x, t, y)
        errors.append(float(np.linalg.norm(b - a) / np.linalg.norm(a)))
    print(f"\n{int8.provider} vs fp32 over {len(errors)} calls: rel. L2 {min(errors):.1e} to {max(errors):.1e}")
    assert 0 < min(errors) and max(errors) < INT8_REL_L2
    assert int8.provider.endswith("(int8 convolutions)") and int8.precision == "fp32"


def batch_whole_and_in_parts(denoiser) -> tuple[np.ndarray, np.ndarray]:
    """A batch of 6 rows run at once, and in parts of 1, 3 and 2 rows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 1, 32, 32)).astype(np.float32) * 3
    t, y = np.full(6, 2.0, np.float32), np.array([0, 1, 2, 10, 10, 10])
    parts = [denoiser(x[a:b], t[a:b], y[a:b]) for a, b in [(0, 1), (1, 4), (4, 6)]]
    return denoiser(x, t, y), np.concatenate(parts)
