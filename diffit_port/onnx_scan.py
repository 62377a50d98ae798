"""An ONNX file's graph inputs, outputs and external-data references read from its protobuf wire format, without
decoding any weight: an embedded initializer of a gigabyte is stepped over, not read (the file is memory-mapped).

Field numbers are onnx.proto's (ModelProto.graph = 7, GraphProto.input = 11, TensorProto.data_location = 14, ...).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

EXTERNAL = 1                                  # TensorProto.DataLocation.EXTERNAL


class ScanError(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass
class Outline:
    """What a package check needs of a model: its graph's I/O (onnx ValueInfoProto) and every tensor that keeps
    its data in an external file, as (tensor name, {external_data key: value})."""

    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    external: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def _varint(buf: Any, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ScanError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of each field in buf[start:end]: a varint's value in a (b = 0), a
    length-delimited field's byte range as [a, b); fixed-width fields are skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield num, wire, value, 0
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise ScanError("a field runs past the end of its message")
            yield num, wire, i, i + n
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ScanError(f"unsupported protobuf wire type {wire}")
    if i != end:
        raise ScanError("a message ends inside a field")


def _text(buf: Any, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _tensor(buf: Any, a: int, b: int, out: Outline) -> None:
    """TensorProto: name 8, external_data 13 (key 1, value 2), data_location 14; raw data is skipped."""
    name, location, entries = "", 0, {}
    for num, wire, x, y in _fields(buf, a, b):
        if num == 8 and wire == 2:
            name = _text(buf, x, y)
        elif num == 14 and wire == 0:
            location = x
        elif num == 13 and wire == 2:
            kv = {n: _text(buf, p, q) for n, w, p, q in _fields(buf, x, y) if w == 2}
            entries[kv.get(1, "")] = kv.get(2, "")
    if location == EXTERNAL:
        out.external.append((name, entries))


def _sparse(buf: Any, a: int, b: int, out: Outline) -> None:
    for num, wire, x, y in _fields(buf, a, b):           # SparseTensorProto: values 1, indices 2
        if num in (1, 2) and wire == 2:
            _tensor(buf, x, y, out)


def _node(buf: Any, a: int, b: int, out: Outline) -> None:
    for num, wire, x, y in _fields(buf, a, b):           # NodeProto.attribute 5
        if num == 5 and wire == 2:
            for n, w, p, q in _fields(buf, x, y):        # AttributeProto: t 5, g 6, tensors 10, graphs 11, sparse 22/23
                if w != 2:
                    continue
                if n in (5, 10):
                    _tensor(buf, p, q, out)
                elif n in (6, 11):
                    _graph(buf, p, q, out, top=False)
                elif n in (22, 23):
                    _sparse(buf, p, q, out)


def _graph(buf: Any, a: int, b: int, out: Outline, top: bool) -> None:
    """GraphProto: node 1, initializer 5, input 11, output 12, sparse_initializer 15."""
    from onnx import ValueInfoProto

    for num, wire, x, y in _fields(buf, a, b):
        if wire != 2:
            continue
        if num == 1:
            _node(buf, x, y, out)
        elif num == 5:
            _tensor(buf, x, y, out)
        elif num == 15:
            _sparse(buf, x, y, out)
        elif top and num in (11, 12):
            (out.inputs if num == 11 else out.outputs).append(ValueInfoProto.FromString(bytes(buf[x:y])))


def scan_model(path: str | Path) -> Outline:
    """The Outline of the ModelProto in `path` (graph 7, functions 25 whose nodes are field 7). Raises ScanError
    for bytes that are not a ModelProto, OSError for a file that cannot be read."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ScanError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out, graphs = Outline(), 0
            try:
                for num, wire, x, y in _fields(buf, 0, len(buf)):
                    if num == 7 and wire == 2:
                        _graph(buf, x, y, out, top=True)
                        graphs += 1
                    elif num == 25 and wire == 2:
                        for n, w, p, q in _fields(buf, x, y):
                            if n == 7 and w == 2:
                                _node(buf, p, q, out)
            except RecursionError:
                raise ScanError("subgraphs nested too deeply") from None
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError on a damaged ValueInfoProto
                if isinstance(e, ScanError):
                    raise
                raise ScanError(f"a graph input or output does not decode ({type(e).__name__})") from None
            if graphs != 1:
                raise ScanError(f"a model has one graph, this file has {graphs}")
            return out
