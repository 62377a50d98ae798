"""The digits judge, the Frechet distance and `python -m diffit_port.evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffit_port.config import get_preset
from diffit_port.data import load_digits_split
from diffit_port.evaluate import EvalConfig, evaluate, fit_judge, frechet_distance, main

KEYS = {"class_accuracy", "per_class_accuracy", "fd", "fd_real_floor", "num_generated", "num_heldout", "judge",
        "sampler", "steps", "guidance", "num_per_class", "seed", "source", "runtime", "images_per_s"}


@pytest.fixture(scope="module")
def judge():
    return fit_judge(0)


def test_judge_is_accurate_and_fd_separates_real_from_noise(judge):
    assert judge.heldout_accuracy >= 0.95
    train, held = load_digits_split("train", 32), load_digits_split("heldout", 32)
    rng = np.random.default_rng(0)
    real = train.images[rng.choice(len(train), len(held), replace=False)]
    noise = rng.uniform(-1, 1, real.shape)
    fd_real = frechet_distance(judge.features(real), judge.features(held.images))
    fd_noise = frechet_distance(judge.features(noise), judge.features(held.images))
    assert fd_real < 0.05 * fd_noise
    assert np.mean(judge.predict(held.images) == held.labels) == judge.heldout_accuracy


def test_frechet_distance_closed_forms():
    a = np.random.default_rng(1).standard_normal((500, 6))
    assert frechet_distance(a, a) < 1e-9
    shift = np.arange(6.0)
    assert abs(frechet_distance(a, a + shift) - np.sum(shift ** 2)) < 1e-8
    # Scaling by 2: Tr(S + 4S - 2 * 2S) = Tr(S).
    assert abs(frechet_distance(a, 2 * a) - np.trace(np.cov(a, rowvar=False)) - np.sum(a.mean(0) ** 2)) < 1e-8


def test_evaluate_takes_any_denoise_callable(judge):
    calls = []

    def denoise(x, t, y):
        calls.append(x.shape[0])
        return np.zeros_like(x)                                    # eps = 0: x_0 is the (rescaled) noise

    model = get_preset("digits").model
    cfg = EvalConfig(sampler="ddim", steps=2, guidance=1.0, num_per_class=3, batch_size=12)
    metrics, x0 = evaluate(denoise, model, get_preset("digits").diffusion, cfg, judge=judge, progress=False)
    assert x0.shape == (30, 1, 32, 32) and calls == [12, 12, 12, 12, 6, 6]
    assert metrics["fd"] > 10 * metrics["fd_real_floor"]
    with pytest.raises(ValueError, match="10-class"):
        evaluate(denoise, get_preset("tiny-latent").model, get_preset("digits").diffusion, cfg, judge=judge)


def test_cli_on_a_tiny_random_checkpoint(checkpoint_file, tmp_path):
    res = CliRunner().invoke(main, ["--checkpoint", str(checkpoint_file("tiny")), "--steps", "2",
                                    "--num-per-class", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert KEYS <= metrics.keys() and metrics["num_generated"] == 20 and metrics["guidance"] == 2.0
    assert (tmp_path / "samples.png").is_file()
    assert CliRunner().invoke(main, ["--steps", "2"]).exit_code == 2              # neither source given


@pytest.mark.slow
def test_cli_on_an_exported_package(checkpoint_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from diffit_port.export.package_writer import export_package

    pkg = export_package(checkpoint_file("tiny"), tmp_path / "pkg", progress=False)
    res = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cpu", "--steps", "2",
                                    "--num-per-class", "2", "--guidance", "1", "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert KEYS <= metrics.keys() and metrics["runtime"] == "onnx-cpu (cpu, fp32)"


def test_precision_reaches_the_runtime(checkpoint_file, tmp_path, tmp_path_factory):
    """--precision opens the package's runtime in that precision (what diffit-run --fastest runs on a bf16 CPU), and
    is a usage error where the runtime has no such precision or a checkpoint is evaluated; nothing is written then."""
    from runtime_helpers import package_path, require_openvino

    require_openvino()
    pkg = package_path("tiny", tmp_path_factory)
    args = ["--steps", "2", "--num-per-class", "2", "--guidance", "1"]
    res = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "openvino", "--precision", "bf16", *args,
                                    "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["runtime"] == "openvino (CPU, bf16)"
    res = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cpu", "--precision", "bf16", *args,
                                    "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and "not available" in res.output, res.output
    res = CliRunner().invoke(main, ["--checkpoint", str(checkpoint_file("tiny")), "--precision", "bf16", *args,
                                    "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and "--precision applies to --package" in res.output, res.output
    assert not (tmp_path / "no").exists()


def test_non_finite_samples_and_bad_guidance_write_nothing(tmp_path, tmp_path_factory):
    """A package whose weights give NaN stops the evaluation (exit 1, one line naming the call, t and the runtime);
    --guidance must be finite and >= 0 (exit 2). Neither writes metrics.json or samples.png."""
    from cli_helpers import error_line, poisoned_package
    from runtime_helpers import package_path

    nan_pkg = poisoned_package(package_path("tiny", tmp_path_factory), tmp_path / "nan")
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["--package", str(nan_pkg), "--runtime", "onnx-cpu", "--steps", "2",
                                    "--num-per-class", "2", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert ("non-finite values in the denoiser output at denoiser call 1 (t = 999) on the onnx-cpu (cpu, fp32) "
            "runtime; nothing was written") in error_line(res)
    for value in ("nan", "inf", "-1"):
        res = CliRunner().invoke(main, ["--package", str(nan_pkg), "--guidance", value, "--out", str(out)])
        assert res.exit_code == 2 and "Invalid value for '--guidance': must be a finite number >= 0" in res.output
    assert not out.exists()


def test_cli_on_an_edm_checkpoint(checkpoint_file, tmp_path):
    """An EDM checkpoint is evaluated through its preconditioned step with the EDM samplers; the JSON line reports
    the headline figures and the denoiser calls per image; an eps-only sampler is a usage error."""
    args = ["--checkpoint", str(checkpoint_file("tiny-edm")), "--num-per-class", "2", "--device", "cpu",
            "--out", str(tmp_path)]
    res = CliRunner().invoke(main, [*args, "--sampler", "heun", "--steps", "3", "--clip-denoised"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert (line["prediction"], line["sampler"], line["denoiser_calls_per_image"], line["clip_denoised"]) == \
        ("edm", "heun", 5, True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert KEYS <= metrics.keys() and (line["fd"], line["class_accuracy"]) == (metrics["fd"], metrics["class_accuracy"])
    res = CliRunner().invoke(main, [*args, "--sampler", "ddim", "--steps", "3"])
    assert res.exit_code == 2 and "does not exist for edm models" in res.output
    # The checkpoint's denoiser is the preconditioned D, as a package's torch step would be.
    import torch

    from diffit_port.checkpoint import load_model
    from diffit_port.edm import EDMPrecond
    from diffit_port.evaluate import _from_checkpoint

    denoise = _from_checkpoint(checkpoint_file("tiny-edm"), "cpu")[0]
    x, s, y = np.ones((2, 1, 16, 16), np.float32), np.array([0.1, 10.0], np.float32), np.array([3, 10])
    with torch.no_grad():
        want = EDMPrecond(load_model(checkpoint_file("tiny-edm"))[0], 0.5)(*map(torch.from_numpy, (x, s, y)))
    np.testing.assert_allclose(denoise(x, s, y), want.numpy(), rtol=0, atol=1e-6)


def test_evaluate_runs_edm_through_the_edm_samplers(judge):
    """evaluate() with an EDM config drives the sigma grid: the denoiser sees sigma_max first, sigma_min last."""
    seen = []

    def denoise(x, sigma, y):
        seen.append(float(sigma[0]))
        return np.zeros_like(x)

    model = get_preset("tiny-edm").model
    cfg = EvalConfig(sampler="dpmpp-2m", steps=3, guidance=1.0, num_per_class=2, batch_size=20)
    evaluate(denoise, model, get_preset("tiny-edm").diffusion, cfg, judge=judge, progress=False)
    assert seen == pytest.approx([80.0, seen[1], 0.002], rel=1e-6) and 0.002 < seen[1] < 80
