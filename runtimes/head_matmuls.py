"""q, k and v as per-head matrix products: a load-time rewrite of the attention function (com.diffit's
TimeTokenAttention body, as the exporter writes it) for CPU plugins that run a 5-D transpose slowly.

The exported body makes q, k and v of shape (B, heads, N, d) from one product: qkv = x w_qkv + time, reshaped to
(B, N, 3, heads, d), transposed to (3, B, heads, N, d) and gathered. OpenVINO's CPU plugin runs that transpose with
its reference kernel (with the graph's other transposes, 10.3 of 210 ms of a digits call at 16 rows on one thread).
Here each of q, k and v is x (B, 1, N, C) times its weight columns as (heads, C, d), a product that comes out in
(B, heads, N, d) directly, plus its time token (B, 1, C) as (B, heads, 1, d). The weight reshapes fold into
constants; only the small time token is transposed. The sums are the same products over C, so the values do not
change (docs/BENCHMARKS_CPU.md).
"""

from __future__ import annotations

import onnx
from onnx import helper

P = "hm/"                  # prefix of the names the rewrite adds
QKV_PERM = [2, 0, 3, 1, 4]  # (B, N, 3, heads, d) -> (3, B, heads, N, d)


def head_matmuls(model: onnx.ModelProto) -> int:
    """IN PLACE: rewrite each local function that makes q, k and v by the exporter's pattern (Add(MatMul(x, w_qkv),
    time) -> Reshape (0, 0, 3, heads, -1) -> Transpose QKV_PERM -> Gather 0, 1, 2); returns how many were rewritten
    (0 for a graph from another exporter, which is then left as it is)."""
    return sum(_rewrite(f) for f in model.functions)


def _rewrite(f: onnx.FunctionProto) -> bool:
    made = {o: nd for nd in f.node for o in nd.output}
    t5 = next((nd for nd in f.node if nd.op_type == "Transpose" and _perm(nd) == QKV_PERM), None)
    if t5 is None or t5.input[0] not in made:
        return False
    reshape = made[t5.input[0]]
    add = made.get(reshape.input[0])
    matmul = made.get(add.input[0]) if add is not None and add.op_type == "Add" else None
    shape = made.get(reshape.input[1])
    readers = [nd for nd in f.node if t5.output[0] in nd.input]
    gathers = {_index(made, nd): nd for nd in readers if nd.op_type == "Gather"}
    if (reshape.op_type != "Reshape" or matmul is None or matmul.op_type != "MatMul" or shape is None
            or shape.op_type != "Concat" or len(shape.input) != 3 or len(readers) != 3 or set(gathers) != {0, 1, 2}):
        return False
    x, w = matmul.input
    heads = shape.input[1]                                   # Concat((0, 0, 3), heads, (-1,))
    new = [_ints("zero", [0]), _ints("one", [1]), _ints("zz", [0, 0]), _ints("m1", [-1]),
           helper.make_node("Concat", [f"{P}zero", heads, f"{P}m1"], [f"{P}w_shape"], axis=0),    # (0, heads, -1)
           helper.make_node("Concat", [f"{P}zz", heads, f"{P}m1"], [f"{P}t_shape"], axis=0),      # (0, 0, heads, -1)
           helper.make_node("Split", [w], [f"{P}w_q", f"{P}w_k", f"{P}w_v"], axis=-1),
           helper.make_node("Split", [add.input[1]], [f"{P}t_q", f"{P}t_k", f"{P}t_v"], axis=-1),
           helper.make_node("Unsqueeze", [x, f"{P}one"], [f"{P}x4"])]                            # (B, 1, N, C)
    for i, part in enumerate("qkv"):
        n = lambda s: f"{P}{s}_{part}"  # noqa: E731
        new += [helper.make_node("Reshape", [n("w"), f"{P}w_shape"], [n("w3")]),                 # (C, heads, d)
                helper.make_node("Transpose", [n("w3")], [n("wh")], perm=[1, 0, 2]),             # (heads, C, d)
                helper.make_node("MatMul", [f"{P}x4", n("wh")], [n("xw")]),                      # (B, heads, N, d)
                helper.make_node("Reshape", [n("t"), f"{P}t_shape"], [n("t4")]),                 # (B, 1, heads, d)
                helper.make_node("Transpose", [n("t4")], [n("th")], perm=[0, 2, 1, 3]),          # (B, heads, 1, d)
                helper.make_node("Add", [n("xw"), n("th")], [gathers[i].output[0]])]
    gone = {id(nd) for nd in (reshape, *gathers.values())}
    kept = []
    for nd in f.node:   # the new nodes where the transpose was: after all it read, before all that read q, k, v
        kept.extend(new if nd is t5 else [] if id(nd) in gone else [nd])
    del f.node[:]
    f.node.extend(_live(kept, set(f.output)))
    return True


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose outputs nothing reads (the old product, shape and indices), in order."""
    need, live = set(outputs), []
    for nd in reversed(nodes):
        if any(o in need for o in nd.output):
            live.append(nd)
            need.update(i for i in nd.input if i)
    return live[::-1]


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _index(made: dict[str, onnx.NodeProto], gather: onnx.NodeProto) -> int | None:
    """The index of a Gather on axis 0 by a Constant(value_int=i), as the exporter writes it (None otherwise)."""
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    const = made.get(gather.input[1])
    if axis != 0 or const is None or const.op_type != "Constant" or const.attribute[0].name != "value_int":
        return None
    return int(const.attribute[0].i)


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [f"{P}{name}"], value_ints=values)
