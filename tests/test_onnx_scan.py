"""diffit_port.onnx_scan against onnx's own decoding: graph I/O and every external-data reference (initializers,
sparse initializers, Constant nodes, subgraphs, functions), also on the package graphs; weights are not read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from diffit_port.onnx_scan import ScanError, scan_model
from diffit_port.package import default_package_path
from runtime_helpers import package_path


def onnx_external(model: onnx.ModelProto) -> list[tuple[str, dict[str, str]]]:
    """The reference: every EXTERNAL tensor, walked over the decoded ModelProto in the scanner's order."""
    def graph(g) -> Iterator[Any]:
        for node in g.node:
            yield from node_tensors(node)
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices

    def node_tensors(node) -> Iterator[Any]:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from graph(attr.g)
            yield from attr.tensors
            for g in attr.graphs:
                yield from graph(g)
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices

    tensors = list(graph(model.graph)) + [t for fn in model.functions for n in fn.node for t in node_tensors(n)]
    return sorted((t.name, {e.key: e.value for e in t.external_data}) for t in tensors
                  if t.data_location == TensorProto.EXTERNAL)


def external(name: str, location: str, offset: int = 0) -> TensorProto:
    t = numpy_helper.from_array(np.zeros(3, np.float32), name)
    set_external_data(t, location=location, offset=offset, length=12)
    t.ClearField("raw_data")
    return t


def every_place_model() -> onnx.ModelProto:
    """External tensors in each place a TensorProto can sit, next to a large embedded initializer."""
    big = numpy_helper.from_array(np.arange(2_000_000, dtype=np.float32), "big")
    then_g = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [3])],
                               initializer=[external("sub_w", "sub.data")])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["r"], value=external("else_c", "../up.data"))],
                               "else", [], [helper.make_tensor_value_info("r", TensorProto.FLOAT, [3])])
    sparse = helper.make_sparse_tensor(external("sp_values", "sparse.data"),
                                       numpy_helper.from_array(np.array([0, 1, 2], np.int64), "sp_idx"), [3])
    nodes = [helper.make_node("If", ["cond"], ["a"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Constant", [], ["c"], value=external("const", "/abs/const.data", 8)),
             helper.make_node("Fn", ["a"], ["out"], domain="local")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])],
                              initializer=[big, external("w", "w.data", 4)], sparse_initializer=[sparse])
    fn = helper.make_function("local", "Fn", ["i"], ["o"],
                              [helper.make_node("Constant", [], ["k"], value=external("fn_c", "fn.data")),
                               helper.make_node("Add", ["i", "k"], ["o"])], [helper.make_opsetid("", 17)])
    return helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("local", 1)])


def test_every_place_of_an_external_tensor(tmp_path):
    model = every_place_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))                       # saved as is: the big initializer stays embedded
    out = scan_model(path)
    want = onnx_external(onnx.load(str(path), load_external_data=False))
    assert len(want) == 6 and sorted(out.external) == want
    assert [v.name for v in out.inputs] == ["cond", "x"] and [v.name for v in out.outputs] == ["out"]
    assert out.inputs[1] == model.graph.input[1]


@pytest.mark.parametrize("which", ["tiny", "tiny-latent", "digits"])
def test_package_graphs_match_onnx(which, tmp_path, tmp_path_factory):
    root = default_package_path() if which == "digits" else package_path(which, tmp_path_factory)
    for path in sorted(Path(root).glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        out = scan_model(path)
        assert list(out.inputs) == list(model.graph.input) and list(out.outputs) == list(model.graph.output)
        assert out.external == []
        # The same graph with every weight moved to an external file, as packages past 2 GB are written.
        ext = tmp_path / f"{which}-{path.name}"
        onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{ext.name}.data", size_threshold=0)
        want = onnx_external(onnx.load(str(ext), load_external_data=False))
        assert len(want) > 10 and sorted(scan_model(ext).external) == want


def test_damaged_files_are_scan_errors(tmp_path):
    data = every_place_model().SerializeToString()
    cut_fixed64 = data + bytes([(30 << 3) | 1]) + b"\0\0\0"      # a field 30 of 8 bytes with only 3 left
    for name, content in (("empty", b""), ("half", data[: len(data) // 2]), ("junk", b"\xff" * 64),
                          ("text", b"hello world, not a model"), ("cut-fixed64", cut_fixed64)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ScanError):
            scan_model(tmp_path / name)
