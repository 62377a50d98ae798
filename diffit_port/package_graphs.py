"""A package's ONNX graphs checked against its manifest without loading their weights: inputs and outputs (names,
dtypes, shapes), and every external-data location confined to the package and hashed, before a runtime reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .package import PackageError, inside_package
from .schema import SchemaError, check_relpath

_DTYPES = {1: "float32", 10: "float16", 7: "int64"}        # onnx.TensorProto elem types a package may use


def _load_structure(path: Path) -> Any:
    """The ModelProto without external weights (a graph whose weights live in .data files stays small)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors have no common base
        raise PackageError(f"{path} is not a readable ONNX graph ({type(e).__name__})") from None


def _value_info(v: Any) -> tuple[str, str, list[Any]]:
    t = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return v.name, _DTYPES.get(t.elem_type, f"elem_type {t.elem_type}"), dims


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers, Constant-node and subgraph tensors."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def _all_tensors(model: Any) -> Iterator[Any]:
    yield from _tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _node_tensors(node)


def check_external_data(root: Path, rel_graph: str, model: Any, entry: dict[str, Any], files: dict[str, str]) -> None:
    """Each external-data location of the graph: a plain relative path (no absolute path, no '..'), inside
    the package after resolving symlinks, a regular file listed in the graph's `external_data` and hashed in
    `files`, and the byte range within it."""
    import onnx

    graph_dir = Path(rel_graph).parent
    listed = set(entry.get("external_data", []))
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{rel_graph}: tensor {tensor.name!r} external data"
        try:
            loc = check_relpath(info.get("location"), where)
        except SchemaError as e:
            raise PackageError(f"package {root}: {e}") from None
        rel = (graph_dir / loc).as_posix()
        p = inside_package(root, rel)
        if not p.is_file():
            raise PackageError(f"package {root}: {where} {loc!r} is not a file in the package")
        if rel not in files or loc not in listed:
            raise PackageError(f"package {root}: {where} {loc!r} is not listed in the manifest (graph external_data "
                               "and files); refusing to read it")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise PackageError(f"package {root}: {where} has a non-integer offset or length") from None
        if offset < 0 or length < 0 or offset + length > p.stat().st_size:
            raise PackageError(f"package {root}: {where} reads bytes {offset}..{offset + length} of {loc!r}, which has "
                               f"{p.stat().st_size}")


def check_graph_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every graph named in the (schema-checked) manifest against the file itself."""
    for name, entry in manifest["graphs"].items():
        rel = entry["file"]
        path = inside_package(root, rel)
        if not path.is_file():
            raise PackageError(f"package {root}: graph {name!r} file {rel!r} is missing")
        model = _load_structure(path)
        for key, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            actual = [_value_info(v) for v in values]
            declared = [(t["name"], t["dtype"], list(t["shape"])) for t in entry[key]]
            if actual != declared:
                raise PackageError(f"package {root}: graph {rel} has {key} {actual}, the manifest declares {declared}")
        check_external_data(root, rel, model, entry, manifest["files"])
