"""The variants a sampling benchmark compares: runtime, options, device and whether the loop runs on the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffit_port.package import Package


@dataclass(frozen=True)
class Variant:
    runtime: str
    label: str
    opts: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    loops: tuple[str, ...] = ("host",)      # "host" (NumPy sampler) and/or "device" (device loop), one session


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def torch_variants(cuda: bool) -> list[Variant]:
    if not cuda:
        return [Variant("torch", "eager fp32", {"precision": "fp32"})]
    return [Variant("torch", "eager fp32", {"precision": "fp32"}, "cuda"),
            Variant("torch", "eager tf32", {"precision": "tf32"}, "cuda"),
            Variant("torch", "eager bf16", {"precision": "bf16"}, "cuda"),
            Variant("torch", "torch.compile bf16", {"precision": "bf16", "compile": True}, "cuda"),
            Variant("torch", "torch.compile fp16", {"precision": "fp16", "compile": True}, "cuda")]


def cpu_variants() -> list[Variant]:
    return [Variant("onnx-cpu", "MultiHeadAttention, separate q/k/v, FastGelu (the default)"),
            Variant("onnx-cpu", "as shipped (function body; the default before)", {"mha": False, "fusions": False}),
            # onnx-cpu splits each call over two one-thread sessions by default (prepare_onnx_cpu)
            Variant("onnx-cpu", "1 stream (the default before)", {"streams": 1}),
            Variant("onnx-cpu", "no spinning", {"spinning": False}),
            Variant("onnx-cpu", "1 thread", {"threads": 1}),
            # OpenVINO on the CPU compiles per batch size and runs two streams by default (prepare_openvino)
            Variant("openvino", "inlined function, f32", {"precision": "fp32"}),
            # GroupNorms from per-channel statistics in fp32 by default (runtimes/group_norm.py)
            Variant("openvino", "inlined function, f32, GroupNorms as exported (the default before)",
                    {"precision": "fp32", "channel_norms": False}),
            Variant("onnx-cpu", "GroupNorms from per-channel statistics", {"channel_norms": True}),
            # q, k and v as per-head products in fp32 by default (runtimes/head_matmuls.py)
            Variant("openvino", "inlined function, f32, q/k/v as one product (the default before)",
                    {"precision": "fp32", "head_matmuls": False}),
            # the image model's inner convolutions in int8, calibrated at load (runtimes/ort_int8.py)
            Variant("onnx-cpu", "int8 convolutions", {"int8": True}),
            Variant("openvino", "inlined function, f32, 1 stream", {"precision": "fp32", "streams": 1}),
            Variant("openvino", "inlined function, f32, 1 stream, dynamic shapes (the default before)",
                    {"precision": "fp32", "streams": 1, "static_shapes": False}),
            Variant("openvino", "SDPA extension, f32", {"precision": "fp32", "attention": "sdpa"}),
            Variant("openvino", "SDPA extension, f32, 1 stream", {"precision": "fp32", "attention": "sdpa",
                                                                  "streams": 1}),
            Variant("openvino", "SDPA extension, f32, 1 stream, dynamic shapes",
                    {"precision": "fp32", "attention": "sdpa", "streams": 1, "static_shapes": False}),
            Variant("openvino", "SDPA extension, f32, CPU pinning",
                    {"precision": "fp32", "attention": "sdpa", "config": {"ENABLE_CPU_PINNING": True}}),
            Variant("openvino", "SDPA extension, f32, 1 thread", {"precision": "fp32", "attention": "sdpa",
                                                                  "threads": 1, "streams": 1}),
            Variant("openvino", "SDPA extension, bf16", {"precision": "bf16", "attention": "sdpa"}),
            Variant("openvino", "inlined function, bf16", {"precision": "bf16"}),
            Variant("openvino", "inlined function, bf16, 1 stream", {"precision": "bf16", "streams": 1}),
            Variant("openvino", "SDPA extension, f32, int8 weights", {"precision": "fp32", "attention": "sdpa",
                                                                      "int8": True})]


def cuda_variants(image: bool) -> list[Variant]:
    """onnx-cuda: the reference graphs, then the candidates (each label names what differs)."""
    g16 = dict(precision="fp16", cuda_graph=True)
    t32 = dict(use_tf32=True, cuda_graph=True)
    out = [("plain fp32", dict(mha=False, fusions=False)),
           ("MHA+fusions fp32", {}),
           ("MHA+fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True)),
           ("MHA+fusions fp16", dict(precision="fp16")),
           ("MHA+fusions fp16 + CUDA graph", g16, ("host", "device")),
           ("MHA+fusions fp16 + CUDA graph, norms fp16 I/O", dict(g16, fp16_keep_fp32=())),
           ("separate qkv fp16 + CUDA graph", dict(g16, qkv="separate"), ("host", "device"))]
    if image:
        out += [("unet fusions tf32 + CUDA graph", dict(use_tf32=True, cuda_graph=True, fusions="unet")),
                ("unet fusions fp16 + CUDA graph", dict(g16, fusions="unet")),
                ("unet fusions+separate qkv fp16 + CUDA graph", dict(g16, fusions="unet", qkv="separate"),
                 ("host", "device")),
                ("unet+separate qkv tf32 + CUDA graph", dict(t32, fusions="unet", qkv="separate"), ("host", "device")),
                ("unet+separate qkv tf32, fp16 attention + CUDA graph",
                 dict(t32, fusions="unet", qkv="separate", attention_fp16=True), ("host", "device")),
                ("separate qkv tf32, fp16 attention + CUDA graph", dict(t32, qkv="separate", attention_fp16=True),
                 ("host", "device")),
                ("prefer_nhwc fp16 + CUDA graph", dict(g16, provider_options={"prefer_nhwc": "1"}))]
    return [Variant("onnx-cuda", o[0], o[1], loops=o[2] if len(o) > 2 else ("host",)) for o in out]


def variants(package: Package) -> list[Variant]:
    """Every variant this machine can run for `package`; the first one is the reference of the diff column."""
    image = package.model.kind == "image"
    out = torch_variants(torch_cuda_available()) + cpu_variants()
    if ort_cuda_available():
        out += cuda_variants(image)
    return out
