"""The exporter's typed errors: what the CLI reports as a clean message instead of a traceback."""


class ExportError(RuntimeError):
    """The export cannot proceed: bad arguments, unreadable checkpoint, destination in the way."""


class ExportValidationError(ExportError):
    """A written graph failed a check (ONNX checker, shape inference, I/O contract or parity);
    nothing is written to the destination."""
