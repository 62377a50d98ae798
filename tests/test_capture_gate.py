"""The capture gate's order: a capture runs alone, after the work in flight, and work asked for while a capture
waits or runs waits for it (the GPU side: test_runtimes.py::test_cuda_graph_sessions_side_by_side)."""

from __future__ import annotations

import threading
import time

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
    gate.join()
    gate.join()
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


def test_the_gate_is_open_with_one_cuda_graph_session():
    """One session in the process: its runs and captures never wait (its own worker starts after its captures)."""
    gate = CaptureGate()
    gate.join()
    log: list[str] = []
    hold = threading.Event()
    t = _worker(gate, "run", False, log, hold)
    _settle()
    with gate.hold(True):
        log.append("capture in")
    assert log == ["run in", "capture in"]
    hold.set()
    t.join(5)
    gate.join()
    gate.leave()
    with gate.hold(True):    # one session again after a second one closed
        pass
