"""The runtime interface: a `Denoiser` protocol, the explicit `PREPARERS` / `RUNTIMES` registries,
`create_denoiser` and `create_denoisers` (one prepared graph, a session per device)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from diffit_port.extras import TORCH_EXTRA
from diffit_port.package import Package, load_package

INSTALL_HINTS: dict[str, str] = {
    "onnxruntime": 'pip install "diffit-port[onnxruntime]"',
    "onnxruntime-gpu": 'pip install "diffit-port[onnxruntime-gpu]" (instead of onnxruntime, never both)',
    "openvino": 'pip install "diffit-port[openvino]"',
    "torch": TORCH_EXTRA,
    "nncf": 'pip install "diffit-port[int8]"',
}


class RuntimeUnavailable(RuntimeError):
    """The backend of a runtime is not installed, or cannot start on the requested device; the message
    names what to install."""


@runtime_checkable
class Denoiser(Protocol):
    """One denoiser step: x float32 (B, C, H, W), t float32 (B,) the time input (the training index of an eps
    package, sigma of an EDM package), y int64 (B,) label -> float32 (B, C or 2C, H, W) (eps, or EDM's D).
    A denoiser made from the in-graph guidance graph ("denoiser_cfg") also takes `guidance` float32 (B,),
    the per-sample scale."""

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


@contextlib.contextmanager
def external_data_copy(model: Any, prefix: str, name: str = "denoiser.onnx") -> Iterator[Path]:
    """`model` saved as `name` with its weights in `name`.data, in a temporary directory that goes when the block
    ends: for readers that need a file (a model past the protobuf limit). `model` is left as it was: onnx's save
    empties in place the initializers it writes out, and they are read back into it."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = Path(tmp) / name
        try:
            onnx.save_model(model, path, save_as_external_data=True, location=f"{name}.data")
        finally:
            onnx.load_external_data_for_model(model, tmp)
        yield path


def graph_feeds(inputs: dict[str, Any], x: np.ndarray, t: np.ndarray, y: np.ndarray,
                guidance: np.ndarray | None) -> dict[str, np.ndarray]:
    """The input dict of one denoiser call for a graph whose inputs (name -> NumPy dtype) are `inputs`:
    contiguous arrays in the graph's dtypes; the time input `t` feeds the graph's `sigma` when it has one (the
    EDM contract), else its `t`; `guidance` is required exactly when the graph takes it."""
    feeds = {"x": x, "sigma" if "sigma" in inputs else "t": t, "y": y}
    if "guidance" in inputs:
        if guidance is None:
            raise ValueError("this graph does in-graph guidance: pass `guidance` (B,) float32")
        feeds["guidance"] = guidance
    elif guidance is not None:
        raise ValueError("this graph takes no `guidance` input (use the package's denoiser_cfg graph)")
    return {k: np.ascontiguousarray(v, dtype=inputs[k]) for k, v in feeds.items()}


def row_chunks(n: int, parts: int) -> list[slice]:
    """`min(parts, n)` contiguous row ranges covering 0..n-1, sizes differing by at most one: how a call is split
    over CPU streams (every op of the denoiser graph is per sample, so the chunks do not interact)."""
    bounds = np.linspace(0, n, max(1, min(parts, n)) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def is_cpu(device: str | None) -> bool:
    """Whether a device name is the CPU ("cpu" in diffit's spelling, "CPU" in OpenVINO's)."""
    return device is not None and device.lower() == "cpu"


def split_devices(devices: str | None) -> list[str]:
    """The items of a --devices list ("0,1", "cpu, cpu"), stripped, empty ones left out; [] for None."""
    return [d.strip() for d in (devices or "").split(",") if d.strip()]


@contextlib.contextmanager
def quiet_tool(logger: str, level: int, *, hold: bool = False) -> Iterator[None]:
    """Around a third-party tool that prints to stdout (which diffit-run keeps for its one summary line): its
    stdout goes to stderr, and its `logger` holds back records below `level` for the duration. With `hold` (a tool
    of a second or so, whose output is no use to a user) its stdout and stderr are held back instead, and written
    to stderr only if it raises."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held if hold else sys.stderr), \
                contextlib.redirect_stderr(held) if hold else contextlib.nullcontext():
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        log.setLevel(before)


def require(module: str, extra: str, what: str) -> Any:
    """Import `module` or raise RuntimeUnavailable naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeUnavailable(f"{what} needs the Python package {module!r}, which is not installed "
                                 f"({e}); install it with: {INSTALL_HINTS[extra]}") from None


# A prepared graph (or checkpoint) of one runtime and one set of options: each call opens a new session on
# the given device (None: the runtime's default device).
SessionOpener = Callable[[Optional[str]], Denoiser]


def _onnx_cpu(package: Package, **opts: Any) -> SessionOpener:
    from .onnx_rt import prepare_onnx_cpu

    return prepare_onnx_cpu(package, **opts)


def _onnx_cuda(package: Package, **opts: Any) -> SessionOpener:
    from .onnx_cuda import prepare_onnx_cuda

    return prepare_onnx_cuda(package, **opts)


def _openvino(package: Package, **opts: Any) -> SessionOpener:
    from .openvino_rt import prepare_openvino

    return prepare_openvino(package, **opts)


def _torch(package: Package, **opts: Any) -> SessionOpener:
    from .torch_rt import prepare_torch

    return prepare_torch(package, **opts)


# runtime -> prepare(package, **options) -> SessionOpener. Filled explicitly; each imports its backend only
# when called. The graph rewrites (onnx-cuda), OpenVINO's read_model and the checkpoint read (torch) happen
# once per preparation, however many sessions are then opened from it.
PREPARERS: dict[str, Callable[..., SessionOpener]] = {
    "onnx-cpu": _onnx_cpu,
    "onnx-cuda": _onnx_cuda,
    "openvino": _openvino,
    "torch": _torch,
}


def _one_session(runtime: str) -> Callable[..., Denoiser]:
    def create(package: Package, *, device: str | None = None, **opts: Any) -> Denoiser:
        return PREPARERS[runtime](package, **opts)(device)

    create.__name__ = create.__qualname__ = f"create_{runtime.replace('-', '_')}"
    return create


# runtime -> factory(package, device=..., **options) of one session.
RUNTIMES: dict[str, Callable[..., Denoiser]] = {name: _one_session(name) for name in PREPARERS}


def as_package(package_or_path: Package | str | os.PathLike) -> Package:
    """A validated package (load_package checks format version and every file's sha256)."""
    if isinstance(package_or_path, Package):
        return package_or_path
    return load_package(Path(package_or_path))


def create_denoiser(runtime: str, package_or_path: Package | str | os.PathLike, *, device: str | None = None,
                    **opts: Any) -> Denoiser:
    """A ready denoiser of `runtime` ("auto" or a key of RUNTIMES) for a package (or its directory).

    "auto" is onnx-cuda when onnxruntime has the CUDA provider and a session actually starts on the
    device, otherwise onnx-cpu (options the CPU runtime does not know are dropped in that fallback); on a host with
    openvino but no onnxruntime it is openvino on the CPU.
    Raises RuntimeUnavailable when the backend is missing, naming what to install.
    """
    return create_denoisers(runtime, package_or_path, [device], **opts)[0]


def create_denoisers(runtime: str, package_or_path: Package | str | os.PathLike, devices: Sequence[str | None],
                     **opts: Any) -> list[Denoiser]:
    """One denoiser per entry of `devices` (in order), as create_denoiser would open each, but the graph is
    prepared (or the checkpoint read) once and every session opened from it. If a session fails to open,
    the ones already open are closed and the error propagates."""
    package = as_package(package_or_path)
    if runtime == "auto":
        open_session = _prepare_auto(package, **opts)
    elif runtime in PREPARERS:
        open_session = PREPARERS[runtime](package, **opts)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    opened: list[Denoiser] = []
    try:
        for device in devices:
            opened.append(open_session(device))
    except BaseException:
        for d in opened:
            d.close()
        raise
    return opened


CPU_OPTIONS = ("graph", "threads", "precision")   # what "auto" passes on to the CPU runtime it falls back to
ONNX_CPU_OPTIONS = CPU_OPTIONS + ("mha", "fusions")   # and on to onnx-cpu (--no-mha, --no-fusions)


def installed(module: str) -> bool:
    """Whether a top-level `module` can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):    # an import hook that refuses it, or a module entry without a spec
        return False


def auto_runs_openvino() -> bool:
    """Whether "auto" means openvino on this host: onnxruntime is not installed and openvino is (a deployment host
    set up with the openvino extra only)."""
    return not installed("onnxruntime") and installed("openvino")


def _prepare_auto(package: Package, **opts: Any) -> SessionOpener:
    """Per device: onnx-cuda where a session starts, else onnx-cpu; each of the two prepared at most once. Without
    onnxruntime but with openvino installed: openvino on the CPU."""
    cpu_opts = {k: v for k, v in opts.items() if k in CPU_OPTIONS}
    if auto_runs_openvino():
        on_cpu = PREPARERS["openvino"](package, **cpu_opts)

        def open_openvino(device: str | None = None) -> Denoiser:
            if device is not None and not is_cpu(device):
                require("onnxruntime", "onnxruntime-gpu", f"running auto on device {device!r}")   # raises here
            return on_cpu(None)
        return open_openvino
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    has_cuda = ort is not None and "CUDAExecutionProvider" in ort.get_available_providers()
    openers: dict[str, SessionOpener] = {}

    def open_session(device: str | None = None) -> Denoiser:
        if has_cuda and device != "cpu":
            try:
                if "onnx-cuda" not in openers:
                    openers["onnx-cuda"] = PREPARERS["onnx-cuda"](package, **opts)
                return openers["onnx-cuda"](device)
            except RuntimeUnavailable:
                pass  # the provider is there but no session starts (no GPU, missing CUDA libraries): use the CPU
        if "onnx-cpu" not in openers:
            openers["onnx-cpu"] = PREPARERS["onnx-cpu"](package, **{k: v for k, v in opts.items()
                                                                     if k in ONNX_CPU_OPTIONS})
        return openers["onnx-cpu"](None)

    return open_session
