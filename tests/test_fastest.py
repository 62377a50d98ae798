"""diffit-run --fastest: what it resolves to on each kind of host (runtimes/fastest.py) and what it samples against
onnx-cpu fp32, on a CUDA host (gpu) and on a CPU host."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffit_port.runtimes.cli import main
from diffit_port.runtimes.fastest import Flags, Host, detect_host, requested_device, resolve
from cli_helpers import BASE, run
from runtime_helpers import LOOP_ATOL, has_cuda_provider, package_path, require_openvino

CUDA, BF16_CPU = Host(cuda=True, openvino=True, cpu_bf16=False), Host(cuda=False, openvino=True, cpu_bf16=True)
FP32_CPU, BARE_CPU = Host(cuda=False, openvino=True, cpu_bf16=False), Host(cuda=False, openvino=False, cpu_bf16=False)
IMAGE = dict(latent=False, in_graph=False)
# the shipped digits model sampled in bf16 against fp32: 0.03 in this test on a Xeon with AMX (2026-12-07), 0.009-0.016
# over 10 steps in benchmarks/sampling.py (docs/BENCHMARKS_CPU.md); another seed's samples are ~2.0 away
BF16_ATOL = 0.1


def test_auto_picks_the_runtime_by_host():
    """auto: onnx-cuda with the CUDA provider (unless --device cpu); else OpenVINO, in bf16 where the CPU has it;
    else onnx-cpu as it is, with a note naming the openvino extra."""
    given = Flags()
    assert resolve("auto", given, CUDA, **IMAGE)[0] == "onnx-cuda"
    assert resolve("auto", given, CUDA, **IMAGE, device="0")[0] == "onnx-cuda"
    cuda_and_bf16 = Host(cuda=True, openvino=True, cpu_bf16=True)
    assert resolve("auto", given, cuda_and_bf16, **IMAGE, device="cpu") == ("openvino", Flags(precision="bf16"), None)
    assert resolve("auto", given, BF16_CPU, **IMAGE) == ("openvino", Flags(precision="bf16"), None)
    assert resolve("auto", given, FP32_CPU, **IMAGE) == ("openvino", given, None)
    runtime, flags, note = resolve("auto", given, BARE_CPU, **IMAGE)
    assert (runtime, flags) == ("onnx-cpu", given) and 'pip install "diffit-port[openvino]"' in note


def test_devices_of_cpu_only_keep_auto_on_the_cpu(pkg, monkeypatch):
    """--devices cpu,cpu weighs as --device cpu (auto stays on the CPU on a CUDA host); CUDA ordinals or a mixed
    list leave the choice to the host, and --device passes through. diffit-run on a CUDA host (the host's facts
    given, a dry run opens no session) runs OpenVINO for --devices cpu,cpu and onnx-cuda for --devices 0."""
    assert requested_device(None, "cpu,CPU") == requested_device(None, " cpu ") == "cpu"
    assert requested_device(None, "0,1") is None and requested_device(None, "cpu,0") is None
    assert requested_device("cpu", None) == "cpu" and requested_device(None, None) is None
    cuda_and_bf16 = Host(cuda=True, openvino=True, cpu_bf16=True)
    assert resolve("auto", Flags(), cuda_and_bf16, **IMAGE, device=requested_device(None, "cpu,cpu"))[0] == "openvino"
    monkeypatch.setattr("diffit_port.runtimes.cli.detect_host", lambda runtime, device=None: CUDA)
    chosen = lambda devices: json.loads(run(["--package", pkg, "--fastest", "--devices", devices,  # noqa: E731
                                             "--dry-run"]).stdout)["runtime"]
    assert (chosen("cpu,cpu"), chosen("0")) == ("openvino", "onnx-cuda")


def test_named_runtimes_and_given_options():
    """openvino: bf16 on a CPU device that has it, never over a given precision or on another device; onnx-cpu
    keeps its defaults; torch is refused."""
    assert resolve("openvino", Flags(), BF16_CPU, **IMAGE, device="cpu")[1].precision == "bf16"
    assert resolve("openvino", Flags(), BF16_CPU, **IMAGE, device="GPU.0")[1] == Flags()
    assert resolve("openvino", Flags(precision="fp32"), BF16_CPU, **IMAGE)[1] == Flags(precision="fp32")
    assert resolve("openvino", Flags(), FP32_CPU, **IMAGE)[1] == Flags()
    assert resolve("onnx-cpu", Flags(), BF16_CPU, **IMAGE) == ("onnx-cpu", Flags(), None)
    with pytest.raises(ValueError, match="not torch"):
        resolve("torch", Flags(), BF16_CPU, **IMAGE)


def test_onnx_cuda_setting_per_model_kind(pkg, tmp_path_factory):
    """onnx-cuda (a dry run needs no GPU): the fastest setting of BENCHMARKS.md for the package's model kind; options
    given beside it win; the device loop is left out where it cannot run (--cfg in-graph)."""
    def resolved(*args):
        out = json.loads(run(["--runtime", "onnx-cuda", "--fastest", "--dry-run", *args]).stdout)
        return out["runtime"], out["runtime_options"], out["sampling"]["device_loop"]

    loop_on = {"precision": "fp16", "cuda_graph": "True"}
    assert resolved("--package", pkg) == ("onnx-cuda", {**loop_on, "fusions": "unet", "qkv": "separate"}, True)
    latent = package_path("tiny-latent", tmp_path_factory)
    assert resolved("--package", latent) == ("onnx-cuda", {**loop_on, "qkv": "separate-time"}, True)
    assert resolved("--package", latent, "--separate-qkv")[1] == {**loop_on, "qkv": "separate"}
    assert resolved("--package", pkg, "--precision", "fp32", "--no-fusions") == (
        "onnx-cuda", {"precision": "fp32", "cuda_graph": "True", "fusions": "False", "qkv": "separate"}, True)
    assert resolved("--package", pkg, "--tf32")[1]["precision"] == "tf32"
    assert resolved("--package", pkg, "--cfg", "in-graph", "--guidance", "2")[2] is False
    r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "torch", "--fastest", "--dry-run"])
    assert r.exit_code == 2 and "--fastest applies to auto, onnx-cuda, openvino and onnx-cpu, not torch" in r.output


@pytest.mark.skipif(has_cuda_provider(), reason="this onnxruntime has the CUDA provider (the GPU test covers it)")
def test_this_cpu_host_runs_openvino(pkg):
    """Without the CUDA provider and with OpenVINO installed (the test extra), auto --fastest runs OpenVINO, in bf16
    exactly when its CPU plugin reports BF16; a CUDA-only option is refused with one line."""
    require_openvino()
    import openvino

    bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert detect_host("auto") == Host(cuda=False, openvino=True, cpu_bf16=bf16)
    out = json.loads(run(["--package", pkg, "--fastest", "--dry-run"]).stdout)
    assert out["runtime"] == "openvino" and out["runtime_options"] == ({"precision": "bf16"} if bf16 else {})
    r = CliRunner().invoke(main, ["--package", str(pkg), "--fastest", "--cuda-graph", "--dry-run"])
    assert r.exit_code == 2 and "--cuda-graph does not apply to the openvino runtime" in r.output


def against_onnx_cpu(args, tmp_path):
    """Runs of diffit-run with `args` (each must succeed): --fastest in fp32 and in its own precision, and onnx-cpu
    fp32 with seeds 0 and 1. Returns each way's max abs against onnx-cpu fp32 seed 0, --fastest's samples, and each
    way's CliRunner result."""
    ways = {"cpu": ["--runtime", "onnx-cpu"], "cpu seed 1": ["--runtime", "onnx-cpu", "--seed", "1"],
            "fastest fp32": ["--fastest", "--precision", "fp32"], "fastest": ["--fastest"]}
    out, results = {}, {}
    for name, way in ways.items():
        npy = tmp_path / f"{name.replace(' ', '-')}.npy"
        results[name] = run([*way, *args, "--output", npy.with_suffix(".png"), "--save-npy", npy])
        assert results[name].exit_code == 0, results[name].output
        out[name] = np.load(npy)
    diff = {k: float(np.abs(out[k] - out["cpu"]).max()) for k in ("fastest fp32", "fastest", "cpu seed 1")}
    print("\nmax abs against onnx-cpu fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    return diff, out["fastest"], results


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider")
@pytest.mark.parametrize("kind", ["tiny", "tiny-latent"])
def test_fastest_samples_match_onnx_cpu(kind, tmp_path, tmp_path_factory):
    """The --fastest setting (CUDA graphs, the device loop; unet fusions and separate q/k/v, or the time token in
    the GEMMs) in fp32 samples what onnx-cpu samples, within the loops' float32 bound; in fp16 (its default) it stays
    far closer to them than another seed's samples are (an untrained model amplifies fp16 rounding over the run: H100,
    tiny 0.14-0.17 and tiny-latent 0.10 against 2.0 and 717 for another seed)."""
    diff, fastest, _ = against_onnx_cpu(["--package", package_path(kind, tmp_path_factory), *BASE, "--guidance", "2"],
                                        tmp_path)
    assert diff["fastest fp32"] <= LOOP_ATOL
    assert np.isfinite(fastest).all() and diff["fastest"] <= 0.25 * diff["cpu seed 1"]


@pytest.mark.skipif(has_cuda_provider(), reason="this onnxruntime has the CUDA provider (the GPU test covers it)")
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_fastest_on_this_cpu_samples_what_onnx_cpu_samples(tmp_path):
    """--fastest here (OpenVINO; bf16 where the CPU has it) on the shipped digits model: in fp32 within the loops'
    float32 bound of onnx-cpu's samples; in its own precision within BF16_ATOL of them, a tenth or less of another
    seed's distance. (The tiny random package is no test of bf16: over a guided loop it amplifies bf16's rounding
    to 1.5, three quarters of another seed's distance.)"""
    diff, fastest, results = against_onnx_cpu(BASE, tmp_path)
    for r in results.values():
        assert len(r.stdout.strip().splitlines()) == 1, r.output   # the summary line only
    assert diff["fastest fp32"] <= LOOP_ATOL
    assert np.isfinite(fastest).all() and diff["fastest"] <= BF16_ATOL
    assert diff["cpu seed 1"] > 10 * BF16_ATOL
