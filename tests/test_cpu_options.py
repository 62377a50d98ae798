"""CPU runtime options: onnxruntime's spinning switch and MultiHeadAttention, OpenVINO's CPU pinning default and
int8 weight compression (NNCF), mostly on the shipped digits package (OpenVINO's int8 convolutions:
test_ov_int8.py)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser


def test_spinning_off_reaches_the_session_options():
    import onnxruntime as ort

    from diffit_port.runtimes.onnx_rt import session_options

    off = session_options(ort, 2, spinning=False)
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert off.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert off.intra_op_num_threads == 2
    on = session_options(ort)
    with pytest.raises(Exception):   # not set at all: onnxruntime's default (spinning on)
        on.get_session_config_entry("session.intra_op.allow_spinning")


def test_openvino_cpu_threads_are_not_pinned_unless_asked():
    package = load_package(default_package_path())
    default = create_denoiser("openvino", package)
    pinned = create_denoiser("openvino", package, config={"ENABLE_CPU_PINNING": True})
    x, t, y = _step_inputs(4)
    for d in (default, pinned):
        d(x, t, y)         # on the CPU the models are compiled per batch size, at the first call of each
    assert default.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert pinned.compiled.get_property("ENABLE_CPU_PINNING") is True


def _step_inputs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return (rng.standard_normal((n, 1, 32, 32)).astype(np.float32), rng.uniform(0.1, 20.0, n).astype(np.float32),
            rng.integers(0, 11, n))


def test_onnx_cpu_runs_multihead_attention_and_fast_gelu_unless_told_to_run_the_graph_as_shipped(monkeypatch):
    """onnx-cpu rewrites the custom nodes to MultiHeadAttention with q, k and v from three MatMuls and fuses each GELU
    into a FastGelu, once for all its sessions (two streams, then a device loop's); mha=False, fusions=False
    (--no-mha --no-fusions) run the package as shipped. Each form agrees with it within the rewrite's tolerance
    (docs/PARITY.md), and each ran its own graph."""
    from diffit_port import samplers
    from diffit_port.runtimes import onnx_rt

    done: list[str] = []
    real_mha, real_gelu = onnx_rt.rewrite_to_mha, onnx_rt.fuse_gelu
    monkeypatch.setattr(onnx_rt, "rewrite_to_mha", lambda m, qkv="split": done.append(qkv) or real_mha(m, qkv=qkv))
    monkeypatch.setattr(onnx_rt, "fuse_gelu", lambda m: done.append("gelu") or real_gelu(m))
    package = load_package(default_package_path())
    x, t, y = _step_inputs(6)
    want = create_denoiser("onnx-cpu", package, mha=False, fusions=False)(x, t, y)
    assert done == []
    outs = {}
    for opts, steps in (({"fusions": False}, ["separate"]), ({"mha": False}, ["gelu"]), ({}, ["separate", "gelu"])):
        d = create_denoiser("onnx-cpu", package, **opts)
        outs[str(opts)] = d(x, t, y)
        d.device_loop.sample("dpmpp-2m", samplers.NoiseSource(0, 2), (2, 1, 32, 32), np.array([1, 2]),
                             samplers.schedule_from_config(package.diffusion), 2)
        assert done == steps and d.streams == 2, opts
        done.clear()
    errs = {k: float(np.abs(v - want).max()) for k, v in outs.items()}
    assert all(0 < e <= 1e-5 for e in errs.values()) and float(np.abs(want).max()) > 0.1, errs


def test_openvino_cpu_static_shapes_and_two_streams():
    """On the CPU each call runs on two streams, each half of the rows on a model compiled for its exact batch
    (4 + 3 rows for a batch of 7); the step equals onnx-cpu's and the dynamic single-stream model's."""
    package = load_package(default_package_path())
    d = create_denoiser("openvino", package)
    dynamic = create_denoiser("openvino", package, static_shapes=False, streams=1)
    ref = create_denoiser("onnx-cpu", package)
    assert d.static and d.streams == 2 and dynamic.compiled is not None
    for n in (7, 2, 1):
        x, t, y = _step_inputs(n)
        want = ref(x, t, y)
        errs = [float(np.abs(o(x, t, y) - want).max()) for o in (d, dynamic)]
        assert max(errs) <= 1e-5 and float(np.abs(want).max()) > 0.1, (n, errs)
    assert sorted(d._models) == [1, 3, 4]
    compiled = d._models[4][0]
    assert compiled.get_property("NUM_STREAMS") == 2
    assert [list(p.get_partial_shape())[0].get_length() for p in compiled.inputs] == [4] * len(compiled.inputs)
    with pytest.raises(ValueError, match="streams must be >= 1"):
        create_denoiser("openvino", package, streams=0)


def test_onnx_cpu_splits_each_call_over_two_streams(monkeypatch):
    """onnx-cpu's CPU default: two sessions of half the cores each take a row chunk of every call (4 + 3 rows of
    7, in order); one session when threads are given or the weights are large; the step equals one session's."""
    import os

    from diffit_port.runtimes import onnx_rt

    package = load_package(default_package_path())
    d, one = create_denoiser("onnx-cpu", package), create_denoiser("onnx-cpu", package, streams=1)
    cpus = os.cpu_count() or 1
    assert d.streams == (2 if cpus >= 2 else 1) and one.streams == 1
    assert all(s.get_session_options().intra_op_num_threads == max(1, cpus // d.streams) for s in d._streams)
    assert create_denoiser("onnx-cpu", package, threads=1).streams == 1
    three = create_denoiser("onnx-cpu", package, streams=3)
    for n in (7, 2, 1):
        x, t, y = _step_inputs(n)
        want = one(x, t, y)
        errs = [float(np.abs(o(x, t, y) - want).max()) for o in (d, three)]
        assert max(errs) <= 1e-5 and float(np.abs(want).max()) > 0.1, (n, errs)
    monkeypatch.setattr(onnx_rt, "STREAMS_MAX_WEIGHT_BYTES", package.graph_bytes() - 1)
    assert create_denoiser("onnx-cpu", package).streams == 1
    with pytest.raises(ValueError, match="streams must be >= 1"):
        create_denoiser("onnx-cpu", package, streams=0)
    d.close()
    assert d.streams == 0


def test_int8_weights_of_a_latent_model_are_int8_and_close_to_fp32(tmp_path_factory):
    """A model with no inner convolution to quantize (the latent form) gets int8 weight-only compression."""
    pytest.importorskip("nncf")
    from runtime_helpers import package_path

    package = load_package(package_path("tiny-latent", tmp_path_factory))
    m = package.model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, m.in_channels, m.image_size, m.image_size)).astype(np.float32)
    t = np.array([10.0, 300.0, 600.0, 990.0], np.float32)
    y = np.array([1, 5, 9, 7])
    fp32 = create_denoiser("openvino", package)
    int8 = create_denoiser("openvino", package, int8=True)
    assert int8.provider.endswith("(int8 weights)") and int8.precision == "fp32"
    import onnx.inliner
    import openvino as ov

    from diffit_port.runtimes.openvino_rt import read_onnx
    from diffit_port.runtimes.ov_int8 import compress_weights_int8

    core = ov.Core()
    model = read_onnx(core, onnx.inliner.inline_local_functions(onnx.load(str(package.graph_path()))))

    def kinds(m):
        # element types of the weight-sized constants (at least 1024 values)
        return {op.get_output_element_type(0).get_type_name() for op in m.get_ordered_ops()
                if op.get_type_name() == "Constant" and int(np.prod(list(op.get_output_shape(0)))) >= 1024}

    assert "u8" not in kinds(model) and "u8" in kinds(compress_weights_int8(model))
    a, b = fp32(x, t, y), int8(x, t, y)
    err = float(np.abs(a - b).max())
    print(f"\nint8 weights vs fp32, one step: max|diff| {err:.2e} (|eps| up to {np.abs(a).max():.1f})")
    assert 0 < err <= 0.1    # changed, but a small fraction of the O(1) eps


