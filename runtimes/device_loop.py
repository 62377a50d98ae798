"""The whole sampling loop on the ONNX Runtime device: one session run per denoiser call (the denoiser graph
with the sampler update of `loop_graph` appended), state and tables in device buffers bound through IO
binding, the final samples copied to the host once per batch.

What crosses the bus per batch: the first state (x_T scaled, float64; EDM's churn before the first call
included) and the first input, the labels, the time inputs, the coefficient table (float64) and, for samplers
with fresh noise per step (ddpm, ddim with eta > 0, edm-stochastic), every step's noise drawn from the
per-image streams up front in the host sampler's order (n_calls x B x C x H x W float64), all uploaded once;
the device checks every call's state and output for non-finite values and keeps the first bad call's code, which
comes back (an int64) once at least CHECK_SECONDS have passed since the last read, and after the last call;
the samples come back at the end. The NumPy samplers stay the reference (tests/test_device_loop.py).
"""

from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Iterator

import numpy as np

from diffit_port.samplers import Churn, EDMSchedule, NoiseSource, NonFiniteError, Schedule

from .capture_gate import CAPTURE_RUNS, GATE
from .loop_graph import NOT_FOUND, P, LoopSpec
from .loop_plan import LoopPlan, make_plan

# LoopSpec -> an InferenceSession of the denoiser graph with that update attached (see loop_graph.attached)
OpenLoopSession = Callable[[LoopSpec], Any]

# How often the loop reads the device's non-finite code back, in seconds of calls. The code holds the first
# bad call whenever it is read, so a later read gives the same error; it only lets a failed batch run on for
# up to this long. Each read stalls the loop for ~0.1 ms on a GPU host (docs/BENCHMARKS_GPU.md).
CHECK_SECONDS = 0.1


@dataclass
class _Batch:
    """A batch whose host inputs are uploaded, ready to run."""

    plan: LoopPlan
    spec: LoopSpec
    buf: "_Buffers"
    timings: dict[str, float]


@dataclass
class _Buffers:
    """Device buffers of one (spec, batch, calls, slot): two sides of the ping-pong state and fixed tables, bound to
    the sessions of 1 and of calls_per_run calls a run."""

    sides: list[dict[str, Any]]      # side -> {graph name: OrtValue}; run r reads side r % 2
    fixed: dict[str, Any]            # y, loop/coef, loop/t_table[, loop/noise, loop/guide]
    bindings: dict[int, list[Any]]   # calls a run -> IOBinding per parity
    run_options: dict[int, list[Any]]
    runs: collections.Counter = field(default_factory=collections.Counter)   # (calls a run, parity) -> runs so far


