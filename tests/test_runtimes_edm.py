"""EDM packages (x, sigma, y -> D) on every runtime: the manifest and graph contract, parity per step and over whole
20-step loops against torch float32 (sampler-side and in-graph guidance), fp16 figures, the onnx-cuda rewrites on
the CPU EP, diffit-run's checks, and the onnx-cuda tests (gpu mark)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from diffit_port import samplers
from diffit_port.package import Package, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.base import graph_feeds
from diffit_port.runtimes.cli import main as run_main
from diffit_port.runtimes.generate import SamplingConfig, check_config, default_labels, generate
from runtime_helpers import (FP16_STEP_ATOL, LOOP_ATOL, STEP_ATOL, assert_fp16_figures, needs_cuda, open_runtimes,
                           package_path)

SIGMAS = np.array([0.002, 0.4, 5.0, 80.0], np.float32)      # the ends of EDM's range and two levels between


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    return load_package(package_path("tiny-edm", tmp_path_factory))


@pytest.fixture(scope="module")
def edm_fp16(tmp_path_factory):
    return load_package(package_path("tiny-edm-fp16", tmp_path_factory))


def edm_inputs(package, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = x0 + sigma n at the realistic scale of each noise level, sigma across [0.002, 80], labels incl. null."""
    rng = np.random.default_rng(seed)
    m = package.model
    shape = (len(SIGMAS), m.in_channels, m.image_size, m.image_size)
    x = rng.uniform(-1, 1, shape) + SIGMAS.reshape(-1, 1, 1, 1) * rng.standard_normal(shape)
    return x.astype(np.float32), SIGMAS.copy(), np.array([1, m.null_label, 7, 0], np.int64)


def network_part(package, x: np.ndarray, d: np.ndarray) -> float:
    """max |D - c_skip x|: the share of D that comes from the network (c_out F), so parity is not just c_skip x."""
    sd = package.diffusion.sigma_data
    s = SIGMAS.astype(np.float64).reshape(-1, 1, 1, 1)
    return float(np.abs(d - sd**2 / (s**2 + sd**2) * x).max())


