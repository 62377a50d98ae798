"""The capture gate's order while several session threads run: a capture runs alone, after the work in flight, and
work asked for while a capture waits or runs waits for it; with one session thread it is open (the GPU side:
test_runtimes.py::test_cuda_graph_sessions_side_by_side)."""

from __future__ import annotations

import threading
import time

import numpy as np

from diffit_port.runtimes.capture_gate import CaptureGate


def _worker(gate: CaptureGate, name: str, capture: bool, log: list[str], release: threading.Event) -> threading.Thread:
    def body() -> None:
        with gate.hold(capture):
            log.append(f"{name} in")
            release.wait(5)
            log.append(f"{name} out")
    thread = threading.Thread(target=body, name=name)
    thread.start()
    return thread


def _settle() -> None:
    time.sleep(0.2)    # long enough for a thread that is free to go on to log its entry


def test_a_capture_waits_for_the_work_in_flight_and_holds_back_new_work():
    gate = CaptureGate()
    with gate.threads(2):
        _capture_between_runs(gate)


def _capture_between_runs(gate: CaptureGate) -> None:
    log: list[str] = []
    go = {n: threading.Event() for n in ("run1", "capture", "run2", "run3")}
    threads = [_worker(gate, "run1", False, log, go["run1"])]
    _settle()
    threads.append(_worker(gate, "capture", True, log, go["capture"]))
    _settle()
    threads.append(_worker(gate, "run2", False, log, go["run2"]))      # asked for while the capture waits
    _settle()
    assert log == ["run1 in"]
    go["run1"].set()
    _settle()
    assert log == ["run1 in", "run1 out", "capture in"]
    threads.append(_worker(gate, "run3", False, log, go["run3"]))      # asked for while the capture runs
    _settle()
    assert log[-1] == "capture in"
    go["capture"].set()
    _settle()
    assert log[3] == "capture out" and sorted(log[4:]) == ["run2 in", "run3 in"]   # the two runs share it
    go["run2"].set()
    go["run3"].set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


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


def _open(gate: CaptureGate) -> None:
    log: list[str] = []
    hold = threading.Event()
    t = _worker(gate, "run", False, log, hold)
    _settle()
    with gate.hold(True):
        log.append("capture in")
    assert log == ["run in", "capture in"]
    hold.set()
    t.join(5)


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
