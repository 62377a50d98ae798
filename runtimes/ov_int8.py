"""openvino's int8 model (`diffit-run --runtime openvino --int8`). An image model's convolutions are quantized
statically by NNCF (`nncf.quantize`): int8 weights and activations whose ranges come from the calibration run of the
package's own default sampling (calibration.py), as onnx-cpu's int8 graph does, so that OpenVINO's CPU plugin runs
them as int8 convolutions. The first and the last convolution stay float, as there: they read the noisy image and
write the model's output. With a cache directory the quantized model is kept as OpenVINO IR for later loads of the
same package (`cache_path`, `cached`). A model with no inner convolution (the latent form) gets NNCF's int8
weight-only compression instead, its arithmetic staying in float."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffit_port.atomic import commit, discard
from diffit_port.package import Package

from .base import quiet_tool, require
from .calibration import calibration_key, calibration_run, evenly_spaced

MODEL_FORM = 1   # what is quantized (in the cache key): 1 the inner convolutions, first and last left float


def inner_convolutions(ov_model: Any) -> list[str]:
    """The friendly names of the model's convolutions in graph order, less the first and the last."""
    convs = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return convs[1:-1]


def calibration_feeds(package: Package, graph: str, denoiser: Any) -> list[dict[str, np.ndarray]]:
    """The inputs (graph input name -> array) of the calls of the calibration run on `denoiser`, an fp32
    OpenVinoDenoiser of the model to quantize, at most CALIBRATION_CALLS of them, evenly spaced."""
    denoiser.recorded = []
    try:
        calibration_run(package, graph, denoiser)
        return evenly_spaced(denoiser.recorded)
    finally:
        denoiser.recorded = None


def quantize_convolutions(ov_model: Any, feeds: list[dict[str, np.ndarray]]) -> Any:
    """A new model: `ov_model` with its inner convolutions quantized to int8 by NNCF, calibrated on `feeds`; every
    other op is left out of the quantization scope."""
    nncf = require("nncf", "nncf", "OpenVINO int8 quantization")
    convs = set(inner_convolutions(ov_model))
    others = sorted({op.get_friendly_name() for op in ov_model.get_ops()} - convs)
    scope = nncf.IgnoredScope(names=others, validate=False)
    with quiet_tool("nncf", logging.WARNING):
        return nncf.quantize(ov_model, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=scope)


def cache_path(cache_dir: str | Path, package: Package, graph: str, attention: str, forms: tuple[bool, ...]) -> Path:
    """Where `cached` keeps the int8 model (an .xml, its weights in the .bin beside it): named by everything it depends
    on (calibration_key, the attention form and the graph's rewrites (`forms`: openvino_rt's channel_norms and
    head_matmuls), MODEL_FORM, OpenVINO's and NNCF's versions)."""
    import importlib.metadata

    import openvino

    nncf_version = importlib.metadata.version("nncf")     # (importing nncf itself takes seconds)
    key = calibration_key(package, graph, attention, *forms, MODEL_FORM, openvino.get_version(), nncf_version)
    return Path(cache_dir) / f"openvino-int8-{key}.xml"


def cached(core: Any, path: Path, build: Callable[[], Any]) -> Any:
    """The model stored at `path`, else (absent, or unreadable) `build()`, written there: both files to a temporary
    directory beside it, then committed into place (atomic.commit), the .bin first, so a reader never finds an .xml
    without its weights."""
    import openvino as ov

    if path.is_file() and path.with_suffix(".bin").is_file():
        try:
            return core.read_model(str(path))
        except RuntimeError:
            pass                                   # a damaged entry is built again and replaced
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        commit(tmp / "model.bin", path.with_suffix(".bin"))
        commit(tmp / "model.xml", path)
    finally:
        discard(tmp)
    return model


def compress_weights_int8(ov_model: Any) -> Any:
    """NNCF's int8 weight-only compression (asymmetric, per output channel) of an OpenVINO model. stdout keeps
    only the run's result: NNCF's statistics table (logged to stdout at INFO) is held back and its progress
    bar goes to stderr."""
    nncf = require("nncf", "nncf", "OpenVINO int8 weight compression")
    with quiet_tool("nncf", logging.WARNING):
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