def test_edm_manifest_and_graph_contract(edm):
    m = edm.manifest
    assert m["prediction"] == "edm" and m["diffusion"] == {"prediction": "edm", "sigma_data": 0.5, "sigma_min": 0.002,
                                                           "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2, "p_std": 1.2}
    for name in ("denoiser", "denoiser_cfg"):
        assert [i["name"] for i in m["graphs"][name]["inputs"]][:3] == ["x", "sigma", "y"]
        assert m["graphs"][name]["outputs"][0]["name"] == "out"
        assert m["parity"][name]["max_abs"] <= STEP_ATOL
    assert (m["sampling"]["sampler"], m["sampling"]["clip_denoised"], m["learn_sigma"]) == ("heun", False, False)
    with pytest.raises(ValueError, match="'ddim' does not exist for edm models"):
        check_config(edm, SamplingConfig(sampler="ddim"))
    with pytest.raises(ValueError, match="constant schedule only"):
        check_config(edm, SamplingConfig(sampler="heun", guidance=2.0, guidance_schedule="power-cosine"))
    check_config(edm, SamplingConfig(sampler="edm-stochastic"))
    bare = Package(edm.root, {**m, "sampling": {}})
    assert SamplingConfig.from_package(bare).sampler == "heun"           # not the eps default, ddim
    eps_graph = {**m["graphs"]["denoiser"], "inputs": [{**i, "name": "t" if i["name"] == "sigma" else i["name"]}
                                                       for i in m["graphs"]["denoiser"]["inputs"]]}
    mismatched = Package(edm.root, {**m, "graphs": {**m["graphs"], "denoiser": eps_graph}})
    with pytest.raises(ValueError, match="prediction 'edm' but its graph takes"):
        check_config(mismatched, SamplingConfig(sampler="heun"))


def test_graph_feeds_map_the_time_input():
    x, t, y = np.zeros((1, 1, 2, 2)), np.ones(1), np.zeros(1, np.int64)
    edm = graph_feeds({"x": np.float32, "sigma": np.float32, "y": np.int64}, x, t, y, None)
    eps = graph_feeds({"x": np.float32, "t": np.float32, "y": np.int64}, x, t, y, None)
    assert list(edm) == ["x", "sigma", "y"] and list(eps) == ["x", "t", "y"]
    assert edm["sigma"].dtype == np.float32 and np.array_equal(edm["sigma"], eps["t"])


def test_edm_step_parity_cpu(edm):
    d = open_runtimes(edm)
    d["openvino-sdpa"] = create_denoiser("openvino", edm, threads=1, attention="sdpa")
    x, s, y = edm_inputs(edm)
    ref = d["torch"](x, s, y)
    assert ref.shape == x.shape and ref.dtype == np.float32
    assert network_part(edm, x, ref) > 1e-2        # the network's share of D is not negligible
    errs = {name: float(np.abs(den(x, s, y) - ref).max()) for name, den in d.items() if name != "torch"}
    print("\nedm step max|diff| vs torch fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= STEP_ATOL, errs


def test_edm_in_graph_guidance_step_matches_sampler_side(edm):
    x, s, y = edm_inputs(edm)
    ref = samplers.classifier_free_guidance(create_denoiser("torch", edm, threads=1), 3.0, edm.model.null_label)(
        x, s, y)
    for name in ("onnx-cpu", "openvino"):
        d = create_denoiser(name, edm, graph="denoiser_cfg", threads=1)
        out = d(x, s, y, guidance=np.full(len(s), 3.0, np.float32))
        assert np.abs(out - ref).max() <= STEP_ATOL, name


@pytest.mark.parametrize("cfg_mode", ["sampler", "in-graph"])
@pytest.mark.parametrize("sampler", ["heun", "dpmpp-2m"])
def test_edm_loop_parity_cpu(edm, sampler, cfg_mode):
    """20 steps with guidance 2 (the sampler doubling the batch, or the denoiser_cfg graph) on every runtime, the
    same NoiseSource: ends within LOOP_ATOL of the torch loop (torch always guides on the sampler side)."""
    d = open_runtimes(edm)
    cfg = SamplingConfig(sampler=sampler, steps=20, seed=3, num_images=2, batch_size=2, guidance=2.0)
    y = default_labels(edm, 2)
    ref = generate([d.pop("torch")], edm, cfg, y)
    if cfg_mode == "in-graph":
        d = {n: create_denoiser(n, edm, graph="denoiser_cfg", threads=1) for n in d}
        cfg = SamplingConfig(**{**cfg.to_dict(), "cfg": "in-graph"})
    errs = {name: float(np.abs(generate([den], edm, cfg, y) - ref).max()) for name, den in d.items()}
    print(f"\nedm {sampler} 20 steps, guidance 2 ({cfg_mode}): max|x0| {np.abs(ref).max():.2f}; max|diff| vs torch: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= LOOP_ATOL, errs


def test_edm_fp16_package_figures(edm_fp16):
    """The fp16 EDM package (float16 network, float32 preconditioning) vs the float32 torch model it came from."""
    assert edm_fp16.precision == "fp16"
    d = open_runtimes(edm_fp16)
    assert_fp16_figures(d, *edm_inputs(edm_fp16), "edm fp16 package")


def test_edm_mha_rewrite_and_fusions_on_cpu_ep(edm):
    """The onnx-cuda graph preparation (MultiHeadAttention, fusions, fp16) keeps an EDM graph's output, the
    preconditioning around the network included."""
    import onnx
    import onnxruntime as ort

    from diffit_port.runtimes.onnx_cuda import prepare_cuda_model

    path = edm.graph_path("denoiser")
    x, s, y = edm_inputs(edm)

    def run(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x, "sigma": s, "y": y})[0]

    ref = run(onnx.load(str(path)))
    errs = {"mha+fusions": float(np.abs(run(prepare_cuda_model(path)) - ref).max()),
            "mha+fusions+fp16": float(np.abs(run(prepare_cuda_model(path, fp16=True)) - ref).max())}
    print("\nedm rewritten graph vs shipped graph on the CPU EP: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert errs["mha+fusions"] <= 1e-5 and errs["mha+fusions+fp16"] <= FP16_STEP_ATOL


def test_diffit_run_on_an_edm_package(edm, tmp_path):
    """diffit-run samples an EDM package with its defaults and with edm-stochastic; samplers and guidance schedules
    the contract does not have are usage errors (exit 2) before any session opens."""
    base = ["--package", str(edm.root), "--runtime", "onnx-cpu", "--num-images", "2", "--steps", "3",
            "--no-progress", "--threads", "1"]
    for extra in ([], ["--sampler", "edm-stochastic", "--cfg", "in-graph"]):
        res = CliRunner().invoke(run_main, [*base, *extra, "--output", str(tmp_path / "a.png")])
        assert res.exit_code == 0, res.output
        assert "sampler=" + (extra[1] if extra else "heun") in res.output
    res = CliRunner().invoke(run_main, [*base, "--sampler", "ddim"])
    assert res.exit_code == 2 and "does not exist for edm models" in res.output
    res = CliRunner().invoke(run_main, [*base, "--guidance-schedule", "power-cosine"])
    assert res.exit_code == 2 and "constant schedule only" in res.output


# --------------------------------------------------------------------------------------------------
# CUDA (run on the GPU host: pytest -m gpu)
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_cuda_edm_parity(edm, edm_fp16):
    """onnx-cuda on an EDM package: fp32 (TF32 off) per step for the plain graph, the MHA rewrite and the fusions,
    and over 20-step heun and dpmpp-2m loops with guidance 2 (sampler side and in-graph), against torch float32;
    the runtime fp16 conversion and the fp16 package reported."""
    torch_d = create_denoiser("torch", edm)
    x, s, y = edm_inputs(edm)
    ref = torch_d(x, s, y)
    errs = {}
    for label, opts in {"plain": dict(mha=False, fusions=False), "mha": dict(fusions=False), "mha+fusions": {}}.items():
        d = create_denoiser("onnx-cuda", edm, **opts)
        assert d.provider == "CUDAExecutionProvider" and d.precision == "fp32"
        errs[label] = float(np.abs(d(x, s, y) - ref).max())
    print("\nedm onnx-cuda fp32 step vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= STEP_ATOL, errs
    labels = default_labels(edm, 4)
    loops = {}
    for sampler in ("heun", "dpmpp-2m"):
        cfg = SamplingConfig(sampler=sampler, steps=20, num_images=4, batch_size=4, guidance=2.0)
        want = generate([torch_d], edm, cfg, labels)
        loops[sampler] = float(np.abs(generate([create_denoiser("onnx-cuda", edm)], edm, cfg, labels) - want).max())
        in_graph = SamplingConfig(**{**cfg.to_dict(), "cfg": "in-graph"})
        cuda_cfg = create_denoiser("onnx-cuda", edm, graph="denoiser_cfg")
        loops[f"{sampler} in-graph"] = float(np.abs(generate([cuda_cfg], edm, in_graph, labels) - want).max())
    print("edm onnx-cuda 20-step loops vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in loops.items()))
    assert max(loops.values()) <= LOOP_ATOL, loops
    half = {"fp16 conversion": create_denoiser("onnx-cuda", edm, precision="fp16")(x, s, y),
            "fp16 package": create_denoiser("onnx-cuda", edm_fp16)(x, s, y)}
    figures = {k: (float(np.abs(v - ref).max()), float(np.linalg.norm(v - ref) / np.linalg.norm(ref)))
               for k, v in half.items()}
    print("edm onnx-cuda fp16 vs torch fp32 (max|diff|, rel L2): "
          + ", ".join(f"{k} {a:.2e}/{r:.2e}" for k, (a, r) in figures.items()))
    assert all(a <= FP16_STEP_ATOL for a, _ in figures.values()), figures
