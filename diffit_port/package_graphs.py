"""A package's ONNX graphs checked against its manifest without loading their weights: inputs and outputs (names,
dtypes, shapes), and every external-data location confined to the package and hashed, before a runtime reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .onnx_scan import Outline, ScanError, scan_model
from .package import PackageError, inside_package
from .schema import SchemaError, check_relpath

_DTYPES = {1: "float32", 10: "float16", 7: "int64"}        # onnx.TensorProto elem types a package may use


def _outline(path: Path) -> Outline:
    """The graph's I/O and external-data references, read without decoding any weight (diffit_port.onnx_scan)."""
    try:
        return scan_model(path)
    except (ScanError, OSError) as e:
        raise PackageError(f"{path} is not a readable ONNX graph ({e})") from None


def _value_info(v: Any) -> tuple[str, str, list[Any]]:
    t = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return v.name, _DTYPES.get(t.elem_type, f"elem_type {t.elem_type}"), dims


def check_external_data(root: Path, rel_graph: str, outline: Outline, entry: dict[str, Any],
                        files: dict[str, str]) -> None:
    """Each external-data location of the graph: a plain relative path (no absolute path, no '..'), inside
    the package after resolving symlinks, a regular file listed in the graph's `external_data` and hashed in
    `files`, and the byte range within it."""
    graph_dir = Path(rel_graph).parent
    listed = set(entry.get("external_data", []))
    for name, info in outline.external:
        where = f"{rel_graph}: tensor {name!r} external data"
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
        outline = _outline(path)
        for key, values in (("inputs", outline.inputs), ("outputs", outline.outputs)):
            actual = [_value_info(v) for v in values]
            declared = [(t["name"], t["dtype"], list(t["shape"])) for t in entry[key]]
            if actual != declared:
                raise PackageError(f"package {root}: graph {rel} has {key} {actual}, the manifest declares {declared}")
        check_external_data(root, rel, outline, entry, manifest["files"])
