"""GroupNorm from per-channel statistics: a load-time rewrite of the GroupNorms in a package graph for CPU plugins
that keep convolution outputs in a channels-last or blocked layout.

torch exports a GroupNorm as Reshape (N, G, -1) -> InstanceNormalization -> Reshape back -> Mul gamma -> Add beta.
The first Reshape needs the planar layout, so OpenVINO's CPU plugin converts every normalised activation from the
convolutions' layout and back (its Reorder nodes: 9.4 of 119.6 ms of a digits call on one thread). Here the same
normalisation reads the activation in whatever layout it is in: the per-channel means over H, W, their average over
each group, the centred activation, the group's mean square of it (two passes, as InstanceNormalization computes
it, so a large mean does not cancel the variance), and one scale and shift per channel. Only (N, C, 1, 1) tensors
are reshaped. docs/BENCHMARKS_CPU.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .onnx_edit import GraphIndex, NodeBuilder, has_subgraphs

P = "gn/"   # prefix of the names the rewrite adds


@dataclass(frozen=True)
class GroupNormNodes:
    """One GroupNorm as torch exports it: first Reshape -> norm (InstanceNormalization) -> back Reshape (to `shape`,
    the Shape node of the input, where only that Reshape reads it) -> mul (by the gamma initializer) -> add (beta);
    gamma and beta float32 (C,), `groups` G."""

    first: onnx.NodeProto
    norm: onnx.NodeProto
    back: onnx.NodeProto
    mul: onnx.NodeProto
    add: onnx.NodeProto
    shape: onnx.NodeProto | None
    gamma_name: str
    beta_name: str
    gamma: np.ndarray
    beta: np.ndarray
    groups: int
    eps: float

    @property
    def nodes(self) -> tuple[onnx.NodeProto, ...]:
        """The nodes a rewrite replaces (the Shape node too, which nothing else reads)."""
        return (self.first, self.norm, self.back, self.mul, self.add) + ((self.shape,) if self.shape else ())


def find_group_norms(graph: onnx.GraphProto) -> list[GroupNormNodes]:
    """The GroupNorms of `graph` in torch's export pattern, exactly (each intermediate read once, the
    InstanceNormalization's own scale 1 and bias 0, per-channel float32 gamma and beta); anything else is left out."""
    index = GraphIndex(graph)

    def only(name: str, op_type: str) -> onnx.NodeProto | None:
        node = index.only_reader(name)
        return node if node is not None and node.op_type == op_type else None

    def other_input(node: onnx.NodeProto, known: str) -> str:
        return next((i for i in node.input if i != known), "")

    found = []
    for norm in (n for n in graph.node if n.op_type == "InstanceNormalization"):
        first = index.producers.get(norm.input[0])
        back = only(norm.output[0], "Reshape")
        mul = back and only(back.output[0], "Mul")
        add = mul and only(mul.output[0], "Add")
        if first is None or first.op_type != "Reshape" or add is None or index.only_reader(first.output[0]) is None:
            continue
        gamma_name, beta_name = other_input(mul, back.output[0]), other_input(add, mul.output[0])
        scale, bias, gamma, beta = map(index.constant, (norm.input[1], norm.input[2], gamma_name, beta_name))
        if any(a is None for a in (scale, bias, gamma, beta)) or not (np.all(scale == 1) and np.all(bias == 0)):
            continue
        C = gamma.size
        if gamma.dtype != np.float32 or C % scale.size or not gamma.shape == beta.shape == (C, 1, 1):
            continue
        shape = index.producers.get(back.input[1])
        shape = shape if shape is not None and shape.op_type == "Shape" and index.only_reader(back.input[1]) else None
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        found.append(GroupNormNodes(first, norm, back, mul, add, shape, gamma_name, beta_name, gamma.reshape(-1),
                                    beta.reshape(-1), scale.size, eps))
    return found


def per_channel_group_norms(model: onnx.ModelProto) -> int:
    """IN PLACE: every GroupNorm of `find_group_norms` in `model`'s main graph computed from per-channel statistics
    (module docstring); the outputs agree with the original to float32 rounding. The initializers only the replaced
    nodes read are removed. Returns how many GroupNorms were rewritten."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    found = find_group_norms(g)
    replaced: dict[str, list[onnx.NodeProto]] = {}     # first output of a node -> the nodes in its place
    for k, gn in enumerate(found):
        b = NodeBuilder(g, f"{P}{k}/", nodes=[])
        x, C = gn.first.input[0], gn.gamma.size
        mean = _group_mean(b, _mean(b, x, [2, 3], opset), gn.groups, C, opset)
        centred = b.one("Sub", x, mean)
        var = _group_mean(b, _mean(b, b.one("Mul", centred, centred), [2, 3], opset), gn.groups, C, opset)
        std = b.one("Sqrt", b.one("Add", var, b.const(np.array(gn.eps, np.float32))))
        b.one("Add", b.one("Mul", centred, b.one("Div", gn.gamma_name, std)), gn.beta_name)
        b.nodes[-1].output[0] = gn.add.output[0]
        replaced.update({n.output[0]: [] for n in gn.nodes})
        replaced[gn.add.output[0]] = b.nodes
    if found:
        nodes = [new for n in g.node for new in (replaced.get(n.output[0], [n]) if n.output else [n])]
        del g.node[:]
        g.node.extend(nodes)
        if not has_subgraphs(g.node):    # (a subgraph may read an initializer that no node input shows)
            read = {i for n in g.node for i in n.input}
            kept = [i for i in g.initializer if i.name in read]
            del g.initializer[:]
            g.initializer.extend(kept)
    return len(found)


def _mean(b: NodeBuilder, x: str, axes: list[int], opset: int) -> str:
    """ReduceMean keeping dims, in the form of the graph's opset (axes an input from opset 18)."""
    if opset >= 18:
        return b.one("ReduceMean", x, b.const(np.array(axes, np.int64)), keepdims=1)
    return b.one("ReduceMean", x, axes=axes, keepdims=1)


def _group_mean(b: NodeBuilder, per_channel: str, groups: int, channels: int, opset: int) -> str:
    """(N, C, 1, 1): each channel's value replaced by the mean over its group (equal counts per channel)."""
    grouped = b.one("Reshape", per_channel, b.const(np.array([0, groups, -1], np.int64)))
    spread = b.one("Expand", _mean(b, grouped, [2], opset), b.const(np.array([1, 1, channels // groups], np.int64)))
    return b.one("Reshape", spread, b.const(np.array([0, channels, 1, 1], np.int64)))
