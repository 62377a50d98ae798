"""The capture gate's order while several session threads run: a capture runs alone, after the work in flight, and
work asked for while a capture waits or runs waits for it; with one session thread it is open (the GPU side:
test_runtimes.py::test_cuda_graph_sessions_side_by_side)."""

from __future__ import annotations

import threading

import numpy as np

from diffit_port.runtimes.capture_gate import CaptureGate


class _Worker:
    """A thread that takes the gate (alone when `capture`), says so, and keeps it until released."""

    def __init__(self, gate: CaptureGate, name: str, capture: bool, log: list[str]):
        self.entered, self.release = threading.Event(), threading.Event()

        def body() -> None:
            with gate.hold(capture):
                log.append(f"{name} in")
                self.entered.set()
                self.release.wait(10)
                log.append(f"{name} out")
        self.thread = threading.Thread(target=body, name=name)
        self.thread.start()

    def waits(self) -> bool:
        """Still kept out after a while (a blocked thread can only look free too early, never the reverse)."""
        return not self.entered.wait(0.2)

    def enters(self) -> bool:
        return self.entered.wait(10)


def test_a_capture_waits_for_the_work_in_flight_and_holds_back_new_work():
    gate = CaptureGate()
    with gate.threads(2):
        _capture_between_runs(gate)


def _capture_between_runs(gate: CaptureGate) -> None:
    log: list[str] = []
    run1 = _Worker(gate, "run1", False, log)
    assert run1.enters()
    capture = _Worker(gate, "capture", True, log)
    assert capture.waits()                            # for the run in flight
    run2 = _Worker(gate, "run2", False, log)          # asked for while the capture waits
    assert run2.waits()
    run1.release.set()
    assert capture.enters() and run2.waits()
    run3 = _Worker(gate, "run3", False, log)          # asked for while the capture runs
    assert run3.waits()
    capture.release.set()
    assert run2.enters() and run3.enters()            # the two runs share it
    assert log[:4] == ["run1 in", "run1 out", "capture in", "capture out"]
    for w in (run2, run3):
        w.release.set()
        w.thread.join(10)
        assert not w.thread.is_alive()


def test_the_gate_is_open_with_one_session_thread():
    """One session thread (a run on one device): its runs and captures never wait (its own worker starts after its
    captures), before, during and after a run on several."""
    gate = CaptureGate()
    for threads in (0, 1):
        with gate.threads(threads):
            _open(gate)
    with gate.threads(2):
        pass
    _open(gate)


def test_sessions_without_cuda_graphs_pass_the_gate():
    """A session without CUDA graphs captures nothing: it neither waits for the gate nor closes it to others."""
    gate = CaptureGate()
    with gate.threads(2):
        log: list[str] = []
        run = _Worker(gate, "run", False, log)
        assert run.enters()
        with gate.hold(True, cuda_graph=False):
            log.append("plain in")
        assert log == ["run in", "plain in"]
        run.release.set()
        run.thread.join(10)


def _open(gate: CaptureGate) -> None:
    log: list[str] = []
    run = _Worker(gate, "run", False, log)
    assert run.enters()
    with gate.hold(True):       # would wait for the run in flight if the gate were closed
        log.append("capture in")
    assert log == ["run in", "capture in"]
    run.release.set()
    run.thread.join(10)


class _Probe:
    """A stand-in denoiser that records whether the process's capture gate is closed when it is called."""

    name, device, precision, provider = "probe", "cpu", "fp32", "none"

    def __init__(self, seen: list[bool]):
        self.seen = seen

    def __call__(self, x, t, y, guidance=None):
        from diffit_port.runtimes.capture_gate import GATE

        self.seen.append(GATE._threads > 1)
        return np.zeros_like(x)

    def close(self) -> None:
        pass


def test_a_run_on_several_sessions_closes_the_gate_while_it_runs():
    from diffit_port.package import default_package_path, load_package
    from diffit_port.runtimes.capture_gate import GATE
    from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate

    package = load_package(default_package_path())
    cfg = SamplingConfig.from_package(package, steps=1, num_images=4, batch_size=1, sampler="heun")
    for sessions, closed in ((1, False), (2, True)):
        seen: list[bool] = []
        generate([_Probe(seen) for _ in range(sessions)], package, cfg, default_labels(package, 4))
        assert seen and all(s == closed for s in seen)
        assert GATE._threads == 0
