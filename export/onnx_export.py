"""One GraphSpec -> one ONNX file at opset 17: torch.export-based exporter with TMSA routed to the
custom node, then the model-local function attached and the file normalised (IR 8, I/O types)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch

from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP, CUSTOM_OP_VERSION

from .errors import ExportError
from .graphs import BATCH, EXPORT_BATCH, GraphSpec, TensorSpec
from .tmsa_op import OPSET, custom_op_export, function_proto

# The TorchScript exporter writes IR 8 for opset 17; ONNX Runtime builds before 1.32 read at most IR 13
# and onnx 1.23 would otherwise stamp 14, the torch.export path 10.
IR_VERSION = 8
# Protobuf refuses messages of 2 GiB and more; keep weights external past this (room left for the graph).
MAX_INLINE_BYTES = 2**31 - 2**26

_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's informational logs and warnings for the duration of one export
    (the opset-18-then-convert notice is expected: the result is asserted at 17 afterwards)."""
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_graph(spec: GraphSpec, out_dir: Path) -> list[Path]:
    """Export `spec.module` to `out_dir / spec.file` (+ `<file>.data` when the weights pass 2 GiB);
    returns the files written. Raises ExportError when the exporter fails or misses opset 17."""
    path = out_dir / spec.file
    data = path.with_name(path.name + ".data")
    rng = np.random.default_rng(0)
    args = tuple(torch.from_numpy(a) for a in spec.sample(EXPORT_BATCH, rng).values())
    batch = torch.export.Dim(BATCH, min=1)
    try:
        with custom_op_export(), _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                spec.module, args, None, dynamo=True, opset_version=OPSET, verbose=False,
                input_names=[s.name for s in spec.inputs], output_names=[s.name for s in spec.outputs],
                dynamic_shapes=tuple({0: batch} for _ in spec.inputs))
            program.save(path, external_data=True)
        del program
    except Exception as e:          # the exporter raises many types; report them as one
        raise ExportError(f"exporting {spec.file} failed: {type(e).__name__}: {e}") from e

    external = data.exists() and data.stat().st_size >= MAX_INLINE_BYTES
    model = onnx.load(path, load_external_data=not external)
    finalize(model, spec)
    onnx.save(model, path)          # external tensors keep pointing at `<file>.data`, next to it
    if not external:
        data.unlink(missing_ok=True)
    return [path, data] if external else [path]


def finalize(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """In place: assert opset 17, set IR 8, attach the custom op's function, restore the I/O contract."""
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        raise ExportError(f"{spec.file}: the exporter wrote opset {opsets.get('ai.onnx')}, not {OPSET} "
                          "(its down-conversion from 18 failed)")
    unexpected = set(opsets) - {"ai.onnx", CUSTOM_DOMAIN}
    if unexpected:
        raise ExportError(f"{spec.file}: unexpected operator domains {sorted(unexpected)}")
    model.ir_version = IR_VERSION
    _strip_ir10_fields(model)

    del model.functions[:]
    if any(n.domain == CUSTOM_DOMAIN and n.op_type == CUSTOM_OP for n in model.graph.node):
        model.functions.append(function_proto(OPSET))
        del model.opset_import[:]
        model.opset_import.extend([onnx.helper.make_opsetid("", OPSET),
                                   onnx.helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OP_VERSION)])
    _restore_io(model.graph, spec)
    model.graph.name = spec.name


def _strip_ir10_fields(model: onnx.ModelProto) -> None:
    # metadata_props on nodes, values, tensors and graphs arrived with IR 10; the exporter fills
    # them with debug provenance (stack traces, rewrite-rule names) that an IR 8 file cannot carry.
    g = model.graph
    del g.metadata_props[:]
    for n in g.node:
        del n.metadata_props[:]
    for v in (*g.input, *g.output, *g.value_info):
        del v.metadata_props[:]
    for t in g.initializer:
        del t.metadata_props[:]


def _value_info(s: TensorSpec) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(s.name, _DTYPES[s.dtype], list(s.shape))


def _restore_io(graph: onnx.GraphProto, spec: GraphSpec) -> None:
    # Inputs the network ignores (y of an unconditional model) are dropped by the exporter; the
    # contract keeps them, as unused graph inputs. Types and shapes are written from the spec, so
    # every non-batch axis is a fixed number and the batch axis is named "batch" everywhere.
    have = {v.name for v in graph.input}
    outs = [v.name for v in graph.output]
    if outs != [s.name for s in spec.outputs]:
        raise ExportError(f"{spec.file}: exported outputs {outs}, expected {[s.name for s in spec.outputs]}")
    extra = have - {s.name for s in spec.inputs}
    if extra:
        raise ExportError(f"{spec.file}: unexpected graph inputs {sorted(extra)}")
    del graph.input[:]
    graph.input.extend(_value_info(s) for s in spec.inputs)
    del graph.output[:]
    graph.output.extend(_value_info(s) for s in spec.outputs)
