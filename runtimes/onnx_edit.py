"""Small tools for the load-time graph rewrites (ort_folds, loop_graph, group_norm): lookups over a graph's
nodes and a builder of new nodes with unique names."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Who reads and who writes each tensor of a graph, its initializers by name (converted to arrays only when
    asked: a large model's weights are not copied), the nodes' positions and the graph outputs."""

    def __init__(self, graph: onnx.GraphProto):
        self.inits = {t.name: t for t in graph.initializer}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.producers = {o: n for n in graph.node for o in n.output}
        self.position = {id(n): i for i, n in enumerate(graph.node)}
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node that reads `name`, if exactly one does and it is not a graph output."""
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None


class NodeBuilder:
    """Appends nodes named `prefix`<what>_<n> to `nodes` (the graph's own list unless another is given); `const`
    adds small initializers to the graph."""

    def __init__(self, graph: onnx.GraphProto, prefix: str, nodes: list[onnx.NodeProto] | None = None):
        self.graph, self.prefix, self.ids = graph, prefix, itertools.count()
        self.nodes = graph.node if nodes is None else nodes

    def name(self, what: str) -> str:
        return f"{self.prefix}{what}_{next(self.ids)}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs

    def one(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.op(op_type, list(inputs), **attrs)[0]

    def const(self, value: np.ndarray, what: str = "const") -> str:
        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def has_subgraphs(nodes: Iterable[onnx.NodeProto]) -> bool:
    """Whether any node carries a subgraph (If, Loop, Scan), whose reads of outer names no node input shows."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute)
