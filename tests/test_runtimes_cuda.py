"""onnx-cuda against torch on a GPU (pytest -m gpu on the GPU host): fp32 parity, TF32 and fp16 figures, IO binding and
CUDA graphs, two devices, and CUDA-graph sessions side by side. Self-contained: the packages are built in tmp."""

from __future__ import annotations

import numpy as np
import pytest

from diffit_port.package import load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.generate import SamplingConfig, default_labels, generate
from runtime_helpers import FP16_STEP_ATOL, LOOP_ATOL, STEP_ATOL, cuda_count, needs_cuda, step_inputs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["tiny", "tiny-latent"])
def test_cuda_fp32_parity(packages, kind):
    package = load_package(packages(kind))
    torch_d = create_denoiser("torch", package)
    x, t, y = step_inputs(package)
    ref = torch_d(x, t, y)
    variants = {"plain": dict(mha=False, fusions=False), "mha": dict(fusions=False), "mha+fusions": {}}
    errs = {}
    for label, opts in variants.items():
        d = create_denoiser("onnx-cuda", package, **opts)
        assert d.provider == "CUDAExecutionProvider" and d.precision == "fp32"
        errs[label] = float(np.abs(d(x, t, y) - ref).max())
    print(f"\n{kind} onnx-cuda fp32 (tf32 off) step vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= STEP_ATOL, errs
    cfg = SamplingConfig(sampler="ddim", steps=20, num_images=4, batch_size=4, guidance=2.0,
                         guide_channels=package.sampling.get("guide_channels", 0))
    labels = default_labels(package, 4)
    loop = float(np.abs(generate([create_denoiser("onnx-cuda", package)], package, cfg, labels)
                        - generate([torch_d], package, cfg, labels)).max())
    print(f"{kind} onnx-cuda 20-step DDIM vs torch: {loop:.2e}")
    assert loop <= LOOP_ATOL


@pytest.mark.gpu
@needs_cuda
def test_cuda_tf32_and_fp16_figures(packages):
    """Reported, with loose bounds: TF32 matmuls (10-bit mantissa) and the fp16 conversion."""
    for kind in ("tiny", "tiny-latent"):
        package = load_package(packages(kind))
        x, t, y = step_inputs(package)
        ref = create_denoiser("torch", package)(x, t, y)
        errs = {}
        for label, opts in {"tf32": dict(use_tf32=True), "fp16": dict(precision="fp16")}.items():
            d = create_denoiser("onnx-cuda", package, **opts)
            assert d.precision == label
            out = d(x, t, y)
            errs[label] = (float(np.abs(out - ref).max()), float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
        print(f"\n{kind} onnx-cuda vs torch fp32 (max|diff|, rel L2): "
              + ", ".join(f"{k} {a:.2e}/{r:.2e}" for k, (a, r) in errs.items()))
        assert all(a <= FP16_STEP_ATOL for a, _ in errs.values()), errs


@pytest.mark.gpu
@needs_cuda
def test_cuda_io_binding_and_cuda_graph(packages):
    package = load_package(packages("tiny"))
    x, t, y = step_inputs(package)
    unbound = create_denoiser("onnx-cuda", package, io_binding=False)(x, t, y)
    bound = create_denoiser("onnx-cuda", package)
    assert bound.io_binding
    for _ in range(3):  # buffers are reused: repeated calls and a second batch size stay right
        np.testing.assert_allclose(bound(x, t, y), unbound, atol=1e-6, rtol=0)
        np.testing.assert_allclose(bound(x[:1], t[:1], y[:1]), unbound[:1], atol=1e-6, rtol=0)
    graph = create_denoiser("onnx-cuda", package, cuda_graph=True)
    for _ in range(3):
        np.testing.assert_allclose(graph(x, t, y), unbound, atol=1e-6, rtol=0)
    x2 = x[::-1].copy()  # new contents in the captured buffers
    np.testing.assert_allclose(graph(x2, t[::-1].copy(), y[::-1].copy()), unbound[::-1], atol=1e-6, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(cuda_count() < 2, reason="needs 2 GPUs")
def test_cuda_two_devices_split(packages, tmp_path):
    from click.testing import CliRunner

    from diffit_port.runtimes.cli import main

    pkg = str(packages("tiny"))
    args = ["--package", pkg, "--runtime", "onnx-cuda", "--num-images", "6", "--batch-size", "2", "--steps", "5",
            "--no-progress"]
    runner = CliRunner()
    one = runner.invoke(main, [*args, "--device", "0", "--output", str(tmp_path / "a.png"),
                               "--save-npy", str(tmp_path / "a.npy")])
    two = runner.invoke(main, [*args, "--devices", "0,1", "--output", str(tmp_path / "b.png"),
                               "--save-npy", str(tmp_path / "b.npy")])
    assert one.exit_code == 0 and two.exit_code == 0, (one.output, two.output)
    assert "device=cuda:0,cuda:1" in two.output
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"), atol=1e-5, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("loop", [[], ["--device-loop"]], ids=["host-loop", "device-loop"])
def test_cuda_graph_sessions_side_by_side(tmp_path, loop):
    """Two sessions with CUDA graphs in two threads of one process (`--devices 0,0`: one GPU gives the same
    threads as two) capture their graphs while the other runs, uploads and reads: onnxruntime captures in CUDA's
    global capture mode, under which another thread's allocation or synchronous copy is a prohibited call. The
    images are the single session's. Without the capture gate the shipped package's run failed 4 times in 4 ("CUDA
    failure 900: operation not permitted when stream is capturing", H100); the tiny package's calls were too short
    to collide."""
    from click.testing import CliRunner

    from diffit_port.runtimes.cli import main

    args = ["--runtime", "onnx-cuda", "--cuda-graph", "--precision", "fp16", *loop, "--num-images", "128",
            "--batch-size", "32", "--steps", "8", "--no-progress"]
    runs = {}
    for name, where in (("one", ["--device", "0"]), ("two", ["--devices", "0,0"])):
        r = CliRunner().invoke(main, [*args, *where, "--output", str(tmp_path / f"{name}.png"),
                                      "--save-npy", str(tmp_path / f"{name}.npy")])
        assert r.exit_code == 0, r.output
        runs[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_allclose(runs["two"], runs["one"], atol=1e-5, rtol=0)