def test_run_cli_int8_keeps_stdout_to_the_summary_line(tmp_path):
    pytest.importorskip("nncf")
    from diffit_port.runtimes.cli import main

    r = CliRunner().invoke(main, ["--runtime", "openvino", "--int8", "--num-images", "2", "--steps", "2",
                                  "--no-progress", "--output", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "(int8_convolutions)" in lines[0], r.stdout
    bad = CliRunner().invoke(main, ["--runtime", "torch", "--int8", "--output", str(tmp_path / "b.png")])
    assert bad.exit_code == 2 and "--int8 does not apply to the torch runtime" in bad.output


def test_onnx_cpu_takes_no_fusions_but_refuses_the_unet_fusions(tmp_path):
    from diffit_port.runtimes.cli import main

    bad = CliRunner().invoke(main, ["--runtime", "onnx-cpu", "--unet-fusions", "--output", str(tmp_path / "a.png")])
    assert bad.exit_code == 2 and "--unet-fusions does not apply to the onnx-cpu runtime" in bad.output
    ok = CliRunner().invoke(main, ["--runtime", "onnx-cpu", "--no-fusions", "--no-mha", "--num-images", "2", "--steps",
                                   "2", "--no-progress", "--output", str(tmp_path / "b.png")])
    assert ok.exit_code == 0 and (tmp_path / "b.png").is_file(), ok.output
