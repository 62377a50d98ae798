"""A process-wide gate between onnxruntime's CUDA graph captures and the other CUDA work of this package's sessions.

onnxruntime captures a CUDA graph in CUDA's global capture mode: while one thread captures, a potentially unsafe
call from any other thread of the process (an allocation, a synchronous copy) is refused, and the capture under way
is invalidated. A run on several sessions (`--devices 0,1`, or `0,0`) drives each session from a thread of its own
(generate.stream, which closes the gate for as long as those threads run), so with CUDA graphs a capture must run
alone: it takes the gate for itself, and every other piece of CUDA work of a CUDA-graph session (a run, an upload,
a read, a session or buffer made) shares it. Otherwise the gate stays open and costs nothing: one session's own
worker thread starts after its captures (DeviceLoop.iter_batches)."""

from __future__ import annotations

import contextlib
import threading
from typing import ContextManager, Iterator

# onnxruntime runs each CUDA graph id plainly once, then captures it on its second run.
CAPTURE_RUNS = 2


class CaptureGate:
    """A reader-writer gate: captures are the writers (one at a time, alone) and wait for the readers in flight;
    readers wait for a capture under way or queued (a queued capture is never starved by a stream of runs). No
    thread may take it while it holds it (not reentrant)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._capturing = False
        self._queued = 0       # captures waiting for the readers in flight
        self._threads = 0      # session threads running at once (generate.stream)

    @contextlib.contextmanager
    def threads(self, n: int) -> Iterator[None]:
        """`n` threads drive sessions at once for the duration of the block: the gate is closed while more than
        one does."""
        with self._cond:
            self._threads += n
        try:
            yield
        finally:
            with self._cond:
                self._threads -= n

    def hold(self, capture: bool = False, *, cuda_graph: bool = True) -> ContextManager[None]:
        """The gate around one piece of CUDA work of a session: alone when `capture` (a run that may capture a
        graph), shared otherwise; open (no lock taken) for a session without CUDA graphs, or unless several session
        threads run."""
        return self._held(capture) if cuda_graph and self._threads > 1 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _held(self, capture: bool) -> Iterator[None]:
        with self._cond:
            if capture:
                self._queued += 1
                self._cond.wait_for(lambda: not self._capturing and self._readers == 0)
                self._queued -= 1
                self._capturing = True
            else:
                self._cond.wait_for(lambda: not self._capturing and self._queued == 0)
                self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                if capture:
                    self._capturing = False
                else:
                    self._readers -= 1
                self._cond.notify_all()


GATE = CaptureGate()
