"""The time-token attention op (TMSA, paper Eqs. 3-6) as a custom ONNX node: NumPy reference,
export-time symbolic, the model-local function body, and the context manager that routes
TMSA to the node for the duration of one export."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import onnx
import torch
from onnxscript import FLOAT, script
from onnxscript import opset17 as op
from onnxscript.values import Opset

from diffit_port import attention
from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP, CUSTOM_OP_VERSION
from diffit_port.schema import OPSET  # noqa: F401 - the only standard opset a package is written at

INPUT_NAMES = ("x", "t_emb", "w_qkv", "w_time", "b_qkv", "rel_bias")

_eager = attention.time_token_attention     # the PyTorch reference, captured before any patching


def tmsa_numpy(x: np.ndarray, t_emb: np.ndarray, w_qkv: np.ndarray, w_time: np.ndarray, b_qkv: np.ndarray,
               rel_bias: np.ndarray, num_heads: int) -> np.ndarray:
    """NumPy reference of the op, computed in float64 and returned in the dtype of `x`.

    x (B, N, C), t_emb (B, Ct), w_qkv (C, 3C), w_time (Ct, 3C), b_qkv (3C,), rel_bias (h, N, N)
    -> (B, N, C) = concat_heads(softmax(q k^T / sqrt(C/h) + rel_bias) v).
    """
    f = lambda a: np.asarray(a, dtype=np.float64)                                  # noqa: E731
    B, N, C = x.shape
    d = C // num_heads
    qkv = f(x) @ f(w_qkv) + (f(t_emb) @ f(w_time) + f(b_qkv))[:, None, :]        # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).transpose(2, 0, 3, 1, 4)       # 3 x (B, h, N, d)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + f(rel_bias)           # (B, h, N, N)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, N, C).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Export-time symbolic: one custom node per call
# --------------------------------------------------------------------------------------------

class _TimeTokenAttentionFn(torch.autograd.Function):
    """TorchScript-exporter path: `symbolic` emits the node while tracing."""

    @staticmethod
    def forward(ctx, x, t_emb, w_qkv, w_time, b_qkv, rel_bias, num_heads):
        return _eager(x, t_emb, w_qkv, w_time, b_qkv, rel_bias, num_heads, reference=True)

    @staticmethod
    def symbolic(g, x, t_emb, w_qkv, w_time, b_qkv, rel_bias, num_heads):
        out = g.op(f"{CUSTOM_DOMAIN}::{CUSTOM_OP}", x, t_emb, w_qkv, w_time, b_qkv, rel_bias,
                   num_heads_i=num_heads)
        out.setType(x.type())
        return out


def export_symbolic(x: torch.Tensor, t_emb: torch.Tensor, w_qkv: torch.Tensor, w_time: torch.Tensor,
                    b_qkv: torch.Tensor, rel_bias: torch.Tensor, num_heads: int,
                    reference: bool = False) -> torch.Tensor:
    """Drop-in for `diffit_port.attention.time_token_attention` that becomes one custom node in
    an ONNX export (either exporter) and stays the eager op everywhere else."""
    if not torch.onnx.is_in_onnx_export():
        # torch.onnx.ops.symbolic returns zeros in eager mode: never let it run outside an export.
        return _eager(x, t_emb, w_qkv, w_time, b_qkv, rel_bias, num_heads, reference)
    if torch.jit.is_tracing():
        return _TimeTokenAttentionFn.apply(x, t_emb, w_qkv, w_time, b_qkv, rel_bias, num_heads)
    return torch.onnx.ops.symbolic(f"{CUSTOM_DOMAIN}::{CUSTOM_OP}", (x, t_emb, w_qkv, w_time, b_qkv, rel_bias),
                                   {"num_heads": int(num_heads)}, dtype=x.dtype, shape=x.shape,
                                   version=CUSTOM_OP_VERSION)


@contextlib.contextmanager
def custom_op_export() -> Iterator[None]:
    """Route every TMSA call to `export_symbolic` inside the block; the original is restored on
    exit, also when the export raises."""
    original = attention.time_token_attention
    attention.time_token_attention = export_symbolic
    try:
        yield
    finally:
        attention.time_token_attention = original


# --------------------------------------------------------------------------------------------
# The function body: standard opset-17 ops, valid for float32 and float16 inputs
# --------------------------------------------------------------------------------------------

_domain = Opset(CUSTOM_DOMAIN, CUSTOM_OP_VERSION)


@script(_domain, default_opset=op)
def TimeTokenAttention(x: FLOAT, t_emb: FLOAT, w_qkv: FLOAT, w_time: FLOAT, b_qkv: FLOAT, rel_bias: FLOAT,
                       num_heads: int) -> FLOAT:
    # The FLOAT annotations only name the outputs for onnxscript; a model-local function carries
    # no type constraints, so the same body runs on float16 (dtype-dependent constants use CastLike).
    time = op.Unsqueeze(op.Add(op.MatMul(t_emb, w_time), b_qkv), op.Constant(value_ints=[1]))   # (B, 1, 3C)
    qkv = op.Add(op.MatMul(x, w_qkv), time)                                                     # (B, N, 3C)
    heads = op.Reshape(op.Constant(value_int=num_heads), op.Constant(value_ints=[1]))
    shape = op.Concat(op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0)
    qkv5 = op.Transpose(op.Reshape(qkv, shape), perm=[2, 0, 3, 1, 4])                          # (3, B, h, N, d)
    q = op.Gather(qkv5, op.Constant(value_int=0), axis=0)                                       # (B, h, N, d)
    k = op.Gather(qkv5, op.Constant(value_int=1), axis=0)
    v = op.Gather(qkv5, op.Constant(value_int=2), axis=0)
    # 1/sqrt(d) applied to q before the product: fewer multiplies when N > d, and no float16 overflow of q.k
    scale = op.Reciprocal(op.Sqrt(op.CastLike(op.Shape(q, start=3), x)))                        # (1,)
    logits = op.Add(op.MatMul(op.Mul(q, scale), op.Transpose(k, perm=[0, 1, 3, 2])), rel_bias)  # (B, h, N, N)
    out = op.MatMul(op.Softmax(logits, axis=-1), v)                                             # (B, h, N, d)
    return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))  # (B, N, C)


def function_proto(opset: int = OPSET) -> onnx.FunctionProto:
    """The model-local FunctionProto of the node; its standard-domain import equals the model's."""
    fp = TimeTokenAttention.to_function_proto()
    del fp.opset_import[:]
    fp.opset_import.append(onnx.helper.make_opsetid("", opset))
    return fp


def single_node_model(num_heads: int, dtype: int = onnx.TensorProto.FLOAT, opset: int = OPSET) -> onnx.ModelProto:
    """A model holding one custom node and its function: used to test the body on its own."""
    dims = {"x": ["B", "N", "C"], "t_emb": ["B", "Ct"], "w_qkv": ["C", "C3"], "w_time": ["Ct", "C3"],
            "b_qkv": ["C3"], "rel_bias": ["h", "N", "N"]}
    inputs = [onnx.helper.make_tensor_value_info(n, dtype, dims[n]) for n in INPUT_NAMES]
    node = onnx.helper.make_node(CUSTOM_OP, list(INPUT_NAMES), ["out"], domain=CUSTOM_DOMAIN, num_heads=num_heads)
    graph = onnx.helper.make_graph([node], "tmsa", inputs,
                                   [onnx.helper.make_tensor_value_info("out", dtype, ["B", "N", "C"])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset),
                                                         onnx.helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OP_VERSION)],
                                   functions=[function_proto(opset)], ir_version=8)
    return model
