"""What `diffit-run --fastest` runs: the fastest setting measured for this host and the package's model kind
(docs/BENCHMARKS.md), from the runtime asked for and the options given beside the flag (which win).

- onnx-cuda (where onnxruntime has its CUDA provider, unless --device cpu or --devices of the CPU only): fp16 and
  CUDA graphs with the device loop (none with --cfg in-graph); image models add the unet fusions and separate
  q/k/v, latent models the time token inside the q and v GEMMs.
- openvino on the CPU (a host without CUDA, or the CPU asked for; openvino installed): bf16 where OpenVINO's CPU plugin
  reports BF16 (AMX or AVX512-BF16), else its fp32 default; on other OpenVINO devices nothing changes.
- onnx-cpu (neither of them): its defaults, which are its fastest fp32 setting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import installed, is_cpu, split_devices


@dataclass(frozen=True)
class Host:
    """What the choice depends on."""

    cuda: bool       # onnxruntime has its CUDA execution provider
    openvino: bool   # openvino is installed
    cpu_bf16: bool   # OpenVINO's CPU plugin reports BF16 among its OPTIMIZATION_CAPABILITIES


@dataclass(frozen=True)
class Flags:
    """The diffit-run options that --fastest may set, as given on the command line."""

    precision: str | None = None
    tf32: bool = False
    cuda_graph: bool = False
    device_loop: bool = False
    no_fusions: bool = False
    unet_fusions: bool = False
    separate_qkv: bool = False
    time_token_gemm: bool = False


NO_OPENVINO_NOTE = ("note: --fastest on the CPU runs onnx-cpu here; with openvino installed "
                    "(pip install \"diffit-port[openvino]\") it would run OpenVINO, in bf16 where the CPU has it")


def detect_host(runtime: str, device: str | None = None) -> Host:
    """This host's Host, as far as --fastest on `runtime` and `device` needs it: whether onnxruntime has its CUDA
    provider (for auto), whether OpenVINO is installed and its CPU runs bf16 (for openvino, and auto on the CPU)."""
    cuda = False
    if runtime == "auto" and installed("onnxruntime"):
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    has_ov = installed("openvino")
    wanted = runtime == "openvino" or (runtime == "auto" and (not cuda or is_cpu(device)))
    return Host(cuda=cuda, openvino=has_ov, cpu_bf16=has_ov and wanted and _cpu_bf16())


def requested_device(device: str | None, devices: str | None) -> str | None:
    """The one device --fastest weighs from --device or --devices: "cpu" when every --devices item is the CPU
    (`--devices cpu,cpu` keeps auto on the CPU, as `--device cpu` does), else --device (None for other lists)."""
    items = split_devices(devices)
    if items and all(is_cpu(d) for d in items):
        return "cpu"
    return device


def _cpu_bf16() -> bool:
    try:
        import openvino

        return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except (ImportError, RuntimeError):   # a broken install: opening the runtime reports it in one line
        return False


def resolve(runtime: str, flags: Flags, host: Host, *, latent: bool, in_graph: bool,
            device: str | None = None) -> tuple[str, Flags, str | None]:
    """(runtime, flags, a note for stderr or None) that --fastest gives for `runtime` ("auto", "onnx-cuda",
    "openvino" or "onnx-cpu"; torch raises ValueError) with `flags` as given, for a latent or image model, with
    in-graph guidance or not, on `device` (--device: "cpu" keeps auto on the CPU; for openvino None is the CPU)."""
    if runtime == "torch":
        raise ValueError("--fastest applies to auto, onnx-cuda, openvino and onnx-cpu, not torch")
    if runtime == "auto":
        runtime = "onnx-cuda" if host.cuda and not is_cpu(device) else "openvino" if host.openvino else "onnx-cpu"
        if runtime == "onnx-cpu":
            return runtime, flags, NO_OPENVINO_NOTE
    if runtime == "onnx-cuda":
        return runtime, _onnx_cuda(flags, latent, in_graph), None
    if runtime == "openvino" and flags.precision is None and host.cpu_bf16 and (device is None or is_cpu(device)):
        return runtime, replace(flags, precision="bf16"), None
    return runtime, flags, None


def _onnx_cuda(flags: Flags, latent: bool, in_graph: bool) -> Flags:
    separate = flags.separate_qkv or not latent
    return replace(flags, precision=flags.precision or ("tf32" if flags.tf32 else "fp16"), cuda_graph=True,
                   device_loop=flags.device_loop or not in_graph,
                   unet_fusions=flags.unet_fusions or not (latent or flags.no_fusions), separate_qkv=separate,
                   time_token_gemm=flags.time_token_gemm or (latent and not separate))
