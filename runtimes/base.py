"""The runtime interface: a `Denoiser` protocol, the explicit `RUNTIMES` registry and `create_denoiser`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from diffit_port.package import Package, load_package

INSTALL_HINTS: dict[str, str] = {
    "onnxruntime": 'pip install "diffit-port[onnxruntime]"',
    "onnxruntime-gpu": 'pip install "diffit-port[onnxruntime-gpu]" (instead of onnxruntime, never both)',
    "openvino": 'pip install "diffit-port[openvino]"',
    "torch": 'pip install "diffit-port[torch]"',
}


class RuntimeUnavailable(RuntimeError):
    """The backend of a runtime is not installed, or cannot start on the requested device; the message
    names what to install."""


@runtime_checkable
class Denoiser(Protocol):
    """One denoiser step: x float32 (B, C, H, W), t float32 (B,) training index, y int64 (B,) label ->
    float32 (B, C or 2C, H, W). A denoiser made from the in-graph guidance graph ("denoiser_cfg") also
    takes `guidance` float32 (B,), the per-sample scale."""

    name: str        # registry key, e.g. "onnx-cpu"
    device: str      # what the step runs on, e.g. "cpu", "cuda:0", "CPU" (OpenVINO)
    precision: str   # "fp32", "tf32", "fp16" or "bf16": the arithmetic actually used
    provider: str    # the execution provider / plugin, e.g. "CUDAExecutionProvider"

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                 guidance: np.ndarray | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


PROTOBUF_LIMIT = 2**31 - 2**24  # serialise in memory below ~2 GB, else through external data in a temp dir


def fits_in_memory_proto(model: Any) -> bool:
    """Whether an onnx ModelProto can be serialised as one protobuf message. Past 2 GB protobuf's ByteSize()
    itself raises EncodeError ("Failed to serialize proto"), so that counts as not fitting."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except EncodeError:
        return False


def graph_feeds(inputs: dict[str, Any], x: np.ndarray, t: np.ndarray, y: np.ndarray,
                guidance: np.ndarray | None) -> dict[str, np.ndarray]:
    """The input dict of one denoiser call for a graph whose inputs (name -> NumPy dtype) are `inputs`:
    contiguous arrays in the graph's dtypes; `guidance` is required exactly when the graph takes it."""
    feeds = {"x": x, "t": t, "y": y}
    if "guidance" in inputs:
        if guidance is None:
            raise ValueError("this graph does in-graph guidance: pass `guidance` (B,) float32")
        feeds["guidance"] = guidance
    elif guidance is not None:
        raise ValueError("this graph takes no `guidance` input (use the package's denoiser_cfg graph)")
    return {k: np.ascontiguousarray(v, dtype=inputs[k]) for k, v in feeds.items()}


def require(module: str, extra: str, what: str) -> Any:
    """Import `module` or raise RuntimeUnavailable naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeUnavailable(f"{what} needs the Python package {module!r}, which is not installed "
                                 f"({e}); install it with: {INSTALL_HINTS[extra]}") from None


def _onnx_cpu(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
    from .onnx_rt import create_onnx_cpu

    return create_onnx_cpu(package, device=device, **opts)


def _onnx_cuda(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
    from .onnx_rt import create_onnx_cuda

    return create_onnx_cuda(package, device=device, **opts)


def _openvino(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
    from .openvino_rt import create_openvino

    return create_openvino(package, device=device, **opts)


def _torch(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
    from .torch_rt import create_torch

    return create_torch(package, device=device, **opts)


# Filled explicitly; each factory imports its backend only when called.
RUNTIMES: dict[str, Callable[..., Denoiser]] = {
    "onnx-cpu": _onnx_cpu,
    "onnx-cuda": _onnx_cuda,
    "openvino": _openvino,
    "torch": _torch,
}


def as_package(package_or_path: Package | str | os.PathLike) -> Package:
    """A validated package (load_package checks format version and every file's sha256)."""
    if isinstance(package_or_path, Package):
        return package_or_path
    return load_package(Path(package_or_path))


def create_denoiser(runtime: str, package_or_path: Package | str | os.PathLike, *, device: str | None = None,
                    **opts: Any) -> Denoiser:
    """A ready denoiser of `runtime` ("auto" or a key of RUNTIMES) for a package (or its directory).

    "auto" is onnx-cuda when onnxruntime has the CUDA provider and a session actually starts on the
    device, otherwise onnx-cpu (options the CPU runtime does not know are dropped in that fallback).
    Raises RuntimeUnavailable when the backend is missing, naming what to install.
    """
    package = as_package(package_or_path)
    if runtime == "auto":
        return _create_auto(package, device=device, **opts)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](package, device=device, **opts)


CPU_OPTIONS = ("graph", "threads", "precision")


def _create_auto(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers() and device != "cpu":
        try:
            return RUNTIMES["onnx-cuda"](package, device=device, **opts)
        except RuntimeUnavailable:
            pass  # the provider is there but no session starts (no GPU, missing CUDA libraries): use the CPU
    cpu_opts = {k: v for k, v in opts.items() if k in CPU_OPTIONS}
    return RUNTIMES["onnx-cpu"](package, device=None, **cpu_opts)

