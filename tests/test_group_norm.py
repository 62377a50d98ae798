"""GroupNorms from per-channel statistics (runtimes/group_norm.py): torch's export pattern rewritten and run by
onnxruntime against torch's own group_norm, the shipped digits graph, the patterns left alone, and where
openvino applies it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes.group_norm import per_channel_group_norms


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _group_norm_model(C: int, G: int, gamma: np.ndarray, beta: np.ndarray, *, opset: int = 17,
                      norm_scale: float = 1.0, eps: float = 1e-5) -> onnx.ModelProto:
    """x -> torch's GroupNorm export: Reshape (0, G, -1), InstanceNormalization, Reshape to Shape(x), Mul, Add."""
    init = [numpy_helper.from_array(a, n) for a, n in [
        (np.array([0, G, -1], np.int64), "groups"), (np.full(G, norm_scale, np.float32), "ones"),
        (np.zeros(G, np.float32), "zeros"), (gamma.reshape(C, 1, 1), "gamma"), (beta.reshape(C, 1, 1), "beta")]]
    nodes = [helper.make_node("Reshape", ["x", "groups"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=eps),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["n", "s"], ["b"]),
             helper.make_node("Mul", ["b", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["y"])]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 6, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 6, 5])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 18])
def test_rewrite_matches_torch_group_norm_with_a_large_mean(opset):
    """Every value offset by 300 with unit spread: a one-pass variance (E[x^2] - E[x]^2) in float32 puts the output
    4e-2 off torch's float64 group_norm; the centred two passes stay at 4e-5, as InstanceNormalization's 8e-5."""
    torch = pytest.importorskip("torch")
    C, G = 12, 4
    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(1, 0.5, C).astype(np.float32), rng.normal(0, 0.5, C).astype(np.float32)
    x = (rng.standard_normal((3, C, 6, 5)) + 300).astype(np.float32)
    model = _group_norm_model(C, G, gamma, beta, opset=opset)
    assert per_channel_group_norms(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node}.isdisjoint({"InstanceNormalization", "Shape"})
    assert [i.name for i in model.graph.initializer if i.name in ("groups", "ones", "zeros")] == []
    ref = torch.nn.functional.group_norm(torch.from_numpy(x).double(), G, torch.from_numpy(gamma).double(),
                                         torch.from_numpy(beta).double(), eps=1e-5).numpy()
    np.testing.assert_allclose(_run(model, {"x": x}), ref, atol=2e-4, rtol=0)


def test_patterns_that_are_not_a_group_norm_stay():
    C, G = 8, 2
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    scaled = _group_norm_model(C, G, gamma, beta, norm_scale=2.0)      # an InstanceNormalization with its own scale
    two_readers = _group_norm_model(C, G, gamma, beta)
    two_readers.graph.node.append(helper.make_node("Identity", ["b"], ["b2"]))
    two_readers.graph.output.append(helper.make_tensor_value_info("b2", TensorProto.FLOAT, None))
    for model in (scaled, two_readers):
        before = model.SerializeToString()
        assert per_channel_group_norms(model) == 0
        assert model.SerializeToString() == before


def test_shipped_digits_graph():
    model = onnx.load(str(load_package(default_package_path()).graph_path()))
    shipped = onnx.load(str(load_package(default_package_path()).graph_path()))
    assert per_channel_group_norms(model) == 9
    onnx.checker.check_model(model)
    assert "InstanceNormalization" not in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(1)
    feeds = {"x": 3 * rng.standard_normal((4, 1, 32, 32), dtype=np.float32), "sigma": np.full(4, 2.0, np.float32),
             "y": np.arange(4, dtype=np.int64)}
    np.testing.assert_allclose(_run(model, feeds), _run(shipped, feeds), atol=1e-5, rtol=0)


@pytest.mark.parametrize("opts, rewritten", [({"precision": "fp32"}, True), ({"precision": "bf16"}, False),
                                             ({"precision": "fp32", "attention": "sdpa"}, False),
                                             ({"precision": "fp32", "attention": "sdpa", "channel_norms": True}, True)])
def test_where_openvino_rewrites(monkeypatch, opts, rewritten):
    """By default in fp32 with the inlined function; asked for, also with the SDPA extension. fp32 outputs stay
    within 1e-5 of torch's."""
    pytest.importorskip("openvino")
    from diffit_port.runtimes import openvino_rt

    calls = []
    real = openvino_rt.per_channel_group_norms
    monkeypatch.setattr(openvino_rt, "per_channel_group_norms", lambda m: calls.append(real(m)))
    package = load_package(default_package_path())
    d = openvino_rt.create_openvino(package, **opts)
    assert calls == ([9] if rewritten else [])
    if opts["precision"] == "fp32":
        from diffit_port.runtimes import create_denoiser

        rng = np.random.default_rng(2)
        x, t, y = rng.standard_normal((2, 1, 32, 32), dtype=np.float32), np.full(2, 0.7, np.float32), np.arange(2)
        np.testing.assert_allclose(d(x, t, y), create_denoiser("torch", package)(x, t, y), atol=1e-5, rtol=0)


def test_onnx_cpu_rewrites_only_when_asked(monkeypatch):
    from diffit_port.runtimes import create_denoiser, onnx_rt

    calls = []
    real = onnx_rt.per_channel_group_norms
    monkeypatch.setattr(onnx_rt, "per_channel_group_norms", lambda m: calls.append(real(m)))
    package = load_package(default_package_path())
    create_denoiser("onnx-cpu", package)
    assert calls == []
    d = create_denoiser("onnx-cpu", package, channel_norms=True, streams=2)
    assert calls == [9]
    rng = np.random.default_rng(3)
    x, t, y = rng.standard_normal((3, 1, 32, 32), dtype=np.float32), np.full(3, 0.7, np.float32), np.arange(3)
    np.testing.assert_allclose(d(x, t, y), create_denoiser("torch", package)(x, t, y), atol=1e-5, rtol=0)
