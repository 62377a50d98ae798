"""OpenVINO denoiser: the package graph with its model-local function inlined (OpenVINO's ONNX frontend does
not expand them), or the custom node lowered to ScaledDotProductAttention by a ConversionExtension."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.inliner

from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP, Package

from .base import (RuntimeUnavailable, external_data_copy, fits_in_memory_proto, graph_feeds, installed, is_cpu,
                   require, row_chunks)
from .group_norm import per_channel_group_norms
from .head_matmuls import head_matmuls as rewrite_head_matmuls

# diffit precision names -> OpenVINO INFERENCE_PRECISION_HINT values
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _reason(e: BaseException) -> str:
    """The informative line of an OpenVINO exception (its first lines only name C++ source locations)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[0] if lines else type(e).__name__


def _import_ov() -> Any:
    return require("openvino", "openvino", "the openvino runtime")


def tmsa_conversion_extension(ov: Any) -> Any:
    """A ConversionExtension that builds TimeTokenAttention from OpenVINO ops around
    ScaledDotProductAttention-13 (rel_bias (h, N, N) as the float mask, which broadcasts over B)."""
    import openvino.opset13 as ops
    from openvino.frontend.onnx import ConversionExtension

    def i64(*values: int) -> Any:
        return ops.constant(np.array(values, dtype=np.int64))

    def convert(ctx: Any) -> list[Any]:
        x, t_emb, w_qkv, w_time, b_qkv, rel_bias = (ctx.get_input(i) for i in range(6))
        h = int(ctx.get_attribute("num_heads"))
        time = ops.unsqueeze(ops.add(ops.matmul(t_emb, w_time, False, False), b_qkv), i64(1))    # (B, 1, 3C)
        qkv = ops.add(ops.matmul(x, w_qkv, False, False), time)                                   # (B, N, 3C)
        qkv5 = ops.transpose(ops.reshape(qkv, i64(0, 0, 3, h, -1), special_zero=True), i64(2, 0, 3, 1, 4))
        # Scalar indices: gather then drops the axis, giving (B, h, N, d).
        q, k, v = (ops.gather(qkv5, ops.constant(np.int64(i)), ops.constant(np.int64(0))) for i in range(3))
        att = ops.scaled_dot_product_attention(q, k, v, rel_bias, causal=False)                  # scale 1/sqrt(d)
        out = ops.reshape(ops.transpose(att, i64(0, 2, 1, 3)), i64(0, 0, -1), special_zero=True)
        return [out.output(0)]

    return ConversionExtension(CUSTOM_OP, CUSTOM_DOMAIN, convert)


def read_onnx(core: Any, model: onnx.ModelProto) -> Any:
    """core.read_model from memory, or from a temporary file with external data past the protobuf limit."""
    if fits_in_memory_proto(model):
        return core.read_model(model.SerializeToString())
    with external_data_copy(model, "diffit-ov-") as path:
        ov_model = core.read_model(str(path))
        # read_model maps the weights lazily: materialise them before the directory goes.
        return ov_model.clone()


