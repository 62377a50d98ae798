"""q, k and v as per-head products (runtimes/head_matmuls.py): where the rewrite applies and what it leaves equal.
That openvino's default fp32 graph, which carries it, matches torch is test_runtimes.test_step_parity_cpu."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from runtime_helpers import step_inputs

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes.base import graph_feeds
from diffit_port.runtimes.head_matmuls import QKV_PERM, head_matmuls


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the graph as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _qkv_transposes(model: onnx.ModelProto) -> int:
    return sum(nd.op_type == "Transpose" and list(nd.attribute[0].ints) == QKV_PERM
               for f in model.functions for nd in f.node)


@pytest.mark.parametrize("kind", ["shipped", "tiny", "tiny-latent"])
def test_rewrite_keeps_the_outputs(packages, kind):  # noqa: F811
    """The image-space (windowed) and latent attention functions lose their 5-D transpose and compute the same."""
    package = load_package(default_package_path() if kind == "shipped" else packages(kind))
    shipped = onnx.load(str(package.graph_path()))
    model = onnx.load(str(package.graph_path()))
    assert _qkv_transposes(model) == 1
    assert head_matmuls(model) == 1
    onnx.checker.check_model(model)
    assert _qkv_transposes(model) == 0
    assert not any(nd.op_type == "Gather" for f in model.functions for nd in f.node)
    inputs = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    guidance = np.full(3, 2.0, np.float32) if "guidance" in inputs else None
    feeds = graph_feeds(inputs, *step_inputs(package), guidance)
    np.testing.assert_allclose(_run(model, feeds), _run(shipped, feeds), atol=1e-5, rtol=0)


def test_other_graphs_are_left_alone():
    """A function without the exporter's pattern (here: the heads gathered in another order) is not touched."""
    model = onnx.load(str(load_package(default_package_path()).graph_path()))
    f = model.functions[0]
    gather = next(nd for nd in f.node if nd.op_type == "Gather")
    gather.input[0] = gather.input[0] + "_elsewhere"
    before = f.SerializeToString()
    assert head_matmuls(model) == 0
    assert f.SerializeToString() == before


@pytest.mark.parametrize("opts, rewritten", [({"precision": "fp32"}, True), ({"precision": "bf16"}, False),
                                             ({"precision": "fp32", "head_matmuls": False}, False),
                                             ({"precision": "fp32", "attention": "sdpa"}, False)])
def test_where_openvino_rewrites(monkeypatch, opts, rewritten):
    """By default in fp32 with the inlined function, as the GroupNorm rewrite; never with the SDPA extension."""
    pytest.importorskip("openvino")
    from diffit_port.runtimes import openvino_rt

    calls = []
    real = openvino_rt.rewrite_head_matmuls
    monkeypatch.setattr(openvino_rt, "rewrite_head_matmuls", lambda m: calls.append(real(m)))
    openvino_rt.prepare_openvino(load_package(default_package_path()), **opts)
    assert calls == ([1] if rewritten else [])


def test_sdpa_refuses_the_rewrite():
    pytest.importorskip("openvino")
    from diffit_port.runtimes import openvino_rt

    with pytest.raises(ValueError, match="head_matmuls needs attention='inline'"):
        openvino_rt.prepare_openvino(load_package(default_package_path()), attention="sdpa", head_matmuls=True)
