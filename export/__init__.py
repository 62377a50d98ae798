"""diffit_port.export: a checkpoint -> a validated ONNX package (opset 17, custom TimeTokenAttention node).

The names below are loaded on first use (PEP 562), so `diffit-export --help` works where torch is not installed."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ExportError": "errors", "ExportValidationError": "errors", "default_out_dir": "package_writer",
         "export_package": "package_writer", "custom_op_export": "tmsa_op", "function_proto": "tmsa_op",
         "tmsa_numpy": "tmsa_op"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
