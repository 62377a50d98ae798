"""diffit_port.export: a checkpoint -> a validated ONNX package (opset 17, custom TimeTokenAttention node)."""

from .errors import ExportError, ExportValidationError
from .package_writer import default_out_dir, export_package
from .tmsa_op import custom_op_export, function_proto, tmsa_numpy

__all__ = ["ExportError", "ExportValidationError", "custom_op_export", "default_out_dir", "export_package",
           "function_proto", "tmsa_numpy"]