class OpenVinoDenoiser:
    """A compiled OpenVINO model behind the `Denoiser` protocol.

    `compile_for(batch)` compiles the model for one batch size (None: the dynamic-batch model). With `static` each
    call runs a model compiled for its exact batch (the first SHAPES_KEPT sizes met are kept, then the oldest
    goes): on the CPU plugin
    static shapes let OpenVINO plan its kernels and layouts for the real tensors. With `streams` > 1 each call
    is split into that many row chunks run at once as asynchronous requests, one per CPU stream (the model is
    compiled with NUM_STREAMS = streams); every op of the graph is per sample, so the rows do not interact."""

    SHAPES_KEPT = 4
    recorded: list[dict[str, np.ndarray]] | None = None   # when a list, each call's feeds are appended to it

    def __init__(self, compile_for: Callable[[int | None], Any], *, device: str, precision: str, input_names: list[str],
                 static: bool = False, streams: int = 1):
        self.name, self.device, self.precision = "openvino", device, precision
        self.provider = f"OpenVINO {device}"
        self._compile, self._names, self.static, self.streams = compile_for, input_names, static, max(1, int(streams))
        self._models: dict[int | None, tuple[Any, list[Any], dict[str, Any]]] = {}
        self._dtypes: dict[str, Any] = {}     # graph input name -> NumPy dtype (the same for every batch size)
        self.compiled = None if static else self._model(None)[0]

    def _model(self, batch: int | None) -> tuple[Any, list[Any], dict[str, Any]]:
        """(compiled model, its infer requests, {graph input name: port}) for `batch` rows, compiled on first use."""
        if batch not in self._models:
            if len(self._models) >= self.SHAPES_KEPT:
                self._models.pop(next(iter(self._models)))
            compiled = self._compile(batch)
            # A port can carry several tensor names (an input folded into a Cast keeps the Cast's name too):
            # key each port by its ONNX graph input name.
            ports = {next(n for n in self._names if n in port.get_names()): port for port in compiled.inputs}
            self._dtypes = {name: port.get_element_type().to_dtype() for name, port in ports.items()}
            requests = [compiled.create_infer_request() for _ in range(self.streams)]
            self._models[batch] = (compiled, requests, ports)
            self.compiled = compiled
        return self._models[batch]

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, guidance: np.ndarray | None = None) -> np.ndarray:
        chunks = row_chunks(len(x), self.streams)
        keys = [rows.stop - rows.start if self.static else None for rows in chunks]
        models = {k: self._model(k) for k in keys}       # (compiled first: they give the inputs' dtypes)
        feeds = graph_feeds(self._dtypes, x, t, y, guidance)
        if self.recorded is not None:                     # a calibration run (ov_int8)
            self.recorded.append({k: np.array(v) for k, v in feeds.items()})
        taken = dict.fromkeys(models, 0)                  # requests of each model in use so far
        runs = []
        for rows, key in zip(chunks, keys):
            _, requests, ports = models[key]
            req = requests[taken[key]]
            taken[key] += 1
            req.start_async({ports[k]: v[rows] for k, v in feeds.items()})
            runs.append(req)
        out = []
        for req in runs:
            req.wait()
            # The request reuses its output tensor on the next call: copy it out.
            out.append(np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def close(self) -> None:
        self._models.clear()
        self.compiled = None


def _read_graph(core: Any, path: Path, inline: bool, channel_norms: bool, head_matmuls: bool) -> tuple[Any, list[str]]:
    """The graph at `path` as an OpenVINO model, with the load-time rewrites asked for, and its input names. With no
    rewrite and no inlining it is read as shipped (onnx only supplies the input names; external weights not read)."""
    if not (inline or channel_norms or head_matmuls):
        input_names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        return core.read_model(str(path)), input_names
    model = onnx.load(str(path))
    input_names = [i.name for i in model.graph.input]
    if head_matmuls:
        rewrite_head_matmuls(model)
    if inline:
        model = onnx.inliner.inline_local_functions(model)
    if channel_norms:
        per_channel_group_norms(model)
    return read_onnx(core, model), input_names


def prepare_openvino(package: Package, *, graph: str = "denoiser", precision: str | None = None,
                     cache_dir: str | None = None, attention: str = "inline", threads: int | None = None,
                     config: dict[str, Any] | None = None, int8: bool = False, static_shapes: bool | None = None,
                     streams: int | None = None, channel_norms: bool | None = None,
                     head_matmuls: bool | None = None) -> Callable[[str | None], OpenVinoDenoiser]:
    """Read the package graph into OpenVINO once; the result compiles it on an OpenVINO device per call
    ("CPU" for None; any device string, e.g. "GPU.0" or "AUTO:GPU,CPU", passes through). Precision
    defaults to f32: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have it. attention:
    "inline" (onnx.inliner on the function body) or "sdpa" (ConversionExtension to ScaledDotProductAttention).
    `int8`: an image model's inner convolutions quantized statically to int8 by NNCF, calibrated on the package's
    default sampling (ov_int8.py) on an fp32 CPU compile of the model, whatever the device; a model without them
    gets int8 weight-only compression, its arithmetic staying in `precision`. `cache_dir`: OpenVINO's CACHE_DIR, and
    with `int8` where the quantized model is kept for later loads. On "CPU" the threads are not pinned to cores
    unless `config` says {"ENABLE_CPU_PINNING": True}. On "CPU" by default the model is also compiled for each
    call's exact batch size (`static_shapes`) and each call is split over two CPU streams (`streams`; see
    OpenVinoDenoiser): on the 2-core development machine the shipped digits model ran 1.2-1.4x faster than
    with one dynamic-batch model on one stream, 1.7x under a competing load (docs/BENCHMARKS_CPU.md). Other devices
    keep one dynamic-batch model on one stream unless asked. `channel_norms` computes the GroupNorms
    from per-channel statistics (group_norm.py), which spares the CPU plugin its layout changes around them; None
    means on in fp32 with "inline" only: bf16 keeps the graph's own form, whose sampling quality was measured, and
    "sdpa" gains nothing from it (docs/BENCHMARKS_CPU.md). `head_matmuls` makes the attention's q, k and v as per-head
    products (head_matmuls.py) instead of one product and a 5-D transpose; None means on where `channel_norms` is by
    default. It needs the function body inlined."""
    ov = _import_ov()
    precision = precision or "fp32"
    if precision not in PRECISION_HINTS:
        raise ValueError(f"openvino precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
    if attention not in ("inline", "sdpa"):
        raise ValueError(f"attention must be 'inline' or 'sdpa', got {attention!r}")
    if streams is not None and streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    core = ov.Core()
    path = package.graph_path(graph)
    channel_norms, head_matmuls = _rewrites(precision, attention, channel_norms, head_matmuls)
    if head_matmuls and attention != "inline":
        raise ValueError("head_matmuls needs attention='inline' (it rewrites the function body)")
    if attention == "sdpa":
        core.add_extension(tmsa_conversion_extension(ov))
    ov_model, input_names = _read_graph(core, path, attention == "inline", channel_norms, head_matmuls)
    int8_kind = None
    if int8:
        cache = _int8_cache(cache_dir, package, graph, attention, (channel_norms, head_matmuls))
        ov_model, int8_kind = _int8_model(core, ov_model, package, graph, input_names, cache)
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    if cache_dir:
        cfg["CACHE_DIR"] = str(cache_dir)
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    cfg.update(config or {})
    if package.precision == "fp16" and precision == "fp32":
        precision = "fp16"  # weights are fp16 in the file whatever the hint

    def open_session(device: str | None = None) -> OpenVinoDenoiser:
        device = ov_device(device)
        n_streams = streams or (2 if device == "CPU" else 1)
        dev_cfg = _device_config(device, cfg, n_streams)

        static = device == "CPU" if static_shapes is None else static_shapes
        d = OpenVinoDenoiser(_compiler(core, ov_model, device, dev_cfg), device=device, precision=precision,
                             input_names=input_names, static=static, streams=n_streams)
        if int8_kind:
            d.provider += f" (int8 {int8_kind})"
        return d

    return open_session


def _compiler(core: Any, ov_model: Any, device: str, dev_cfg: dict[str, Any]) -> Callable[[int | None], Any]:
    """compile_for(batch) of an OpenVinoDenoiser: `ov_model` compiled on `device`, for `batch` rows (None: the
    dynamic-batch model)."""
    def compile_for(batch: int | None) -> Any:
        model = ov_model
        if batch is not None:
            model = ov_model.clone()
            model.reshape({p: [batch, *list(p.get_partial_shape())[1:]] for p in model.inputs})
        try:
            return core.compile_model(model, device, dev_cfg)
        except RuntimeError as e:   # an absent device (GPU without a driver) fails deep in its plugin
            raise RuntimeUnavailable(f"openvino cannot compile the model for device {device!r} (available "
                                     f"devices: {', '.join(core.available_devices)}): {_reason(e)}") from None

    return compile_for


def _device_config(device: str, cfg: dict[str, Any], n_streams: int) -> dict[str, Any]:
    """`cfg` for compiling on `device` with `n_streams` streams. Unpinned CPU threads by default: on a 2-core machine
    shared with two busy processes pinned threads ran 1.3-1.7x slower than unpinned ones, which cost at most 5% on the
    quiet machine (BENCHMARKS_CPU.md)."""
    dev_cfg = {"ENABLE_CPU_PINNING": False, **cfg} if device == "CPU" else dict(cfg)
    if n_streams > 1:
        dev_cfg.setdefault("NUM_STREAMS", n_streams)
    return dev_cfg


def _rewrites(precision: str, attention: str, channel_norms: bool | None,
              head_matmuls: bool | None) -> tuple[bool, bool]:
    """(channel_norms, head_matmuls) as prepare_openvino applies them: each None is on in fp32 with the function
    body inlined."""
    default = precision == "fp32" and attention == "inline"
    return tuple(default if v is None else bool(v) for v in (channel_norms, head_matmuls))


def _int8_cache(cache_dir: str | None, package: Package, graph: str, attention: str,
                forms: tuple[bool, bool]) -> Path | None:
    """`forms`: (channel_norms, head_matmuls), the graph's rewrites before quantization."""
    from .ov_int8 import cache_path

    return cache_path(cache_dir, package, graph, attention, forms) if cache_dir else None


def int8_cached(package: Package, opts: dict[str, Any]) -> bool:
    """Whether prepare_openvino(package, int8=True, **opts) calibrates nothing at load: its cache_dir holds the
    quantized model already, or the model is latent (weight compression, no calibration)."""
    if package.model.kind != "image":
        return True
    precision, attention = opts.get("precision") or "fp32", opts.get("attention") or "inline"
    forms = _rewrites(precision, attention, opts.get("channel_norms"), opts.get("head_matmuls"))
    entry = _int8_cache(opts.get("cache_dir"), package, opts.get("graph") or "denoiser", attention, forms)
    return entry is not None and entry.is_file()


def _int8_model(core: Any, ov_model: Any, package: Package, graph: str, input_names: list[str],
                cache: Path | None) -> tuple[Any, str]:
    """(the int8 model, "convolutions" or "weights"): `ov_model` with its inner convolutions quantized, calibrated
    on an fp32 CPU compile of it (static shapes, two streams, as the default) unless `cache` holds the result, or
    weight-compressed when it has none."""
    from .ov_int8 import cached, calibration_feeds, compress_weights_int8, inner_convolutions, quantize_convolutions

    if not installed("nncf"):      # refused before any calibration run (importing it here would take seconds)
        require("nncf", "nncf", "openvino's int8")
    if not inner_convolutions(ov_model):
        return compress_weights_int8(ov_model), "weights"

    def build() -> Any:
        cfg = _device_config("CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS["fp32"]}, 2)
        fp32 = OpenVinoDenoiser(_compiler(core, ov_model, "CPU", cfg), device="CPU", precision="fp32",
                                input_names=input_names, static=True, streams=2)
        try:
            feeds = calibration_feeds(package, graph, fp32)
        finally:
            fp32.close()
        return quantize_convolutions(ov_model, feeds)

    return (cached(core, cache, build) if cache else build()), "convolutions"


def create_openvino(package: Package, *, device: str | None = None, **opts: Any) -> OpenVinoDenoiser:
    """One openvino session; `opts` as for prepare_openvino."""
    return prepare_openvino(package, **opts)(device)


def ov_device(device: str | None) -> str:
    """OpenVINO's name for `device`: the CPU for None, and "CPU" for "cpu" as the other runtimes spell it (OpenVINO's
    device names are case-sensitive); any other string passes through."""
    return "CPU" if device is None or is_cpu(device) else device


def create_graph_model(path: str | Path, *, device: str = "CPU", precision: str = "fp32") -> Any:
    """A compiled model for an auxiliary graph (the VAE decoder)."""
    ov = _import_ov()
    core = ov.Core()
    model = onnx.inliner.inline_local_functions(onnx.load(str(path)))
    return core.compile_model(read_onnx(core, model), ov_device(device),
                              {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]})
