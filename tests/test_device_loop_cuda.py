"""The device loop on CUDA (pytest -m gpu on the GPU host): every way of running the calls against the host loop,
batches prepared ahead, a graph past protobuf's limit, and the capture gate."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from diffit_port import samplers
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from loop_helpers import LOOP_TOL, SHIPPED_SAMPLERS, host_and_device, poisoned_edm_loop
from runtime_helpers import has_cuda_provider


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
@pytest.mark.parametrize("way", ["sync", "graph", "async", "columns", "chain"])
@pytest.mark.parametrize("sampler", SHIPPED_SAMPLERS)
def test_cuda_device_loop_matches_host_loop(sampler, way):
    """Each way of running the calls: waiting for the GPU after each, one CUDA graph each, queued without waiting
    (async_loop: the loop synchronises before it reads the code and the samples); with CUDA graphs also the column
    update and three calls chained in each run."""
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cuda", package, cuda_graph=way in ("graph", "columns", "chain"),
                        async_loop=way == "async")
    d.device_loop.fused_update = way != "columns"
    d.device_loop.calls_per_run = 3 if way == "chain" else 1
    # queued runs: a batch large enough that the GPU is still busy when the host would read too early
    y, steps = (np.arange(64) % 10, 20) if way == "async" else (np.array([1, 4, 7, 9]), 6)
    for guidance in (1.0, 1.5):
        for _ in range(2):   # the second batch reuses the captured graphs and buffers
            host, dev = host_and_device(d, package, sampler, steps, y, null_label=package.model.null_label,
                                        guidance=guidance, clip_denoised=package.diffusion.prediction == "eps")
            err = float(np.abs(dev - host).max())
            print(f"\ncuda {sampler} {way} guidance {guidance}: {err:.2e}")
            assert err <= LOOP_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
@pytest.mark.parametrize("calls_per_run", [1, 4])
def test_cuda_batches_prepared_ahead_match_the_host_loop(calls_per_run):
    """Four batches of 64 digits with CUDA graphs, each batch's successor drawn and uploaded by the worker while the
    batch runs (after its graphs are captured), twice (the second run all on captured graphs); every batch against
    the host loop."""
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cuda", package, cuda_graph=True)
    d.device_loop.calls_per_run, d.device_loop.ahead = calls_per_run, True
    d.device_loop.fused_update = True      # the matrix update with the worker (CUDA's default is the columns)
    schedule = samplers.schedule_from_config(package.diffusion)
    y = np.arange(256) % 10
    kw = dict(null_label=package.model.null_label, guidance=1.5)
    host = samplers.sample_batches("dpmpp-2m", d, samplers.NoiseSource(11, 256), (1, 32, 32), y, schedule, 10,
                                   batch_size=64, **kw)
    for _ in range(2):
        dev = d.device_loop.sample_batches("dpmpp-2m", samplers.NoiseSource(11, 256), (1, 32, 32), y, schedule, 10,
                                           batch_size=64, **kw)
        assert "ahead_s" in d.device_loop.timings
        err = float(np.abs(dev - host).max())
        print(f"\ncuda ahead, {calls_per_run} calls a run: {err:.2e}")
        assert err <= LOOP_TOL
    d.close()


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
def test_cuda_device_loop_of_a_graph_past_the_protobuf_limit(monkeypatch):
    """onnx-cuda opens a prepared graph past protobuf's limit through external data, and then the device loop's
    session from the same prepared model (which that save once left without weights). The limit is lowered so
    that the shipped graph counts as past it (a latent-xl2-256 fp32 graph is, at 2.25 GB)."""
    from diffit_port.runtimes import base

    monkeypatch.setattr(base, "PROTOBUF_LIMIT", 1024)
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cuda", package, cuda_graph=True)
    host, dev = host_and_device(d, package, "dpmpp-2m", 4, np.array([2, 5]), null_label=package.model.null_label,
                                guidance=1.5)
    err = float(np.abs(dev - host).max())
    print(f"\ncuda, graph through external data: {err:.2e}")
    assert err <= LOOP_TOL
    d.close()


def test_cuda_graph_runs_take_the_capture_gate_alone_until_captured(monkeypatch):
    """With CUDA graphs each binding's first CAPTURE_RUNS runs (the plain run and the capture) take the process's
    capture gate alone, and the rest of the loop's device work shares it (capture_gate; wiring checked on the CPU EP,
    which ignores the graph ids)."""
    from diffit_port.runtimes import device_loop

    holds = []

    class Recorder:
        def hold(self, capture=False, *, cuda_graph=True):
            if cuda_graph:
                holds.append(capture)
            return contextlib.nullcontext()

    monkeypatch.setattr(device_loop, "GATE", Recorder())
    loop = poisoned_edm_loop(10, cuda_graph=True, ahead=False)    # poisoned on the 10-step grid: never in 3 steps
    schedule = samplers.EDMSchedule()
    run = lambda: loop.sample("dpmpp-2m", samplers.NoiseSource(0, 2), (2, 1, 4, 4), np.zeros(2, np.int64),  # noqa: E731
                              schedule, 3, check_seconds=0)
    run()
    # upload; then call 0 (side 0's plain run), 1 (side 1's plain run), 2 (side 0's capture), each followed by a read;
    # then the download
    assert holds == [False, True, False, True, False, True, False, False]
    holds.clear()
    run()                     # the same buffers: call 1 is side 1's capture, calls 0 and 2 replay side 0's graph
    assert holds == [False, False, False, True, False, False, False, False]
    holds.clear()
    loop.cuda_graph = False
    run()
    assert holds == []
