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

import collections
import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

P = "gn/"   # prefix of the names the rewrite adds


class _Nodes:
    """New nodes and small initializers of one rewrite, with unique names."""

    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph, self.opset, self.ids, self.nodes = graph, opset, itertools.count(), []

    def const(self, value: np.ndarray) -> str:
        name = f"{P}c{next(self.ids)}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"{P}{op_type.lower()}{next(self.ids)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{out}/{op_type}", **attrs))
        return out

    def mean(self, x: str, axes: list[int]) -> str:
        """ReduceMean keeping dims, in the form of the graph's opset (axes an input from opset 18)."""
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const(np.array(axes, np.int64)), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)

    def group_mean(self, per_channel: str, groups: int, channels: int) -> str:
        """(N, C, 1, 1): each channel's value replaced by the mean over its group (equal counts per channel)."""
        grouped = self.op("Reshape", per_channel, self.const(np.array([0, groups, -1], np.int64)))
        width = self.const(np.array([1, 1, channels // groups], np.int64))
        spread = self.op("Expand", self.mean(grouped, [2]), width)
        return self.op("Reshape", spread, self.const(np.array([0, channels, 1, 1], np.int64)))


@dataclass(frozen=True)
class GroupNormNodes:
    """One GroupNorm as torch exports it: first Reshape -> norm (InstanceNormalization) -> back Reshape -> mul
    (by gamma) -> add (beta); gamma and beta float32 (C,), `groups` G."""

    first: onnx.NodeProto
    norm: onnx.NodeProto
    back: onnx.NodeProto
    mul: onnx.NodeProto
    add: onnx.NodeProto
    gamma: np.ndarray
    beta: np.ndarray
    groups: int
    eps: float

    @property
    def nodes(self) -> tuple[onnx.NodeProto, ...]:
        return self.first, self.norm, self.back, self.mul, self.add


def find_group_norms(graph: onnx.GraphProto) -> list[GroupNormNodes]:
    """The GroupNorms of `graph` in torch's export pattern, exactly (each intermediate read once, the
    InstanceNormalization's own scale 1 and bias 0, per-channel float32 gamma and beta); anything else is left out."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            users[i].append(n)

    def only_reader(name: str, op_type: str) -> onnx.NodeProto | None:
        readers = users[name]
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    found = []
    for norm in (n for n in graph.node if n.op_type == "InstanceNormalization"):
        first = producer.get(norm.input[0])
        back = only_reader(norm.output[0], "Reshape")
        mul = back and only_reader(back.output[0], "Mul")
        add = mul and only_reader(mul.output[0], "Add")
        if first is None or first.op_type != "Reshape" or add is None or len(users[first.output[0]]) != 1:
            continue
        scale, bias = inits.get(norm.input[1]), inits.get(norm.input[2])
        gamma = inits.get(next((i for i in mul.input if i != back.output[0]), ""))
        beta = inits.get(next((i for i in add.input if i != mul.output[0]), ""))
        if any(a is None for a in (scale, bias, gamma, beta)) or not (np.all(scale == 1) and np.all(bias == 0)):
            continue
        C = gamma.size
        if gamma.dtype != np.float32 or C % scale.size or not gamma.shape == beta.shape == (C, 1, 1):
            continue
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        found.append(GroupNormNodes(first, norm, back, mul, add, gamma.reshape(-1), beta.reshape(-1), scale.size, eps))
    return found


def per_channel_group_norms(model: onnx.ModelProto) -> int:
    """IN PLACE: every GroupNorm of `find_group_norms` in `model`'s main graph computed from per-channel statistics
    (module docstring); the outputs agree with the original to float32 rounding. Nodes and initializers left unused
    are removed. Returns how many GroupNorms were rewritten."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    b = _Nodes(g, opset)
    replaced: dict[str, list[onnx.NodeProto]] = {}     # first output of a node -> the nodes in its place
    for gn in find_group_norms(g):
        b.nodes = []
        x, C = gn.first.input[0], gn.gamma.size
        mean = b.group_mean(b.mean(x, [2, 3]), gn.groups, C)
        centred = b.op("Sub", x, mean)
        var = b.group_mean(b.mean(b.op("Mul", centred, centred), [2, 3]), gn.groups, C)
        std = b.op("Sqrt", b.op("Add", var, b.const(np.array(gn.eps, np.float32))))
        scale = b.op("Div", b.const(gn.gamma.reshape(C, 1, 1)), std)
        b.op("Add", b.op("Mul", centred, scale), b.const(gn.beta.reshape(C, 1, 1)), out=gn.add.output[0])
        replaced.update({n.output[0]: [] for n in gn.nodes})
        replaced[gn.add.output[0]] = b.nodes
    if replaced:
        nodes = [new for n in g.node for new in (replaced.get(n.output[0], [n]) if n.output else [n])]
        del g.node[:]
        if _has_subgraphs(nodes):    # a subgraph may read names that no node input shows: nothing is removed
            g.node.extend(nodes)
        else:
            g.node.extend(_live(nodes, {o.name for o in g.output}))
            read = {i for n in g.node for i in n.input}
            for init in [i for i in g.initializer if i.name not in read]:
                g.initializer.remove(init)
    return sum(1 for v in replaced.values() if v)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose outputs nothing reads (the Shape nodes the removed Reshapes read)."""
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _has_subgraphs(nodes: list[onnx.NodeProto]) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute)
