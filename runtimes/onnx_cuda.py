"""onnx-cuda: the package's graph prepared for onnxruntime's CUDA execution provider (MultiHeadAttention rewrite,
transformer fusions, bias folds, optional fp16) and its sessions (IO binding with preallocated device buffers,
optional CUDA graphs, the device loop)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx.inliner

from diffit_port.package import Package

from .base import RuntimeUnavailable
from .loop_graph import attached
from .onnx_rt import OrtDenoiser, check_precision, import_ort, session_from_model, session_options


def cuda_device_id(device: str | int | None) -> int:
    """0 for None/"cuda"; n for "cuda:n" or "n"."""
    if device is None or device == "cuda":
        return 0
    text = str(device)
    if text.startswith("cuda:"):
        text = text[5:]
    if not text.isdigit():
        raise ValueError(f"onnx-cuda device must be cuda, cuda:N or N, got {device!r}")
    return int(text)


def prepare_cuda_model(path: str | Path, *, mha: bool = True, fusions: bool | str = True, qkv: str = "split",
                       fp16: bool = False, fp16_keep_fp32: tuple[str, ...] | None = None,
                       attention_fp16: bool = False, pack: tuple[tuple[int, int], ...] = (),
                       fold_biases: bool = False) -> onnx.ModelProto:
    """The package graph, rewritten for the CUDA EP in memory: custom node -> MultiHeadAttention (`qkv` as
    for ort_graph.rewrite_to_mha), then onnxruntime's transformer fusions on the float32 graph (`fusions`:
    True or "bert" for the transformer ones, "unet" to add the NHWC Conv and GroupNorm+SiLU fusions of
    onnxruntime's diffusion UNet optimizer, False for none), then the fp16 conversion (`fp16_keep_fp32`:
    op types left in float32; None = ort_graph.FP16_KEEP_FP32, () = onnxruntime's default list only), or
    with `attention_fp16` only the attention in float16 (ort_graph.attention_in_fp16). `pack`, pairs (tokens per
    window, windows per sequence) as ort_windows.window_groups gives them, runs the attention of short windows
    several windows at a time (ort_windows.pack_windows; needs `mha`). `fold_biases` moves the bias adds that would
    run as kernels of their own into the fused ops that read them next (ort_folds.fold_biases; needs `fusions`).
    The rewrites work in place on the model loaded here (one copy of the weights), and the IR version is
    capped at ort_graph.MAX_IR_VERSION once, at the end.

    onnxruntime's GroupNorm kernels (`fusions="unet"`) sum each group with float atomics across thread blocks,
    so their results, and a sampling run's, vary from run to run at float32 rounding level."""
    from .ort_graph import (FP16_KEEP_FP32, MAX_IR_VERSION, attention_in_fp16, convert_to_fp16,
                            fuse_transformer_ops, rewrite_to_mha)
    from .ort_windows import pack_windows

    if pack and not mha:
        raise ValueError("packing windows needs the MultiHeadAttention rewrite (mha=True)")
    if fold_biases and not fusions:
        raise ValueError("folding biases needs onnxruntime's fusions (fusions=True or 'unet')")

    model = onnx.load(str(path))
    if mha:
        model = rewrite_to_mha(model, qkv=qkv)
    elif fusions or fp16:
        # Without the rewrite the fusion and fp16 tools would have to see through a model-local function.
        model = onnx.inliner.inline_local_functions(model)
    if fusions:
        model = fuse_transformer_ops(model, use_gpu=True, model_type="bert" if fusions is True else fusions)
    if fold_biases:
        from .ort_folds import fold_biases as fold

        fold(model)
    if pack:
        model = pack_windows(model, dict(pack))
    if fp16:
        model = convert_to_fp16(model, keep_fp32=FP16_KEEP_FP32 if fp16_keep_fp32 is None else fp16_keep_fp32)
    elif attention_fp16:
        model = attention_in_fp16(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def cached_cuda_model(cache: dict[Any, onnx.ModelProto], path: str | Path, **graph_opts: Any) -> onnx.ModelProto:
    """prepare_cuda_model(path, **graph_opts), once per distinct (path, options) in `cache` (a dict the caller
    keeps: benchmarks open many sessions of one multi-GB graph)."""
    key = (str(path), tuple(sorted(graph_opts.items())))
    if key not in cache:
        cache[key] = prepare_cuda_model(path, **graph_opts)
    return cache[key]


def cuda_provider_defaults(precision: str | None, kind: str = "latent") -> dict[str, str]:
    """CUDA EP options chosen by precision and model kind. fp16: cuDNN's heuristics pick each convolution's
    algorithm instead of onnxruntime's default exhaustive search, which chose FFT convolutions for the image
    models' float16 3x3 convolutions on an H200 (digits 36.8 -> 12.9 ms per call, image-cifar10 105.6 -> 37.4;
    latent-xl2-256 unchanged, docs/BENCHMARKS_GPU.md). TF32 and fp32 keep the exhaustive search (heuristics were
    1-9% slower). fp16 image models also pin MultiHeadAttention to the memory-efficient kernel (sdpa_kernel 2,
    with the unfused one, 16, as the fallback): on their 64-token sequences it beat cuDNN's flash attention,
    which onnxruntime picks otherwise (image-cifar10 packed 28.2 vs 29.2 ms per call); on latent-xl2-256's
    256 tokens cuDNN's wins (72.1 vs 79.4 ms), so latent models keep onnxruntime's choice."""
    if precision != "fp16":
        return {}
    return {"cudnn_conv_algo_search": "HEURISTIC", **({"sdpa_kernel": "18"} if kind == "image" else {})}


def cuda_precision(package: Package, precision: str | None, use_tf32: bool = False) -> tuple[str | None, bool]:
    """(precision, use_tf32) of an onnx-cuda session as asked: an fp16 package stays fp16, "tf32" turns TF32 on."""
    if package.precision == "fp16" and precision in (None, "fp32", "tf32"):
        precision = "fp16"
    return precision, use_tf32 or precision == "tf32"


def cuda_graph_options(package: Package, precision: str | None, *, mha: bool = True, fusions: bool | str = True,
                       qkv: str = "split", fp16_keep_fp32: tuple[str, ...] | None = None, attention_fp16: bool = False,
                       pack_windows: bool = True, fold_biases: bool = True) -> dict[str, Any]:
    """The prepare_cuda_model options of a session of `package` at `precision` (as cuda_precision resolves it):
    an fp16 package is not converted again, qkv="separate-time" applies to latent models only, `attention_fp16`
    to fp32/tf32 graphs only, and with `mha` and `pack_windows` the short windows are packed as
    ort_windows.window_groups chooses; `fold_biases` applies only with `fusions`."""
    from .ort_windows import window_groups

    if qkv == "separate-time" and package.model.kind != "latent":
        raise ValueError("qkv='separate-time' is for latent models: in an image model every attention window "
                         "would add a one-hot column per window and image to the q and v MatMuls")
    return dict(mha=mha, fusions=fusions, qkv=qkv, fp16=precision == "fp16" and package.precision != "fp16",
                fp16_keep_fp32=fp16_keep_fp32, attention_fp16=attention_fp16 and precision != "fp16",
                pack=tuple(sorted(window_groups(package.model).items())) if pack_windows and mha else (),
                fold_biases=bool(fold_biases and fusions))


def cuda_provider_options(package: Package, precision: str | None, use_tf32: bool,
                          provider_options: dict[str, str] | None = None) -> dict[str, str]:
    """The CUDA EP options of a session (device and CUDA graphs aside): TF32, cuda_provider_defaults, then the
    caller's `provider_options` over them."""
    return {"use_tf32": "1" if use_tf32 else "0", **cuda_provider_defaults(precision, package.model.kind),
            **(provider_options or {})}


def prepare_onnx_cuda(package: Package, *, graph: str = "denoiser", precision: str | None = None,
                      use_tf32: bool = False, mha: bool = True, fusions: bool | str = True, qkv: str = "split",
                      io_binding: bool = True, cuda_graph: bool = False, preload_dlls: bool = True,
                      threads: int | None = None, fp16_keep_fp32: tuple[str, ...] | None = None,
                      attention_fp16: bool = False, pack_windows: bool = True, fold_biases: bool = True,
                      provider_options: dict[str, str] | None = None, async_loop: bool = True,
                      prepared_cache: dict[Any, onnx.ModelProto] | None = None) -> Callable[[str | None], OrtDenoiser]:
    """Opens sessions on the CUDA execution provider: call the result with a device (None/"cuda", "cuda:N"
    or "N") for each session. The graph is prepared (prepare_cuda_model) once, on the first call, and every
    session starts from that model. fp32 keeps TF32 off by default (parity; `use_tf32=True` trades it
    for speed); precision "fp16" converts the rewritten, fused graph (inputs/outputs stay float32).
    `cuda_graph` needs IO binding and static shapes (one captured graph per batch size). `provider_options`
    are extra CUDA EP options (e.g. {"prefer_nhwc": "1"}), applied over those of cuda_provider_defaults; `fusions`,
    `qkv` and `attention_fp16` (fp32 and tf32 only) as for prepare_cuda_model; `pack_windows` (the default)
    packs the short windows of the package's image model as ort_windows.window_groups chooses (image-cifar10's
    4x4 windows four at a time: its attention 10.4 -> 2.8 ms per call; nothing changes for latent models or
    windows of 64 tokens and more; off without `mha`); `fold_biases` (the default, with `fusions`) as for
    prepare_cuda_model: the image models' convolution biases go into the norms that read them (digits 10.86 ->
    9.80 ms, image-cifar10 25.98 -> 23.20 ms per call, fp16 unet graphs, docs/BENCHMARKS_GPU.md round 8).
    `prepared_cache`, a dict the caller keeps, shares prepared graphs between preparations of one package
    with the same graph options (benchmarks open many variants of a multi-GB graph). `async_loop` (the default):
    without `cuda_graph`, the device loop's runs do not wait for the GPU (DeviceLoop's `async_runs`)."""
    ort = import_ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeUnavailable(
            "onnx-cuda needs onnxruntime with the CUDA execution provider; this onnxruntime has "
            f"{', '.join(ort.get_available_providers())}. Install it with: "
            'pip uninstall onnxruntime && pip install "diffit-port[onnxruntime-gpu]"')
    check_precision(package, precision, ("fp32", "fp16", "tf32"))
    precision, use_tf32 = cuda_precision(package, precision, use_tf32)
    if cuda_graph and not io_binding:
        raise ValueError("cuda_graph needs io_binding")
    label = "fp16" if precision == "fp16" else ("tf32" if use_tf32 else "fp32")
    prepared: list[onnx.ModelProto] = []   # filled by the first session, after its device was checked
    lock = threading.Lock()

    def open_session(device: str | None = None) -> OrtDenoiser:
        device_id = cuda_device_id(device)
        if not prepared:
            if preload_dlls and hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, where torch's copies are not loaded
                except Exception:  # noqa: BLE001 - best effort; the session start below reports what is missing
                    pass
            graph_opts = cuda_graph_options(package, precision, mha=mha, fusions=fusions, qkv=qkv,
                                            fp16_keep_fp32=fp16_keep_fp32, attention_fp16=attention_fp16,
                                            pack_windows=pack_windows, fold_biases=fold_biases)
            cache = {} if prepared_cache is None else prepared_cache
            prepared.append(cached_cuda_model(cache, package.graph_path(graph), **graph_opts))
        cuda_opts = {"device_id": str(device_id), **cuda_provider_options(package, precision, use_tf32,
                                                                           provider_options)}
        if cuda_graph:
            cuda_opts["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        so = session_options(ort, threads)
        try:
            session = session_from_model(ort, prepared[0], so, providers)
        except Exception as e:  # noqa: BLE001 - any start failure means "not available on this machine"
            raise RuntimeUnavailable(f"onnx-cuda could not start a session on cuda:{device_id}: {e}") from None
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeUnavailable(f"onnx-cuda: onnxruntime fell back to {session.get_providers()} on "
                                     f"cuda:{device_id} (CUDA or cuDNN libraries missing, or no GPU)")

        def open_loop_session(spec: Any) -> Any:
            with lock, attached(prepared[0], spec) as model:   # sessions on other devices share the model
                return session_from_model(ort, model, session_options(ort, threads), providers)

        return OrtDenoiser(session, name="onnx-cuda", device=f"cuda:{device_id}", precision=label,
                           out_channels=package.model.out_channels, io_binding=io_binding, device_id=device_id,
                           cuda_graph=cuda_graph, open_loop_session=open_loop_session if io_binding else None,
                           async_loop=async_loop)

    return open_session


def create_onnx_cuda(package: Package, *, device: str | None = None, **opts: Any) -> OrtDenoiser:
    """One onnx-cuda session; `opts` as for prepare_onnx_cuda."""
    return prepare_onnx_cuda(package, **opts)(device)
