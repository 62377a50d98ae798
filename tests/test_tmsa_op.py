"""The TimeTokenAttention op: ONNX function body vs NumPy reference vs the PyTorch op, and its export hooks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffit_port import attention
from diffit_port.export.tmsa_op import (INPUT_NAMES, OPSET, custom_op_export, export_symbolic, function_proto,
                                        single_node_model, tmsa_numpy)
from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP

# (B, N, C, Ct, heads): a 4x4 window with 4 heads; a single head over 4 tokens with Ct != C.
SHAPES = [(3, 16, 32, 24, 4), (1, 4, 8, 16, 1)]


def random_inputs(B: int, N: int, C: int, Ct: int, h: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((B, N, C)), "t_emb": rng.standard_normal((B, Ct)),
              "w_qkv": rng.standard_normal((C, 3 * C)) / np.sqrt(C),
              "w_time": rng.standard_normal((Ct, 3 * C)) / np.sqrt(Ct),
              "b_qkv": 0.1 * rng.standard_normal(3 * C), "rel_bias": rng.standard_normal((h, N, N))}
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def run_body(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("B,N,C,Ct,h", SHAPES)
def test_body_numpy_and_torch_agree(B, N, C, Ct, h):
    feeds = random_inputs(B, N, C, Ct, h)
    ref = tmsa_numpy(**feeds, num_heads=h)
    assert ref.shape == (B, N, C) and ref.dtype == np.float32
    body = run_body(single_node_model(h), feeds)
    args = [torch.from_numpy(feeds[n]) for n in INPUT_NAMES]
    sdpa = attention.time_token_attention(*args, h).numpy()
    eager = attention.time_token_attention(*args, h, reference=True).numpy()
    for got in (body, sdpa, eager):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_time_projection_of_keys_is_inert():
    # softmax is invariant to a per-query constant: the time term of k (x_t W_kt, one vector per row)
    # shifts every logit of a query by the same q.(x_t W_kt), so changing that block changes nothing.
    B, N, C, Ct, h = SHAPES[0]
    feeds = random_inputs(B, N, C, Ct, h)
    changed = dict(feeds, w_time=feeds["w_time"].copy(), b_qkv=feeds["b_qkv"].copy())
    changed["w_time"][:, C:2 * C] += 1.0
    changed["b_qkv"][C:2 * C] -= 3.0
    np.testing.assert_allclose(tmsa_numpy(**changed, num_heads=h), tmsa_numpy(**feeds, num_heads=h), atol=1e-5)


def test_body_type_checks_and_runs_in_float16():
    B, N, C, Ct, h = SHAPES[0]
    model = single_node_model(h, dtype=onnx.TensorProto.FLOAT16)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    feeds = random_inputs(B, N, C, Ct, h)
    got = run_body(model, {k: v.astype(np.float16) for k, v in feeds.items()})
    assert got.dtype == np.float16
    # float16 inputs (rounded at 4.9e-4 relative) through two matmuls and a softmax
    np.testing.assert_allclose(got.astype(np.float32), tmsa_numpy(**feeds, num_heads=h), atol=2e-2, rtol=0)


def test_function_proto_is_plain_opset17():
    fp = function_proto()
    assert (fp.domain, fp.name) == (CUSTOM_DOMAIN, CUSTOM_OP)
    assert list(fp.input) == list(INPUT_NAMES) and list(fp.attribute) == ["num_heads"]
    assert {(i.domain, i.version) for i in fp.opset_import} == {("", OPSET)}
    ops = {n.op_type for n in fp.node}
    assert {n.domain for n in fp.node} == {""}
    assert "Split" not in ops and "Cast" not in ops and "CastLike" in ops      # valid at 17 and 18, any float type
    model = single_node_model(2)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert [d.dim_param for d in inferred.graph.output[0].type.tensor_type.shape.dim] == ["B", "N", "C"]


def test_context_manager_routes_and_restores_after_error():
    original = attention.time_token_attention
    with custom_op_export():
        assert attention.time_token_attention is export_symbolic
    assert attention.time_token_attention is original
    with pytest.raises(RuntimeError, match="boom"):
        with custom_op_export():
            raise RuntimeError("boom")
    assert attention.time_token_attention is original


def test_symbolic_is_the_eager_op_outside_an_export():
    B, N, C, Ct, h = SHAPES[0]
    args = [torch.from_numpy(v) for v in random_inputs(B, N, C, Ct, h).values()]
    torch.testing.assert_close(export_symbolic(*args, h), attention.time_token_attention(*args, h))


@pytest.mark.filterwarnings("ignore")          # the TorchScript exporter's deprecation notices
@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torchscript"])
def test_both_exporters_emit_one_node_per_tmsa(dynamo, tmp_path):
    torch.manual_seed(0)
    tmsa = attention.TMSA(dim=16, time_dim=8, num_heads=2, grid=2).eval()

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = tmsa, attention.TMSA(16, 8, 2, 2)

        def forward(self, x, t_emb):
            return self.b(self.a(x, t_emb), t_emb)

    x, t_emb, path = torch.randn(2, 4, 16), torch.randn(2, 8), tmp_path / "two.onnx"
    with custom_op_export(), torch.no_grad():
        if dynamo:
            torch.onnx.export(Two().eval(), (x, t_emb), path, dynamo=True, opset_version=OPSET, verbose=False,
                              external_data=False)
        else:
            torch.onnx.export(Two().eval(), (x, t_emb), path, dynamo=False, opset_version=OPSET,
                              custom_opsets={CUSTOM_DOMAIN: 1})
    model = onnx.load(path)
    nodes = [n for n in model.graph.node if n.domain == CUSTOM_DOMAIN]
    assert [n.op_type for n in nodes] == [CUSTOM_OP, CUSTOM_OP]
    assert [onnx.helper.get_attribute_value(n.attribute[0]) for n in nodes] == [2, 2]
    assert len(nodes[0].input) == len(INPUT_NAMES)

