"""onnx-cpu's int8 graph (`diffit-run --runtime onnx-cpu --int8`): the image model's convolutions quantized
statically, with per-output-channel int8 weights and uint8 activations whose ranges are calibrated on the package's
own sampling, so that onnxruntime's CPU kernels run them as int8 GEMMs. Built at load with onnxruntime's own
quantization tool: a deployment host needs nothing beyond onnxruntime. onnx_rt quantizes the graph its other options
made (by default MultiHeadAttention and FastGelu; GRAPH_FORM). With a cache directory the result is kept for later
loads of the same package (`cache_path`, `cached`).

The first and the last convolution stay float: they read the noisy image and write the model's output (one channel
each on digits, a negligible share of the work), and quantizing them too nearly doubled the call's error on the
digits model. The linear layers stay float too: quantized dynamically (the range of each MatMul's input taken per
call) they made a call 3-9% faster but an image's output depend on the other images of its batch; as 8-bit
MatMulNBits, whose ranges are per row, they made it 1-10% slower; quantized statically, no faster at 8 rows and 5%
slower at 16 (docs/BENCHMARKS_CPU.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from diffit_port.atomic import write_bytes
from diffit_port.package import Package

from .base import Denoiser, external_data_copy, fits_in_memory_proto, quiet_tool
from .calibration import calibration_key, calibration_run, evenly_spaced

GRAPH_FORM = 4           # what is quantized (in the cache key): 1 the graph as shipped, 2 after the transformer fusions,
                         # 3 after the fusions without SkipLayerNormalization, 4 the graph of onnx-cpu's own options


class _Recording:
    """An onnxruntime session that keeps a copy of the feeds of every run."""

    def __init__(self, session: Any) -> None:
        self._session, self.feeds = session, []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
        self.feeds.append({k: np.array(v) for k, v in feeds.items()})
        return self._session.run(outputs, feeds, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def calibration_feeds(package: Package, graph: str, session: Any,
                      denoiser: Callable[[Any], Denoiser]) -> list[dict[str, np.ndarray]]:
    """The inputs of denoiser calls of the package's default sampling (its sampler and guidance, at most
    CALIBRATION_STEPS steps; in-graph guidance for the "denoiser_cfg" graph) on CALIBRATION_IMAGES images, one of
    each class in turn, run through `denoiser(proxy)`, a denoiser made over a proxy of `session` (an fp32 session of
    that graph) that records every run's feeds: what the quantized graph will see, from pure noise to the last
    step. At most CALIBRATION_CALLS of them, evenly spaced, the first and the last included."""
    recording = _Recording(session)
    calibration_run(package, graph, denoiser(recording))
    return evenly_spaced(recording.feeds)


def calibrated_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes quantize_int8 quantizes: all but the first and the last of the graph (in its
    topological order). None in a latent model, whose one convolution is the patch embedding."""
    convs = [nd.name for nd in model.graph.node if nd.op_type == "Conv"]
    return convs[1:-1]


def require_convs(model: onnx.ModelProto) -> list[str]:
    """`calibrated_convs`, or a one-line ValueError where there is none (a latent model)."""
    convs = calibrated_convs(model)
    if not convs:
        raise ValueError("onnx-cpu's int8 quantizes an image model's convolutions; this package's graph has none "
                         "to quantize (openvino's int8 compresses a latent model's weights)")
    return convs


class _Reader:
    """The calibration feeds as onnxruntime's CalibrationDataReader reads them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def name_nodes(model: onnx.ModelProto) -> None:
    """IN PLACE: give every unnamed node a name (the quantizer selects nodes by name)."""
    for i, nd in enumerate(model.graph.node):
        nd.name = nd.name or f"int8/node_{i}"


def quantize_int8(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """A new model: the `calibrated_convs` of `model` (named by `name_nodes`) as QDQ int8, the ranges of their
    inputs and outputs the min and max over `feeds` (graph inputs as the model takes them). `model` itself is
    left as it was. Works through a temporary directory, removed afterwards."""
    from onnxruntime import quantization as q

    convs = require_convs(model)
    with external_data_copy(model, "diffit-int8-", "float.onnx") as src, quiet_tool("root", logging.ERROR, hold=True):
        out = src.with_name("int8.onnx")
        q.quantize_static(src, out, _Reader(feeds), quant_format=q.QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                          nodes_to_quantize=convs, per_channel=True, use_external_data_format=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        return onnx.load(out)


def cache_path(cache_dir: str | Path, package: Package, graph: str, channel_norms: bool, mha: bool,
               fusions: bool) -> Path:
    """Where `cached` keeps the int8 graph of `package`'s `graph`: a name derived from everything the result
    depends on (the manifest, which holds the graph's sha256 and the default sampling, the graph's name, the
    GroupNorm, attention and GELU rewrites, the calibration settings, the graph form and onnxruntime's version)."""
    import onnxruntime

    key = calibration_key(package, graph, channel_norms, mha, fusions, GRAPH_FORM, onnxruntime.__version__)
    return Path(cache_dir) / f"onnx-cpu-int8-{key}.onnx"


def int8_cached(package: Package, opts: dict[str, Any]) -> bool:
    """Whether onnx-cpu's `opts` (prepare_onnx_cpu's) find their int8 graph in their cache_dir already, so that no
    calibration runs at load."""
    cache_dir = opts.get("cache_dir")
    return bool(cache_dir) and cache_path(cache_dir, package, opts.get("graph") or "denoiser",
                                          bool(opts.get("channel_norms")), opts.get("mha", True),
                                          opts.get("fusions", True)).is_file()


def cached(path: Path, build: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """The model stored at `path`, else (no file, or one that does not parse) `build()`, written to `path`
    atomically (a model past the protobuf limit is not stored)."""
    from google.protobuf.message import DecodeError

    if path.is_file():
        try:
            return onnx.load(path)
        except (OSError, DecodeError):
            pass                                   # a damaged entry is built again and replaced
    model = build()
    if fits_in_memory_proto(model):
        write_bytes(path, model.SerializeToString())
    return model
