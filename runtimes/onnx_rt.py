"""ONNX Runtime denoisers: the session behind both ONNX Runtime runtimes (`OrtDenoiser`) and onnx-cpu (the
package as shipped, on one or more one-thread sessions); onnx-cuda's graph preparation is in `onnx_cuda`."""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from diffit_port.package import Package

from .base import external_data_copy, fits_in_memory_proto, graph_feeds, require, row_chunks
from .capture_gate import CAPTURE_RUNS, GATE
from .group_norm import per_channel_group_norms
from .loop_graph import attached
from .ort_graph import fuse_gelu, rewrite_to_mha
from .ort_int8 import cache_path, cached, calibration_feeds, name_nodes, quantize_int8, require_convs

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}


def import_ort() -> Any:
    """onnxruntime, or RuntimeUnavailable naming what to install."""
    return require("onnxruntime", "onnxruntime", "running onnx-cpu or onnx-cuda")


def session_options(ort: Any, threads: int | None = None, spinning: bool = True) -> Any:
    """ORT_ENABLE_ALL, `threads` intra-op threads (None: onnxruntime's choice); `spinning=False` lets idle
    pool threads sleep instead of busy-waiting for work (what a CPU shared with other processes needs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: the CPU fallback warnings of the CUDA EP are reported by us
    return so


def session_from_model(ort: Any, model: onnx.ModelProto, so: Any, providers: list[Any]) -> Any:
    """An InferenceSession for an in-memory model; models past the protobuf limit go through a temporary
    directory with external data, deleted once the session has read it."""
    if fits_in_memory_proto(model):
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with external_data_copy(model, "diffit-ort-") as path:
        return ort.InferenceSession(str(path), so, providers=providers)


class OrtDenoiser:
    """One ONNX Runtime session behind the `Denoiser` protocol. With `io_binding`, feeds are copied into
    device buffers kept per batch size (the same addresses every step, which CUDA graphs require) and the
    output is written into a preallocated device OrtValue, then copied to the host once."""

    def __init__(self, session: Any, *, name: str, device: str, precision: str, out_channels: int,
                 io_binding: bool = False, device_id: int = 0, cuda_graph: bool = False,
                 open_loop_session: Callable[[Any], Any] | None = None, async_loop: bool = False):
        self.session, self.name, self.device, self.precision = session, name, device, precision
        self.async_loop = async_loop
        self._open_loop_session, self._device_loop = open_loop_session, None
        self.provider = session.get_providers()[0]
        self.out_channels = out_channels
        self.io_binding, self.device_id, self.cuda_graph = io_binding, device_id, cuda_graph
        self._inputs = {i.name: _NP_TYPES[i.type] for i in session.get_inputs()}
        self._output = session.get_outputs()[0].name
        self._bound: dict[tuple[int, ...], tuple[Any, dict[str, Any], Any, Any]] = {}
        self._bound_runs: collections.Counter = collections.Counter()   # input shape -> bound runs so far
        self._streams: list[Any] = [session]      # CPU: the sessions one call's row chunks run on at once
        self._pool: ThreadPoolExecutor | None = None

    @property
    def streams(self) -> int:
        return len(self._streams)

    def add_streams(self, sessions: list[Any]) -> None:
        """Split every call into 1 + len(sessions) row chunks, run at once: this session takes the first chunk
        on the calling thread, each added session one more on a thread of its own (onnx-cpu)."""
        self._streams += sessions
        self._pool = ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="diffit-ort-stream")

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, guidance: np.ndarray | None = None) -> np.ndarray:
        feeds = graph_feeds(self._inputs, x, t, y, guidance)
        if self.io_binding:
            return self._run_bound(feeds)
        chunks = row_chunks(len(x), self.streams)
        part = lambda s, rows: s.run([self._output], {k: v[rows] for k, v in feeds.items()})[0]  # noqa: E731
        later = [self._pool.submit(part, s, rows) for s, rows in zip(self._streams[1:], chunks[1:])]
        out = [part(self.session, chunks[0]), *[f.result() for f in later]]
        return np.asarray(out[0] if len(out) == 1 else np.concatenate(out), dtype=np.float32)

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        key = feeds["x"].shape
        capture = self._bound_runs[key] < CAPTURE_RUNS
        with GATE.hold(capture, cuda_graph=self.cuda_graph):
            out = self._run_bound_here(feeds)
        self._bound_runs[key] += 1
        return out

    def _run_bound_here(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import onnxruntime as ort

        x = feeds["x"]
        key = x.shape
        if key not in self._bound:
            binding = self.session.io_binding()
            values = {}
            for k, arr in feeds.items():
                values[k] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", self.device_id)
                binding.bind_ortvalue_input(k, values[k])
            out_shape = (x.shape[0], self.out_channels, *x.shape[2:])
            out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, "cuda", self.device_id)
            binding.bind_ortvalue_output(self._output, out)
            run_options = ort.RunOptions()
            if self.cuda_graph:
                # One captured graph per input shape (the last batch of a run may be smaller).
                run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound)))
            self._bound[key] = (binding, values, out, run_options)
        else:
            binding, values, out, run_options = self._bound[key]
            for k, arr in feeds.items():
                values[k].update_inplace(arr)  # host -> the same device buffer
        self.session.run_with_iobinding(binding, run_options)
        return out.numpy()

    @property
    def device_loop(self) -> Any:
        """The `DeviceLoop` on this session's device (built on first use; its sessions hold the sampler
        update as well). Raises ValueError for a graph the loop cannot drive (in-graph guidance)."""
        if self._device_loop is None:
            if self._open_loop_session is None or "guidance" in self._inputs:
                raise ValueError(f"the device loop needs the plain denoiser graph on {self.name} "
                                 "(not the in-graph guidance graph)")
            from .device_loop import DeviceLoop

            time_input = next(k for k in self._inputs if k not in ("x", "y"))
            self._device_loop = DeviceLoop(self._open_loop_session, device="cpu" if self.device == "cpu" else "cuda",
                                           device_id=self.device_id, cuda_graph=self.cuda_graph,
                                           out_channels=self.out_channels, time_input=time_input,
                                           async_runs=self.async_loop)
        return self._device_loop

    def close(self) -> None:
        self._bound.clear()
        if self._device_loop is not None:
            self._device_loop.close()
        self._device_loop = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._streams = []
        self.session = None


def check_precision(package: Package, precision: str | None, allowed: tuple[str, ...]) -> None:
    """ValueError unless `precision` is None (the runtime's default) or one of `allowed`."""
    if precision is not None and precision not in allowed:
        raise ValueError(f"precision {precision!r} is not available here (choose from {', '.join(allowed)})")


# Streams by default only while the weights are this small: each stream is a session with its own copy.
STREAMS_MAX_WEIGHT_BYTES = 256 << 20


def cpu_streams(package: Package, graph: str, threads: int | None, streams: int | None) -> tuple[int, int | None]:
    """(sessions per denoiser, intra-op threads per session) for onnx-cpu. Given `streams` are kept (threads:
    `threads`, else the CPUs shared out); by default two streams of half the CPUs each, on a machine of two or
    more CPUs, unless `threads` was given (then one session with that many) or the graph's weights are over
    STREAMS_MAX_WEIGHT_BYTES. On the 2-core machine two one-thread sessions ran the digits model 1.5x faster
    than one two-thread session with a competing process, and -8% to +20% on a quiet machine (docs/BENCHMARKS_CPU.md):
    one thread per session has no pool to spin or to wait for at each op."""
    cpus = os.cpu_count() or 1
    if streams is None:
        small = package.graph_bytes(graph) <= STREAMS_MAX_WEIGHT_BYTES
        streams = 2 if threads is None and cpus >= 2 and small else 1
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    if streams > 1 and threads is None:
        threads = max(1, cpus // streams)
    return streams, threads


def prepare_onnx_cpu(package: Package, *, graph: str = "denoiser", threads: int | None = None,
                     precision: str | None = None, spinning: bool = True, streams: int | None = None,
                     channel_norms: bool = False, int8: bool = False, cache_dir: str | None = None,
                     mha: bool = True, fusions: bool = True) -> Callable[[str | None], OrtDenoiser]:
    """Opens sessions of the package's graph on the CPU execution provider, ORT_ENABLE_ALL, `threads` intra-op
    threads (None: onnxruntime's choice), `spinning` as for session_options, each call split over `streams`
    sessions (cpu_streams gives the defaults): call the result with a device (None or "cpu") for each session.
    `mha`: each custom node runs as com.microsoft.MultiHeadAttention with q, k and v from three MatMuls
    (ort_graph.rewrite_to_mha, qkv="separate"; ~0.01 s at load, 15% off a digits call on one thread), and
    `fusions` (any true value: "auto" passes onnx-cuda's on) each tanh GELU as one FastGelu (ort_graph.fuse_gelu;
    0.07 s at load, 13% more: docs/BENCHMARKS_CPU.md);
    mha=False, fusions=False runs the graph exactly as shipped, the custom node through its model-local function.
    `channel_norms`: the GroupNorms from per-channel statistics (group_norm.py; measured, not the default).
    `int8`: int8 convolutions (ort_int8.py), calibrated once, when the first session opens; with `cache_dir`, the
    calibrated graph is kept there and later loads of the same package reuse it."""
    ort = import_ort()
    check_precision(package, precision, (package.precision,))
    if int8 and package.precision != "fp32":
        raise ValueError(f"int8 quantization starts from an fp32 package; this one is {package.precision}")
    if cache_dir and not int8:
        raise ValueError("onnx-cpu's cache directory keeps the calibrated int8 graph: it needs int8")
    path = str(package.graph_path(graph))
    n_streams, stream_threads = cpu_streams(package, graph, threads, streams)
    prepared: list[onnx.ModelProto] = []
    lock = threading.Lock()     # device loops in several threads attach their update to the one prepared model in turn

    def rewritten() -> onnx.ModelProto:
        model = onnx.load(path)
        if channel_norms:
            per_channel_group_norms(model)
        if mha:
            rewrite_to_mha(model, qkv="separate")
        return fuse_gelu(model) if fusions else model

    def load() -> onnx.ModelProto:
        if prepared:
            return prepared[0]
        if int8:      # the float graph is read and rewritten only when no cache entry holds the result
            so = session_options(ort, threads, spinning)
            build = lambda: _int8_model(ort, package, graph, rewritten(), so)  # noqa: E731
            key = cache_path(cache_dir, package, graph, channel_norms, mha, fusions) if cache_dir else None
            prepared.append(cached(key, build) if key else build())
        else:
            prepared.append(rewritten())
        return prepared[0]

    def open_session(device: str | None = None) -> OrtDenoiser:
        if device not in (None, "cpu", "CPU"):
            raise ValueError(f"onnx-cpu runs on the CPU only, not {device!r} (use onnx-cuda for a GPU)")
        model = load() if channel_norms or int8 or mha or fusions else None

        def session() -> Any:
            so = session_options(ort, stream_threads, spinning)
            if model is None:
                return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            return session_from_model(ort, model, so, ["CPUExecutionProvider"])

        opened = [session() for _ in range(n_streams)]

        def open_loop_session(spec: Any) -> Any:
            with lock, attached(load(), spec) as model:
                return session_from_model(ort, model, session_options(ort, threads, spinning), ["CPUExecutionProvider"])

        d = OrtDenoiser(opened[0], name="onnx-cpu", device="cpu", precision=package.precision,
                        out_channels=package.model.out_channels, open_loop_session=open_loop_session)
        if n_streams > 1:
            d.add_streams(opened[1:])
        if int8:
            d.provider += " (int8 convolutions)"
        return d

    return open_session


def _int8_model(ort: Any, package: Package, graph: str, model: onnx.ModelProto, so: Any) -> onnx.ModelProto:
    """`model` (the graph onnx-cpu's options made) quantized by ort_int8.quantize_int8, calibrated on the inputs that
    the package's default sampling gives an fp32 session of it."""
    require_convs(model)                  # before the calibration run, wasted on a latent model
    name_nodes(model)
    calibration = session_from_model(ort, model, so, ["CPUExecutionProvider"])
    feeds = calibration_feeds(package, graph, calibration, lambda s: OrtDenoiser(
        s, name="onnx-cpu", device="cpu", precision="fp32", out_channels=package.model.out_channels))
    return quantize_int8(model, feeds)


def create_onnx_cpu(package: Package, *, device: str | None = None, **opts: Any) -> OrtDenoiser:
    """One onnx-cpu session; `opts` as for prepare_onnx_cpu."""
    return prepare_onnx_cpu(package, **opts)(device)


def create_graph_session(path: str | Path, *, cuda_device: int | None = None, threads: int | None = None) -> Any:
    """A plain session for an auxiliary graph (the VAE decoder) on the CPU, or the CUDA EP when given."""
    ort = import_ort()
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda_device is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": str(cuda_device), "use_tf32": "0"}))
    return ort.InferenceSession(str(path), session_options(ort, threads), providers=providers)
