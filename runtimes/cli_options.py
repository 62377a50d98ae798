"""`diffit-run`'s runtime flags turned into the runtime factory's keyword arguments, each refused (a usage error,
exit code 2) where the chosen runtime or the package has no use for it, before any session opens."""

from __future__ import annotations

import math
from typing import Any

import click

from .base import RUNTIMES, split_devices

# Options that only some runtimes understand: runtime -> factory keyword arguments accepted.
RUNTIME_OPTIONS = {
    "onnx-cpu": {"graph", "threads", "precision", "streams", "int8", "cache_dir", "mha", "fusions"},
    "onnx-cuda": {"graph", "threads", "precision", "use_tf32", "cuda_graph", "mha", "fusions", "qkv",
                  "attention_fp16", "pack_windows", "fold_biases"},
    "openvino": {"graph", "threads", "precision", "cache_dir", "attention", "int8", "streams"},
    "torch": {"graph", "threads", "precision", "checkpoint", "use_tf32"},   # --tf32 = precision tf32
}
RUNTIME_OPTIONS["auto"] = RUNTIME_OPTIONS["onnx-cuda"]

# factory keyword -> the flag that sets it, for the error messages
FLAG_NAMES = {"use_tf32": "--tf32", "cuda_graph": "--cuda-graph", "mha": "--no-mha", "fusions": "--no-fusions",
              "cache_dir": "--cache-dir", "attention": "--ov-attention", "checkpoint": "--checkpoint",
              "int8": "--int8", "streams": "--streams", "qkv": "--separate-qkv",
              "attention_fp16": "--fp16-attention", "pack_windows": "--no-pack-windows",
              "fold_biases": "--no-fold-biases"}


def parse_int_list(value: str | None, what: str) -> list[int] | None:
    if value is None or value.strip() == "":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None


def session_devices(runtime: str, device: str | None, devices: str | None) -> list[str | None]:
    """One entry per session. --devices items are CUDA ordinals for onnx-cuda ("0", "1"), "cuda:N"/"cpu"
    for torch (a bare N means cuda:N), OpenVINO device names for openvino, and "cpu" for onnx-cpu (so
    `--devices cpu,cpu` runs two CPU sessions side by side)."""
    if devices is None:
        return [device]
    if device is not None:
        raise click.UsageError("give --device or --devices, not both")
    items = split_devices(devices)
    if not items:
        raise click.BadParameter("--devices needs at least one device")
    if runtime == "torch":
        items = [f"cuda:{d}" if d.isdigit() else d for d in items]
    return list(items)


def check_guidance(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--guidance: a finite scale >= 0 (1 = off, 0 = unconditional)."""
    if value is not None and (not math.isfinite(value) or value < 0):
        raise click.BadParameter(f"must be a finite number >= 0 (1 = off), got {value}")
    return value


def runtime_options(runtime: str, given: dict[str, Any]) -> dict[str, Any]:
    """The factory keyword arguments, refusing options the runtime does not have."""
    allowed, flags = RUNTIME_OPTIONS[runtime], dict(FLAG_NAMES)
    if given.get("fusions") == "unet":
        flags["fusions"] = "--unet-fusions"
        if runtime == "onnx-cpu":
            raise click.UsageError("--unet-fusions does not apply to the onnx-cpu runtime (it does to onnx-cuda)")
    if given.get("qkv") == "separate-time":
        flags["qkv"] = "--time-token-gemm"
    for key, value in given.items():
        if key not in allowed and value is not None:
            takes = [r for r in RUNTIMES if key in RUNTIME_OPTIONS.get(r, ())]
            raise click.UsageError(f"{flags.get(key, key)} does not apply to the {runtime} runtime"
                                   + (f" (it does to --runtime {' and '.join(takes)})" if runtime == "auto" else ""))
    return {k: v for k, v in given.items() if v is not None}


def check_flag_pairs(f: dict[str, Any], latent: bool) -> None:
    """Flags that contradict each other or the model, whatever the runtime."""
    if f["tf32"] and f["precision"] not in (None, "fp32", "tf32"):
        raise click.UsageError("--tf32 applies to fp32 only")
    if f["unet_fusions"] and f["no_fusions"]:
        raise click.UsageError("--unet-fusions needs the transformer fusions: drop --no-fusions")
    if f["time_token_gemm"] and not latent:
        raise click.UsageError("--time-token-gemm applies to latent models (use --separate-qkv for image models)")
    if f["fp16_attention"] and f["precision"] == "fp16":
        raise click.UsageError("--fp16-attention applies to fp32/tf32 graphs (an fp16 graph is float16 throughout)")


def factory_options(runtime: str, latent: bool, in_graph: bool, f: dict[str, Any]) -> dict[str, Any]:
    """The runtime factory's keyword arguments from diffit-run's flags `f` (click's parameter names), with every
    flag checked against the runtime and the model (`latent`); `in_graph` = --cfg in-graph."""
    check_flag_pairs(f, latent)
    qkv = "separate-time" if f["time_token_gemm"] else ("separate" if f["separate_qkv"] else None)
    given = {"graph": "denoiser_cfg" if in_graph else None, "threads": f["threads"],
             "precision": "tf32" if f["tf32"] else f["precision"], "use_tf32": True if f["tf32"] else None,
             "cuda_graph": True if f["cuda_graph"] else None, "mha": False if f["no_mha"] else None,
             "fusions": False if f["no_fusions"] else ("unet" if f["unet_fusions"] else None),
             "cache_dir": f["cache_dir"], "attention": f["ov_attention"], "checkpoint": f["checkpoint"],
             "int8": True if f["int8"] else None, "streams": f["streams"], "qkv": qkv,
             "attention_fp16": True if f["fp16_attention"] else None,
             "pack_windows": False if f["no_pack_windows"] else None,
             "fold_biases": False if f["no_fold_biases"] else None}
    opts = runtime_options(runtime, given)
    if runtime != "onnx-cuda":
        opts.pop("use_tf32", None)
    if runtime in ("onnx-cpu", "openvino") and opts.get("precision") == "tf32":
        raise click.UsageError(f"--precision tf32 / --tf32 do not apply to the {runtime} runtime")
    return opts
