"""onnx-cpu's int8 graph (runtimes/ort_int8.py) on the shipped digits package: what the calibration run records,
which convolutions are quantized, the error against fp32 on another trajectory, batch invariance, the device loop,
and the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from diffit_port import samplers
from diffit_port.package import CUSTOM_DOMAIN, default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, generate
from diffit_port.runtimes.onnx_rt import OrtDenoiser, import_ort
from diffit_port.runtimes.calibration import CALIBRATION_CALLS, CALIBRATION_IMAGES, CALIBRATION_SEED
from diffit_port.runtimes.ort_int8 import calibration_feeds, name_nodes, quantize_int8
from int8_helpers import assert_close_to_fp32_on_another_trajectory, batch_whole_and_in_parts, trajectory
from loop_helpers import host_and_device
from runtime_helpers import package_path


@pytest.fixture(scope="module")
def digits():
    return load_package(default_package_path())


@pytest.fixture(scope="module")
def calibration(digits):
    ort = import_ort()
    session = ort.InferenceSession(str(digits.graph_path()), providers=["CPUExecutionProvider"])
    return calibration_feeds(digits, "denoiser", session, lambda s: OrtDenoiser(
        s, name="onnx-cpu", device="cpu", precision="fp32", out_channels=digits.model.out_channels))


@pytest.fixture(scope="module")
def int8(digits):
    return create_denoiser("onnx-cpu", digits, int8=True)


def test_calibration_feeds_are_every_call_of_the_default_sampling(digits, calibration):
    s = digits.sampling          # dpmpp-2m, 10 steps: every call is kept
    assert len(calibration) == samplers.num_denoiser_calls(s["sampler"], s["steps"]) == CALIBRATION_CALLS
    sigmas = [float(f["sigma"][0]) for f in calibration]
    assert sigmas[0] == pytest.approx(samplers.schedule_from_config(digits.diffusion).sigma_max, rel=1e-6)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))          # from pure noise to the last step
    labels = list(range(CALIBRATION_IMAGES)) + [digits.model.null_label] * CALIBRATION_IMAGES
    for f in calibration:                                             # guided: [cond; uncond] rows
        assert f["x"].shape[0] == 2 * CALIBRATION_IMAGES and len(set(f["sigma"].tolist())) == 1
        assert sorted(f["y"].tolist()) == labels
    assert not np.array_equal(calibration[0]["x"], calibration[-1]["x"])
    # the first call sees the run's own start, sigma_max times each image's noise stream (closed form), twice
    m = digits.model
    noise = samplers.NoiseSource(CALIBRATION_SEED, CALIBRATION_IMAGES).standard_normal(
        (CALIBRATION_IMAGES, m.in_channels, m.image_size, m.image_size))
    start = np.concatenate([sigmas[0] * noise] * 2)
    np.testing.assert_allclose(calibration[0]["x"], start, rtol=1e-6, atol=1e-5)


def test_only_the_inner_convolutions_are_quantized(digits, calibration):
    model = onnx.load(str(digits.graph_path()))
    name_nodes(model)
    before = model.SerializeToString()
    q = quantize_int8(model, calibration)
    assert model.SerializeToString() == before                         # the float model is left whole
    _assert_inner_convolutions_quantized(q)


def _assert_inner_convolutions_quantized(q: onnx.ModelProto) -> None:
    producer = {o: nd.op_type for nd in q.graph.node for o in nd.output}
    weights = [producer.get(nd.input[1], "initializer") for nd in q.graph.node if nd.op_type == "Conv"]
    assert len(weights) == 14
    assert weights[0] == weights[-1] == "initializer"                   # the first and the last stay float
    assert set(weights[1:-1]) == {"DequantizeLinear"}
    assert not any(nd.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits") for nd in q.graph.node)


def test_the_runtime_quantizes_the_graph_after_the_transformer_fusions(digits, tmp_path):
    """What onnx-cpu --int8 runs (read from its cache entry): the attention as MultiHeadAttention, the fused graph
    without SkipLayerNormalization (slower on the CPU than a LayerNormalization and an add), its inner convolutions
    in int8."""
    import collections

    create_denoiser("onnx-cpu", digits, int8=True, cache_dir=str(tmp_path))
    (entry,) = tmp_path.iterdir()
    q = onnx.load(entry)
    ops = collections.Counter(nd.op_type for nd in q.graph.node)
    assert ops["MultiHeadAttention"] == ops["FastGelu"] == 8          # one each a transformer block
    assert ops["SkipLayerNormalization"] == ops["Tanh"] == 0
    assert not any(nd.domain == CUSTOM_DOMAIN for nd in q.graph.node)
    _assert_inner_convolutions_quantized(q)


def test_int8_stays_close_to_fp32_on_another_trajectory(digits, int8):
    assert_close_to_fp32_on_another_trajectory(digits, int8, create_denoiser("onnx-cpu", digits))


def test_int8_outputs_do_not_depend_on_the_other_rows(int8):
    np.testing.assert_array_equal(*batch_whole_and_in_parts(int8))


def test_int8_device_loop_matches_its_host_loop(digits, int8):
    host, dev = host_and_device(int8, digits, "dpmpp-2m", 4, np.array([3, 8]), null_label=digits.model.null_label,
                                guidance=1.5)
    assert float(np.abs(dev - host).max()) <= 1e-5


def test_int8_device_loops_in_two_threads_attach_their_updates_in_turn(digits, monkeypatch):
    """Two int8 denoisers share one quantized model; their device loops, opened in generate()'s two threads,
    attach their updates to it one at a time, and sample what a third denoiser of it does alone."""
    import threading
    import time

    from diffit_port.runtimes import create_denoisers, loop_graph

    active, most, count = [0], [0], threading.Lock()
    real = loop_graph.attach_update

    def slow_attach(model, spec):
        with count:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)          # long enough for the other thread to arrive meanwhile
        try:
            return real(model, spec)
        finally:
            with count:
                active[0] -= 1

    *pair, third = create_denoisers("onnx-cpu", digits, ["cpu"] * 3, int8=True)
    cfg = replace(SamplingConfig.from_package(digits, num_images=4, batch_size=2, seed=5), steps=3, device_loop=True)
    labels = np.array([1, 2, 3, 4])
    alone = generate([third], digits, cfg, labels)
    monkeypatch.setattr(loop_graph, "attach_update", slow_attach)
    both = generate(pair, digits, cfg, labels)
    assert most[0] == 1
    np.testing.assert_array_equal(both, alone)


def test_int8_refuses_a_graph_without_convolutions_to_quantize(tmp_path_factory):
    latent = load_package(package_path("tiny-latent", tmp_path_factory))
    with pytest.raises(ValueError, match="none to quantize"):
        create_denoiser("onnx-cpu", latent, int8=True)


def test_run_cli_onnx_cpu_int8(tmp_path):
    from diffit_port.runtimes.cli import main

    r = CliRunner().invoke(main, ["--runtime", "onnx-cpu", "--int8", "--num-images", "2", "--steps", "2",
                                  "--no-progress", "--output", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "int8" in lines[0], r.stdout
    assert (tmp_path / "a.png").is_file() and "calibrating" not in r.stderr
    shown = CliRunner().invoke(main, ["--runtime", "onnx-cpu", "--int8", "--num-images", "2", "--steps", "2",
                                      "--output", str(tmp_path / "b.png")])
    assert shown.exit_code == 0 and "calibrating the int8 convolutions" in shown.stderr, shown.output
    auto = CliRunner().invoke(main, ["--int8", "--output", str(tmp_path / "c.png")])
    assert auto.exit_code == 2 and "(it does to --runtime onnx-cpu and openvino)" in auto.output, auto.output


def test_calibration_of_a_longer_run_keeps_evenly_spaced_calls(tmp_path_factory):
    package = load_package(package_path("tiny-edm", tmp_path_factory))      # EDM's Heun, 6 steps: 11 calls
    session = import_ort().InferenceSession(str(package.graph_path("denoiser_cfg")), providers=["CPUExecutionProvider"])
    feeds = calibration_feeds(package, "denoiser_cfg", session, lambda s: OrtDenoiser(
        s, name="onnx-cpu", device="cpu", precision="fp32", out_channels=package.model.out_channels))
    grid = samplers.schedule_from_config(package.diffusion).sigmas(package.sampling["steps"])
    calls = [grid[0]] + [s for s in grid[1:-1] for _ in (0, 1)]            # Heun: the last step has no corrector
    assert len(calls) == 11 and len(feeds) == CALIBRATION_CALLS
    picked = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]                                  # evenly spaced, first and last kept
    assert [float(f["sigma"][0]) for f in feeds] == pytest.approx([calls[i] for i in picked], rel=1e-6)
    assert all(f["guidance"].shape == (CALIBRATION_IMAGES,) for f in feeds)   # in-graph guidance: one row an image


def test_cache_dir_keeps_the_calibrated_graph(digits, tmp_path, monkeypatch):
    from diffit_port.runtimes import onnx_rt

    x, t, y = trajectory(digits, 11, np.array([4]))[5]
    first = create_denoiser("onnx-cpu", digits, int8=True, cache_dir=str(tmp_path / "cache"))
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("onnx-cpu-int8-") and entries[0].suffix == ".onnx"

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(onnx_rt, "calibration_feeds", no_calibration)
    again = create_denoiser("onnx-cpu", digits, int8=True, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(first(x, t, y), again(x, t, y))
    with pytest.raises(AssertionError, match="calibrated again"):    # another setting is another entry
        create_denoiser("onnx-cpu", digits, int8=True, channel_norms=True, cache_dir=str(tmp_path / "cache"))
    monkeypatch.undo()

    entries[0].write_bytes(b"not a model")                             # a damaged entry is built again
    rebuilt = create_denoiser("onnx-cpu", digits, int8=True, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(first(x, t, y), rebuilt(x, t, y))
    assert onnx.load(entries[0]).graph.node and not list((tmp_path / "cache").glob(".*.tmp"))


def test_cache_dir_needs_int8(digits, tmp_path):
    from diffit_port.runtimes.cli import main

    with pytest.raises(ValueError, match="needs int8"):
        create_denoiser("onnx-cpu", digits, cache_dir=str(tmp_path))
    r = CliRunner().invoke(main, ["--runtime", "onnx-cpu", "--cache-dir", str(tmp_path), "--output",
                                  str(tmp_path / "a.png")])
    assert r.exit_code == 2 and "--cache-dir applies to onnx-cpu with --int8" in r.output
