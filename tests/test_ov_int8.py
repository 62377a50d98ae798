"""openvino --int8 on an image model (runtimes/ov_int8.py): the inner convolutions quantized statically by NNCF,
calibrated on the package's default sampling, checked against fp32 openvino and against onnx-cpu's calibration."""

from __future__ import annotations

import numpy as np
import pytest

from diffit_port import samplers
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.calibration import CALIBRATION_CALLS, CALIBRATION_IMAGES, CALIBRATION_SEED
from int8_helpers import assert_close_to_fp32_on_another_trajectory, batch_whole_and_in_parts, trajectory

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def digits():
    return load_package(default_package_path())


@pytest.fixture(scope="module")
def prepared(digits):
    """(the fp32 OpenVINO model as openvino runs it, its calibration feeds, the int8 model)."""
    import onnx
    import onnx.inliner
    import openvino as ov

    from diffit_port.runtimes.group_norm import per_channel_group_norms
    from diffit_port.runtimes.openvino_rt import OpenVinoDenoiser, _compiler, read_onnx
    from diffit_port.runtimes.ov_int8 import calibration_feeds, quantize_convolutions

    core = ov.Core()
    model = onnx.inliner.inline_local_functions(onnx.load(str(digits.graph_path())))
    per_channel_group_norms(model)
    fp32_model = read_onnx(core, model)
    fp32 = OpenVinoDenoiser(_compiler(core, fp32_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), device="CPU",
                            precision="fp32", input_names=[i.name for i in model.graph.input], static=True, streams=1)
    feeds = calibration_feeds(digits, "denoiser", fp32)
    return fp32_model, feeds, quantize_convolutions(fp32_model, feeds)


@pytest.fixture(scope="module")
def int8(digits):
    return create_denoiser("openvino", digits, int8=True)


def test_calibration_feeds_are_the_calls_onnx_cpu_calibrates_on(digits, prepared):
    """The same calls as onnx-cpu's calibration (an independent runtime): the first is sigma_max times each image's
    noise stream, for both halves of the guided batch; the later ones follow the fp32 trajectory."""
    from diffit_port.runtimes.onnx_rt import OrtDenoiser, import_ort
    from diffit_port.runtimes.ort_int8 import calibration_feeds

    _, feeds, _ = prepared
    session = import_ort().InferenceSession(str(digits.graph_path()), providers=["CPUExecutionProvider"])
    ort = calibration_feeds(digits, "denoiser", session, lambda s: OrtDenoiser(
        s, name="onnx-cpu", device="cpu", precision="fp32", out_channels=digits.model.out_channels))
    assert len(feeds) == len(ort) == CALIBRATION_CALLS
    for ours, theirs in zip(feeds, ort):
        assert sorted(ours) == sorted(theirs) == ["sigma", "x", "y"]
        np.testing.assert_array_equal(ours["y"], theirs["y"])
        np.testing.assert_allclose(ours["sigma"], theirs["sigma"], rtol=1e-6)
        np.testing.assert_allclose(ours["x"], theirs["x"], atol=1e-4 * max(1.0, float(theirs["sigma"].max())))
    m = digits.model
    noise = samplers.NoiseSource(CALIBRATION_SEED, CALIBRATION_IMAGES).standard_normal(
        (CALIBRATION_IMAGES, m.in_channels, m.image_size, m.image_size))
    first = feeds[0]["x"]
    want = (float(feeds[0]["sigma"][0]) * noise).astype(np.float32)
    np.testing.assert_allclose(first[:CALIBRATION_IMAGES], want, rtol=1e-6)
    np.testing.assert_allclose(first[CALIBRATION_IMAGES:], want, rtol=1e-6)


def _quantized_inputs(ov_model, op_type: str) -> list[bool]:
    """Per op of `op_type`, in graph order: whether its first input comes out of a FakeQuantize."""
    ops = [op for op in ov_model.get_ordered_ops() if op.get_type_name() == op_type]
    return [op.input_value(0).get_node().get_type_name() == "FakeQuantize" for op in ops]


def test_only_the_inner_convolutions_are_quantized(prepared):
    fp32_model, _, q = prepared
    assert _quantized_inputs(fp32_model, "Convolution") == [False] * 14
    assert _quantized_inputs(q, "Convolution") == [False] + [True] * 12 + [False]
    assert not any(_quantized_inputs(q, "MatMul"))


def test_int8_stays_close_to_fp32_on_another_trajectory(digits, int8):
    assert_close_to_fp32_on_another_trajectory(digits, int8, create_denoiser("openvino", digits))


def test_int8_outputs_do_not_depend_on_the_other_rows(int8):
    whole, parts = batch_whole_and_in_parts(int8)
    err = float(np.abs(whole - parts).max())
    print(f"\nopenvino int8, a batch whole and in parts: max|diff| {err:.1e}")
    assert err <= 1e-5


def test_cache_dir_keeps_the_quantized_model(digits, tmp_path, monkeypatch):
    from diffit_port.runtimes import ov_int8

    x, t, y = trajectory(digits, 11, np.array([4]))[5]
    cache = tmp_path / "cache"
    first = create_denoiser("openvino", digits, int8=True, cache_dir=str(cache))
    (entry,) = cache.glob("openvino-int8-*.xml")
    assert entry.with_suffix(".bin").is_file() and not list(cache.glob(".*tmp*"))

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(ov_int8, "calibration_feeds", no_calibration)
    again = create_denoiser("openvino", digits, int8=True, cache_dir=str(cache))
    np.testing.assert_array_equal(first(x, t, y), again(x, t, y))
    with pytest.raises(AssertionError, match="calibrated again"):    # another setting is another entry
        create_denoiser("openvino", digits, int8=True, attention="sdpa", cache_dir=str(cache))
    monkeypatch.undo()

    entry.write_text("not a model")                                  # a damaged entry is built again
    rebuilt = create_denoiser("openvino", digits, int8=True, cache_dir=str(cache))
    np.testing.assert_array_equal(first(x, t, y), rebuilt(x, t, y))
    assert len(list(cache.glob("openvino-int8-*.xml"))) == 1 and not list(cache.glob(".*tmp*"))


def test_without_nncf_int8_is_refused_before_any_calibration(digits, monkeypatch):
    import sys

    from diffit_port.runtimes import RuntimeUnavailable, openvino_rt, ov_int8

    monkeypatch.setitem(sys.modules, "nncf", None)                   # an import of it fails
    monkeypatch.setattr(openvino_rt, "installed", lambda module: module != "nncf")
    monkeypatch.setattr(ov_int8, "calibration_feeds", lambda *a: pytest.fail("calibrated without nncf"))
    with pytest.raises(RuntimeUnavailable, match=r"needs the Python package 'nncf'.*diffit-port\[int8\]"):
        create_denoiser("openvino", digits, int8=True)
