"""Checks on a written graph, in order: ONNX checker with strict shape inference, the I/O contract and
the custom nodes, then values (ONNX Runtime CPU vs the float32 PyTorch model at two batch sizes).
Every miss raises ExportValidationError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP

from .errors import ExportValidationError
from .graphs import PARITY_BATCHES, GraphSpec, TensorSpec
from .onnx_export import IR_VERSION
from .tmsa_op import OPSET

_ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16"}


def check_graph(spec: GraphSpec, path: Path) -> onnx.ModelProto:
    """Structural checks of `path`; returns the model as read (weights not loaded)."""
    try:
        # By path (works past 2 GiB); full_check adds strict, type-checked shape inference.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportValidationError(f"{spec.file}: ONNX checker: {e}") from None
    model = onnx.load(str(path), load_external_data=False)

    opsets = {imp.domain: imp.version for imp in model.opset_import}
    if opsets.get("") != OPSET or model.ir_version != IR_VERSION:
        raise ExportValidationError(f"{spec.file}: opset {opsets.get('')} / IR {model.ir_version}, "
                                    f"expected {OPSET} / {IR_VERSION}")
    custom = [n for n in model.graph.node if n.domain == CUSTOM_DOMAIN]
    if len(custom) != spec.custom_nodes or any(n.op_type != CUSTOM_OP for n in custom):
        raise ExportValidationError(f"{spec.file}: {len(custom)} {CUSTOM_DOMAIN} nodes, expected "
                                    f"{spec.custom_nodes} {CUSTOM_OP} (one per TMSA layer)")
    if custom and not any(f.domain == CUSTOM_DOMAIN and f.name == CUSTOM_OP for f in model.functions):
        raise ExportValidationError(f"{spec.file}: the {CUSTOM_OP} function is not attached")
    other = {n.domain for n in model.graph.node} - {"", CUSTOM_DOMAIN}
    if other:
        raise ExportValidationError(f"{spec.file}: nodes in unexpected domains {sorted(other)}")
    _check_io(spec, "input", model.graph.input, spec.inputs)
    _check_io(spec, "output", model.graph.output, spec.outputs)
    return model


def _dims(v: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in v.type.tensor_type.shape.dim]


def _check_io(spec: GraphSpec, kind: str, values, expected: tuple[TensorSpec, ...]) -> None:
    got = [(v.name, _ELEM.get(v.type.tensor_type.elem_type, "?"), _dims(v)) for v in values]
    want = [(s.name, s.dtype, list(s.shape)) for s in expected]
    if got != want:
        raise ExportValidationError(f"{spec.file}: {kind}s {got}, expected {want}")


def _session(path: Path):
    import onnxruntime as ort

    from diffit_port.runtimes.onnx_rt import session_options

    return ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])


def measure_parity(spec: GraphSpec, path: Path, batches: tuple[int, ...] = PARITY_BATCHES,
                   seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime CPU (ORT_ENABLE_ALL; the custom node runs as its function) vs `spec.reference`
    in float32 on random inputs. Returns the manifest's parity entry; raises on a tolerance miss."""
    import onnxruntime as ort

    sess = _session(path)
    names = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if names != ([s.name for s in spec.inputs], [s.name for s in spec.outputs]):
        raise ExportValidationError(f"{spec.file}: onnxruntime sees inputs/outputs {names}")
    rng = np.random.default_rng(seed)
    max_abs = rel_l2 = 0.0
    for b in batches:
        feeds = spec.sample(b, rng)
        (got,) = sess.run(None, feeds)
        with torch.no_grad():
            ref = spec.reference(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        want_shape = tuple(b if d == "batch" else d for d in spec.outputs[0].shape)
        if got.shape != want_shape or got.dtype != np.float32:
            raise ExportValidationError(f"{spec.file}: batch {b} gave {got.dtype}{got.shape}, "
                                        f"expected float32{want_shape}")
        if not np.isfinite(got).all():
            raise ExportValidationError(f"{spec.file}: non-finite values at batch {b}")
        diff = got.astype(np.float64) - ref
        max_abs = max(max_abs, float(np.abs(diff).max()))
        rel_l2 = max(rel_l2, float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)))
    del sess
    parity = {"batch_sizes": list(batches), "max_abs": max_abs, "rel_l2": rel_l2, "atol": spec.atol,
              "max_rel_l2": spec.max_rel_l2, "reference": "torch float32 eager",
              "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}
    if max_abs > spec.atol or (spec.max_rel_l2 is not None and rel_l2 > spec.max_rel_l2):
        raise ExportValidationError(
            f"{spec.file} ({spec.precision}) misses its tolerance: max_abs {max_abs:.3g} (atol {spec.atol:g}), "
            f"rel_l2 {rel_l2:.3g}" + (f" (max {spec.max_rel_l2:g})" if spec.max_rel_l2 is not None else ""))
    return parity