class DeviceLoop:
    """Runs samplers on the device of one ONNX Runtime session family (CPU or CUDA EP).

    `open_session(spec)` opens a session of the denoiser with the update of `spec` attached (one per spec,
    cached); `device` is "cpu" or "cuda"; with `cuda_graph` the sessions were opened with CUDA graphs on and
    each (shape, parity) gets its own captured graph. With `async_runs` (CUDA without CUDA graphs) a run
    returns once its work is queued on the GPU (onnxruntime's disable_synchronize_execution_providers) and the
    loop waits for the GPU only where it reads, so the host's work for call n + 1 overlaps the GPU's call n
    (digits 523 -> 516 ms, image-cifar10 2413 -> 2383 ms a loop, docs/BENCHMARKS_GPU.md round 9). onnxruntime
    waits for the GPU after every replay of a captured graph, so with `cuda_graph` it is off. `fused_update` runs
    the update as one matrix product where it is affine (LoopSpec.matrix); None takes it on the CPU EP (where it
    gives the host loop's samples bit for bit with one session) and the column update on CUDA, where the two tie
    (H100, round 11: digits 10.54 ms a step with the matrix against 10.51 with the columns, image-cifar10 25.32
    against 25.33). `ahead` prepares the next batch of `iter_batches` on a worker thread; None
    takes it with CUDA graphs, where it was measured (time outside the denoiser digits 2.8 -> 2.1%, image-cifar10
    1.06 -> 0.83%, round 11), and not elsewhere (on a 2-core host the worker would compete with the denoiser for
    the cores). `calls_per_run` chains that many calls in one session run (no measurable gain, round 11)."""

    def __init__(self, open_session: OpenLoopSession, *, device: str, device_id: int = 0, cuda_graph: bool = False,
                 out_channels: int, time_input: str = "t", async_runs: bool = False, fused_update: bool | None = None,
                 ahead: bool | None = None, calls_per_run: int = 1):
        import onnxruntime as ort

        self._ort, self._open = ort, open_session
        self.device, self.device_id, self.cuda_graph = device, device_id, cuda_graph
        self.async_runs = async_runs and device == "cuda" and not cuda_graph
        self.out_channels, self.time_input = out_channels, time_input
        self.fused_update = device != "cuda" if fused_update is None else fused_update
        self.ahead = cuda_graph if ahead is None else ahead   # iter_batches: next batch's inputs on a worker thread
        self.calls_per_run = calls_per_run   # denoiser calls chained in one session run (loop_graph.chain_steps)
        self._sessions: dict[LoopSpec, Any] = {}
        self._buffers: dict[tuple[LoopSpec, int, int, int, int], _Buffers] = {}   # spec, rows, calls, slot, steps
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._last: tuple[LoopSpec, _Buffers, list[int]] | None = None   # the last batch: spec, buffers, runs
        self._graph_ids = itertools.count()
        self.timings: dict[str, float] = {}

    def sample(self, sampler: str, noise: NoiseSource, shape: tuple[int, ...], y: np.ndarray,
               schedule: Schedule | EDMSchedule, steps: int, *, callback: Callable[[int, int], None] | None = None,
               check_seconds: float | None = None, **kwargs: Any) -> np.ndarray:
        """float32 `shape` x_0 of one batch, as samplers.sample with sampler-side guidance (when `null_label`
        is given and guidance is on) would return it, for either contract (the schedule's type picks the
        samplers, as there); `kwargs`: null_label, guidance, guidance_schedule, guidance_power, guide_channels, eta,
        churn, clip_denoised, as there. Raises NonFiniteError naming the first call whose state or output was not
        finite (read back after a call once `check_seconds` (None: CHECK_SECONDS) have passed since the last read, 0:
        after every call, and after the last call). `timings` then holds where the batch's wall time went (seconds):
        host inputs, uploads, the calls, the non-finite checks, the download."""
        return self._finish(self._start(sampler, noise, tuple(shape), y, schedule, steps, **kwargs), callback,
                            check_seconds)

    def iter_batches(self, sampler: str, noise: NoiseSource, shape_chw: tuple[int, ...], labels: np.ndarray,
                     schedule: Schedule | EDMSchedule, steps: int, *, batch_size: int,
                     callback: Callable[[int, int], None] | None = None, check_seconds: float | None = None,
                     **kwargs: Any) -> Iterator[tuple[int, np.ndarray]]:
        """(first image, float32 x_0) of each batch of `batch_size` images (image i from stream i of `noise`), in
        order, as `sample` makes them. With `ahead` a worker thread draws the next batch's host inputs and uploads
        them into a second set of device buffers while the current batch's calls run, so a run of several batches
        spends neither on the loop's thread (docs/BENCHMARKS.md, "The sampling loop on the device")."""
        n = noise.num_images
        spans = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
        ahead = self.ahead and len(spans) > 1

        def start(i: int) -> _Batch:
            a, b = spans[i]
            with np.errstate(all="ignore"):
                return self._start(sampler, noise.split(a, b), (b - a, *shape_chw), labels[a:b], schedule, steps,
                                   slot=i % 2 if ahead else 0, **kwargs)

        pending: Future | None = None
        for i, (a, _) in enumerate(spans):
            t0 = time.perf_counter()
            prepared_ahead = pending is not None
            batch = pending.result() if prepared_ahead else start(i)
            waited = time.perf_counter() - t0
            pending = None
            # The worker starts once this batch's CUDA graphs are captured (onnxruntime captures in global mode:
            # another thread's allocation or copy would break a capture under way).
            submit_at = self._captured_after(batch.buf, self._runs(batch.plan.num_calls))

            def after_call(n: int, i: int = i) -> None:
                nonlocal pending
                if n == submit_at and ahead and i + 1 < len(spans):
                    pending = self._worker().submit(start, i + 1)

            try:
                x0 = self._finish(batch, callback, check_seconds, after_call)
                if prepared_ahead:   # the host inputs and the upload ran on the worker; this thread waited `waited`
                    self.timings.update(ahead_s=self.timings.pop("host_inputs_s") + self.timings.pop("upload_s"),
                                        waited_s=waited)
                yield a, x0
            except BaseException:    # an error, or the caller stopped early (GeneratorExit)
                if pending is not None:   # never leave the worker writing buffers after the loop has stopped
                    wait([pending])
                raise

    def close(self) -> None:
        """Stops the worker thread of `iter_batches` (sessions and buffers go with the object)."""
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)
            self._ahead_pool = None

    def step_seconds(self, reps: int = 10) -> float:
        """Median seconds of one session run (denoiser + update): the last batch's last call run again (last_call)."""
        run, times = self.last_call(), []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[2:]))

    def last_call(self) -> Callable[[], None]:
        """A function that runs the last batch's last call once more on its buffers: it reads the side that call
        read, whose call index is still valid, and writes the other side, so its input does not change (the
        batch's samples were already copied out). Each run counts towards the buffers' captured CUDA graphs."""
        spec, buf, runs = self._last
        session, parity = self._session(spec), (len(runs) - 1) % 2
        bind, opts = buf.bindings[1][parity], buf.run_options[1][parity]

        def run() -> None:
            with self._hold(buf.runs[1, parity] < CAPTURE_RUNS):
                session.run_with_iobinding(bind, opts)
            if self.async_runs:
                bind.synchronize_outputs()
            buf.runs[1, parity] += 1
        return run

    def sample_batches(self, sampler: str, noise: NoiseSource, shape_chw: tuple[int, ...], labels: np.ndarray,
                       schedule: Schedule, steps: int, *, batch_size: int, out: np.ndarray | None = None,
                       **kwargs: Any) -> np.ndarray:
        """As samplers.sample_batches (image i from stream i of `noise`, `batch_size` per run), on the device;
        `kwargs` as for `iter_batches`."""
        n = noise.num_images
        if out is None and 0 < n <= batch_size:       # one batch: its own array
            return self.sample(sampler, noise, (n, *shape_chw), labels[:n], schedule, steps, **kwargs)
        if out is None:
            out = np.empty((n, *shape_chw), dtype=np.float32)
        for a, x0 in self.iter_batches(sampler, noise, shape_chw, labels, schedule, steps, batch_size=batch_size,
                                       **kwargs):
            out[a:a + len(x0)] = x0
        return out

    # ------------------------------------------------------------------------------------------------

    def _start(self, sampler: str, noise: NoiseSource, shape: tuple[int, ...], y: np.ndarray,
               schedule: Schedule | EDMSchedule, steps: int, *, slot: int = 0, null_label: int | None = None,
               guidance: float = 1.0, guidance_schedule: str = "constant", guidance_power: float = 4.0,
               guide_channels: int = 0, eta: float = 0.0, churn: Churn | None = None,
               clip_denoised: bool = False) -> _Batch:
        """One batch's plan, its host inputs and their upload into the buffers of `slot` (0 or 1)."""
        B, C = int(shape[0]), int(shape[1])
        guided = null_label is not None and not (guidance == 1.0 and guidance_schedule == "constant")
        t0 = time.perf_counter()
        plan = make_plan(sampler, schedule, steps, clip=clip_denoised, eta=eta, churn=churn,
                         learned_variance=self.out_channels == 2 * C, guidance=guidance if guided else 1.0,
                         guidance_schedule=guidance_schedule if guided else "constant", guidance_power=guidance_power)
        k = guide_channels or C
        if guided and not 0 < k <= C:
            raise ValueError(f"guide_channels={guide_channels} must be in 0..{C}")
        ones = plan.ones()
        ones = ones[1:] if ones == plan.used() else ones   # one column stays in the table (1 step of dpmpp-2m)
        spec = LoopSpec(tuple(c for c in plan.used() if c not in ones), clip_denoised, bool(plan.noise.any()), guided,
                        k, C, self.out_channels, ones, self.fused_update)
        feeds = self._host_inputs(plan, spec, noise, shape, np.asarray(y, dtype=np.int64), null_label)
        t1 = time.perf_counter()
        with self._hold():
            buf = self._prepare(spec, feeds, B * (2 if guided else 1), plan.num_calls, slot)
        return _Batch(plan, spec, buf, {"host_inputs_s": t1 - t0, "upload_s": time.perf_counter() - t1})

    def _finish(self, batch: _Batch, callback: Callable[[int, int], None] | None, check_seconds: float | None,
                after_call: Callable[[int], None] | None = None) -> np.ndarray:
        self.timings = dict(batch.timings)
        self._last = (batch.spec, batch.buf, self._runs(batch.plan.num_calls))
        return self._run(batch.buf, batch.plan, batch.spec, callback,
                         CHECK_SECONDS if check_seconds is None else float(check_seconds), after_call)

    def _runs(self, n_calls: int) -> list[int]:
        """Calls per session run: calls_per_run at a time, then single calls for the rest."""
        k = max(1, min(self.calls_per_run, n_calls))
        return [k] * (n_calls // k) + [1] * (n_calls % k)

    def _captured_after(self, buf: _Buffers, runs: list[int]) -> int:
        """The call after which every CUDA graph these runs use has been captured (0 without CUDA graphs; the
        last call when some graph is still to be captured in a later batch)."""
        if not self.cuda_graph:
            return 0
        seen, n = collections.Counter(buf.runs), 0
        used = {(k, r % 2) for r, k in enumerate(runs)}
        for r, k in enumerate(runs):
            seen[k, r % 2] += 1
            n += k
            if all(seen[u] >= CAPTURE_RUNS for u in used):
                return n - 1
        return n - 1

    def _hold(self, capture: bool = False) -> ContextManager[None]:
        """The process's capture gate around one piece of this loop's CUDA work (capture_gate; CUDA graphs only)."""
        return GATE.hold(capture, cuda_graph=self.cuda_graph)

    def _worker(self) -> ThreadPoolExecutor:
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffit-loop-ahead")
        return self._ahead_pool

    def _host_inputs(self, plan: LoopPlan, spec: LoopSpec, noise: NoiseSource, shape: tuple[int, ...],
                     y: np.ndarray, null_label: int | None) -> dict[str, np.ndarray]:
        """Every upload of one batch, drawn in the host sampler's order: x_T, then each noisy call's noise."""
        # in place where the host sampler makes new arrays (the same float64 products): a 256 x 3 x 32 x 32
        # batch spent ~3 ms of its host time on these copies
        x = noise.standard_normal(shape)
        x *= plan.init_scale
        if plan.init_noise:
            x = x + plan.init_noise * noise.standard_normal(shape)
        z = np.zeros((plan.num_calls, *shape)) if spec.noise else None
        for n in np.flatnonzero(plan.noise):
            z[n] = noise.standard_normal(shape)
        B, reps = shape[0], 2 if spec.guided else 1
        x_in = np.empty((B * reps, *shape[1:]), np.float32)        # float32(in_scale0 * x), once per half
        np.multiply(x, plan.in_scale0, out=x_in[:B], casting="unsafe")
        if spec.guided:
            x_in[B:] = x_in[:B]
        t_table = np.repeat(np.append(plan.t, plan.t[-1])[:, None], B * reps, axis=1).astype(np.float32)
        feeds = {"x": x_in, self.time_input: t_table[0].copy(),
                 "y": np.concatenate([y, np.full_like(y, null_label)]) if spec.guided else y,
                 f"{P}x": x, f"{P}n": np.array([0], np.int64),
                 f"{P}bad": np.array([NOT_FOUND], np.int64),
                 f"{P}coef": plan.matrix(spec.state(), spec.guided, spec.noise) if spec.matrix() else
                 plan.table(spec.columns),
                 f"{P}t_table": t_table}
        for s in spec.state()[1:]:
            feeds[f"{P}{s}"] = feeds[f"{P}x"] if s == "base" else np.zeros(shape)
        if z is not None:
            feeds[f"{P}noise"] = z
        if spec.matrix() and spec.guided:
            s = plan.coef["s"].astype(np.float64)
            feeds[f"{P}guide"] = np.stack([s, 1.0 - s], axis=1)[:, None, :]
        return feeds

    def _session(self, spec: LoopSpec) -> Any:
        if spec not in self._sessions:
            self._sessions[spec] = self._open(spec)
        return self._sessions[spec]

    def _value(self, arr: np.ndarray) -> Any:
        # Memory of its own (ortvalue_from_numpy would wrap the array itself on the CPU, and two sides made from
        # one array would alias), filled by _prepare.
        return self._ort.OrtValue.ortvalue_from_shape_and_type(arr.shape, arr.dtype, self.device, self.device_id)

    def _prepare(self, spec: LoopSpec, feeds: dict[str, np.ndarray], batch: int, calls: int,
                 slot: int = 0) -> _Buffers:
        """The buffers of this shape and slot, created and bound once, then refilled in place (the same addresses
        every batch, as captured CUDA graphs need); two slots let one batch be uploaded while another runs."""
        chained = self._runs(calls)[0]                # calls a run (1, or calls_per_run where the batch has that many)
        key = (spec, batch, calls, slot, chained)
        sided = ["x", self.time_input, *[f"{P}{s}" for s in spec.state()], f"{P}n", f"{P}bad"]
        if key not in self._buffers:
            sides = [{k: self._value(feeds[k]) for k in sided} for _ in range(2)]
            fixed = {k: self._value(v) for k, v in feeds.items() if k not in sided}
            buf = _Buffers(sides, fixed, {}, {})
            for steps in sorted({1, chained}):
                buf.bindings[steps], buf.run_options[steps] = zip(*(self._bind(replace(spec, steps=steps), buf, p)
                                                                    for p in range(2)))
            self._buffers[key] = buf
        buf = self._buffers[key]
        for k, v in feeds.items():
            (buf.fixed[k] if k in buf.fixed else buf.sides[0][k]).update_inplace(np.ascontiguousarray(v))
        return buf

    def _bind(self, spec: LoopSpec, buf: _Buffers, parity: int) -> tuple[Any, Any]:
        """The IOBinding and RunOptions of a run of `spec`'s session that reads side `parity` of `buf` and writes
        the other side (each with a CUDA graph id of its own)."""
        src, dst = buf.sides[parity], buf.sides[1 - parity]
        bind = self._session(spec).io_binding()
        for k, v in {**src, **buf.fixed}.items():
            bind.bind_ortvalue_input(k, v)
        outs = {f"{P}x_in": dst["x"], f"{P}t_in": dst[self.time_input], f"{P}n_out": dst[f"{P}n"],
                f"{P}bad_out": dst[f"{P}bad"], **{f"{P}{s}_out": dst[f"{P}{s}"] for s in spec.state()}}
        for k, v in outs.items():
            bind.bind_ortvalue_output(k, v)
        opts = self._ort.RunOptions()
        # -1: no CUDA graph for this run. Always set: onnxruntime 1.32's Python run_with_iobinding reads the key on
        # every run, and a missing key costs a C++ exception (~30 us a run on a 2-core host)
        opts.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)) if self.cuda_graph else "-1")
        if self.async_runs:
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return bind, opts

    def _run(self, buf: _Buffers, plan: LoopPlan, spec: LoopSpec, callback: Callable[[int, int], None] | None,
             check_seconds: float, after_call: Callable[[int], None] | None = None) -> np.ndarray:
        n_calls, runs = plan.num_calls, self._runs(plan.num_calls)
        calls_s = checks_s = 0.0
        last_read = time.perf_counter()
        sessions = {k: self._session(replace(spec, steps=k)) for k in set(runs)}   # looked up once, not per run
        n = 0                                        # calls made
        for r, k in enumerate(runs):
            session, p = sessions[k], r % 2
            t0 = time.perf_counter()
            with self._hold(buf.runs[k, p] < CAPTURE_RUNS):
                session.run_with_iobinding(buf.bindings[k][p], buf.run_options[k][p])
            calls_s += time.perf_counter() - t0
            buf.runs[k, p] += 1
            for c in range(n, n + k):
                if callback is not None:
                    callback(c, n_calls)
                if after_call is not None:
                    after_call(c)
            n += k
            if n == n_calls or time.perf_counter() - last_read >= check_seconds:
                t2 = time.perf_counter()
                if self.async_runs:
                    buf.bindings[k][p].synchronize_outputs()
                with self._hold():
                    code = int(buf.sides[1 - p][f"{P}bad"].numpy()[0])
                last_read = time.perf_counter()
                checks_s += last_read - t2
                if code < 2 * n_calls:   # 2 * n_calls: the final state, which no call reads
                    step, is_out = divmod(code, 2)
                    raise NonFiniteError("denoiser output" if is_out else "sampler state x", step, float(plan.t[step]))
        t0 = time.perf_counter()
        with self._hold():
            out = buf.sides[len(runs) % 2][f"{P}x"].numpy().astype(np.float32)
        self.timings.update(calls_s=calls_s, checks_s=checks_s, download_s=time.perf_counter() - t0)
        return out
