"""`diffit-run` through click's CliRunner (and a subprocess where a backend must really be missing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffit_port.package import load_package
from diffit_port.runtimes.cli import main
from diffit_port.runtimes.onnx_cuda import cuda_graph_options
from cli_helpers import BASE, SUMMARY, run
from runtime_helpers import LOOP_ATOL, has_cuda_provider, package_path, require_openvino

@pytest.mark.parametrize("runtimes", [("onnx-cpu", "torch"), ("openvino", "torch")])
def test_save_npy_agrees_across_runtimes_and_summary_line(pkg, tmp_path, runtimes):
    if "openvino" in runtimes:
        require_openvino()
    arrays = {}
    for rt in runtimes:
        png, npy = tmp_path / f"{rt}.png", tmp_path / f"{rt}.npy"
        r = run(["--package", pkg, "--runtime", rt, *BASE, "--output", png, "--save-npy", npy])
        assert r.exit_code == 0, r.output
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        assert len(lines) == 1, lines  # exactly one summary line on stdout
        m = SUMMARY.match(lines[0])
        assert m and m.groups() == (rt, "fp32", "ddim", "4", "5"), lines[0]
        arrays[rt] = np.load(npy)
        assert arrays[rt].dtype == np.float32 and arrays[rt].shape == (5, 1, 16, 16)
        img = Image.open(png)
        # 5 tiles: 2 rows x 3 cols, 2 px borders, 16 px tiles upscaled 6x to reach 96 px
        assert img.mode == "L" and img.size == (3 * 98 + 2, 2 * 98 + 2)
    assert np.abs(arrays[runtimes[0]] - arrays["torch"]).max() <= LOOP_ATOL, runtimes


def test_defaults_come_from_the_manifest_and_progress_goes_to_stderr(pkg, tmp_path):
    r = run(["--package", pkg, "--runtime", "onnx-cpu", "--num-images", "2", "--threads", "1",
             "--output", tmp_path / "g.png"])
    assert r.exit_code == 0, r.output
    assert "sampler=ddim steps=10" in r.stdout and "guidance=2" in r.stdout  # the tiny preset's defaults
    assert " images=2 batch=2 " in r.stdout          # the batch that ran, not --batch-size's default 16
    assert "diffit-run onnx-cpu" in r.stderr and "10/10" in r.stderr       # one bar over denoiser calls


def test_labels_are_validated(pkg, tmp_path):
    for bad, msg in (("3,10x", "comma-separated integers"), ("0,11", "out of range")):
        r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cpu", "--labels", bad,
                                      "--output", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / "x.png").exists()
    r = run(["--package", pkg, "--labels", "3,10", "--num-images", "5", "--dry-run"])  # 10 = the null label
    assert json.loads(r.stdout)["labels"] == [3, 10, 3, 10, 3]


def test_in_graph_guidance_matches_sampler_side(pkg, tmp_path):
    out = {}
    for mode in ("sampler", "in-graph"):
        r = run(["--package", pkg, "--runtime", "onnx-cpu", *BASE, "--guidance", "3", "--cfg", mode,
                 "--output", tmp_path / f"{mode}.png", "--save-npy", tmp_path / f"{mode}.npy"])
        assert r.exit_code == 0, r.output
        out[mode] = np.load(tmp_path / f"{mode}.npy")
    assert np.abs(out["sampler"] - out["in-graph"]).max() <= LOOP_ATOL


def test_two_sessions_give_the_single_session_result(pkg, tmp_path):
    args = ["--package", pkg, "--runtime", "onnx-cpu", "--num-images", "5", "--steps", "4", "--threads", "1",
            "--no-progress"]
    one = run([*args, "--batch-size", "1", "--output", tmp_path / "1.png", "--save-npy", tmp_path / "1.npy"])
    two = run([*args, "--batch-size", "1", "--devices", "cpu,cpu", "--output", tmp_path / "2.png",
               "--save-npy", tmp_path / "2.npy"])
    mixed = run([*args, "--batch-size", "2", "--devices", "cpu,cpu", "--output", tmp_path / "3.png",
                 "--save-npy", tmp_path / "3.npy"])
    assert one.exit_code == two.exit_code == mixed.exit_code == 0, (one.output, two.output, mixed.output)
    assert "device=cpu,cpu" in two.stdout
    # Same per-image computation -> bit-identical; other batch compositions -> float32 GEMM order only.
    np.testing.assert_array_equal(np.load(tmp_path / "2.npy"), np.load(tmp_path / "1.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "3.npy"), np.load(tmp_path / "1.npy"), atol=1e-4, rtol=0)


def _blocked_run(blocked: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    """diffit-run in a fresh interpreter in which `blocked` cannot be imported, as if not installed."""
    code = textwrap.dedent(f"""
        import sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name == {blocked!r} or name.startswith({blocked!r} + "."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Missing())
        from diffit_port.runtimes.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_missing_openvino_stops_before_writing(pkg, tmp_path):
    r = _blocked_run("openvino", ["--package", str(pkg), "--runtime", "openvino", "--num-images", "2",
                                  "--save-npy", "s.npy"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert 'pip install "diffit-port[openvino]"' in r.stderr
    assert list(tmp_path.iterdir()) == []  # neither diffit-samples.png nor s.npy


def test_missing_onnxruntime_and_torch_name_their_extras(pkg, tmp_path):
    r = _blocked_run("onnxruntime", ["--package", str(pkg), "--runtime", "onnx-cpu"], tmp_path)
    assert r.returncode == 2 and 'pip install "diffit-port[onnxruntime]"' in r.stderr, r.stderr
    r = _blocked_run("torch", ["--package", str(pkg), "--runtime", "torch"], tmp_path)
    assert r.returncode == 2 and 'pip install "diffit-port[torch]"' in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_auto_runs_openvino_on_a_host_without_onnxruntime(pkg, tmp_path):
    require_openvino()
    r = _blocked_run("onnxruntime", ["--package", str(pkg), "--num-images", "2", "--steps", "2", "--no-progress"],
                     tmp_path)
    assert r.returncode == 0, r.stderr
    assert SUMMARY.match(r.stdout.strip()).group(1) == "openvino"
    assert "onnxruntime is not installed, so --runtime auto runs openvino" in r.stderr
    assert (tmp_path / "diffit-samples.png").exists()
    (tmp_path / "diffit-samples.png").unlink()
    r = _blocked_run("onnxruntime", ["--package", str(pkg), "--device", "cuda:0", "--num-images", "2"], tmp_path)
    assert r.returncode == 2 and 'pip install "diffit-port[onnxruntime-gpu]"' in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(has_cuda_provider(), reason="this onnxruntime has the CUDA provider")
def test_onnx_cuda_without_cuda_provider_exits_2(pkg, tmp_path):
    r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cuda",
                                  "--output", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and "diffit-port[onnxruntime-gpu]" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(pkg, tmp_path):
    cases = [(["--runtime", "onnx-cpu", "--checkpoint", str(pkg / "checkpoint.pt")], "does not apply"),
             (["--runtime", "onnx-cpu", "--device", "cpu", "--devices", "cpu,cpu"], "not both"),
             (["--sampler", "ddpm", "--eta", "0.5"], "ddim sampler only"),
             (["--runtime", "onnx-cpu", "--precision", "bf16"], "not available"),
             (["--runtime", "onnx-cpu", "--unet-fusions"], "--unet-fusions does not apply to the onnx-cpu runtime"),
             (["--runtime", "openvino", "--separate-qkv"], "--separate-qkv does not apply to the openvino runtime"),
             (["--runtime", "onnx-cuda", "--unet-fusions", "--no-fusions"], "drop --no-fusions"),
             (["--runtime", "onnx-cuda", "--precision", "fp16", "--fp16-attention"], "applies to fp32/tf32"),
             (["--runtime", "torch", "--streams", "2"], "--streams does not apply to the torch runtime"),
             (["--runtime", "openvino", "--no-pack-windows"],
              "--no-pack-windows does not apply to the openvino runtime"),
             (["--runtime", "onnx-cpu", "--no-fold-biases"], "--no-fold-biases does not apply to the onnx-cpu runtime")]
    for extra, msg in cases:
        r = CliRunner().invoke(main, ["--package", str(pkg), *extra, "--output", str(tmp_path / "g.png")])
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    r = CliRunner().invoke(main, ["--package", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "no diffit package" in r.output


def test_dry_run_prints_the_resolved_config(pkg):
    r = run(["--package", pkg, "--runtime", "openvino", "--precision", "bf16", "--ov-streams", "3", "--dry-run"])
    cfg = json.loads(r.stdout)
    assert cfg["runtime"] == "openvino" and cfg["runtime_options"]["precision"] == "bf16"
    assert cfg["runtime_options"]["streams"] == "3"
    assert cfg["sampling"]["sampler"] == "ddim" and cfg["sampling"]["num_images"] == 16


def test_onnx_cuda_graph_options(pkg):
    """The onnx-cuda graph choices of docs/BENCHMARKS_GPU.md reach prepare_onnx_cuda's keyword arguments."""
    r = run(["--package", pkg, "--runtime", "onnx-cuda", "--unet-fusions", "--separate-qkv", "--fp16-attention",
             "--cuda-graph", "--no-pack-windows", "--no-fold-biases", "--dry-run"])
    assert json.loads(r.stdout)["runtime_options"] == {"fusions": "unet", "qkv": "separate", "attention_fp16": "True",
                                                       "cuda_graph": "True", "pack_windows": "False",
                                                       "fold_biases": "False"}
    r = run(["--package", pkg, "--runtime", "onnx-cuda", "--no-fusions", "--dry-run"])
    assert json.loads(r.stdout)["runtime_options"] == {"fusions": "False"}


def test_time_token_gemm_is_for_latent_models(pkg, tmp_path_factory):
    latent = package_path("tiny-latent", tmp_path_factory)
    r = run(["--package", latent, "--runtime", "onnx-cuda", "--time-token-gemm", "--dry-run"])
    assert json.loads(r.stdout)["runtime_options"] == {"qkv": "separate-time"}
    r = CliRunner().invoke(main, ["--package", str(pkg), "--runtime", "onnx-cuda", "--time-token-gemm", "--dry-run"])
    assert r.exit_code == 2 and "applies to latent models" in r.output
    r = CliRunner().invoke(main, ["--package", str(latent), "--runtime", "onnx-cpu", "--time-token-gemm", "--dry-run"])
    assert r.exit_code == 2 and "--time-token-gemm does not apply to the onnx-cpu runtime" in r.output
    with pytest.raises(ValueError, match="latent models"):
        cuda_graph_options(load_package(pkg), "fp16", qkv="separate-time")


def test_no_arguments_without_the_embedded_package(monkeypatch, tmp_path):
    from diffit_port.runtimes import cli

    monkeypatch.setattr(cli, "default_package_path", lambda: tmp_path / "assets" / "digits")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [])
    assert r.exit_code == 1 and "embedded default package is not built yet" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_guidance_mismatch_is_refused_before_any_session(tmp_path):
    """--cfg in-graph on a package without a denoiser_cfg graph (the embedded digits package has none) is a
    usage error found before a session opens: --dry-run reports it too, and nothing is written."""
    out = tmp_path / "grid.png"
    for extra in ([], ["--dry-run"]):
        r = CliRunner().invoke(main, ["--cfg", "in-graph", "--runtime", "onnx-cpu", "--output", str(out), *extra])
        assert r.exit_code == 2 and "denoiser_cfg" in r.output, r.output
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Property: any command line gives exit 0, 1 or 2 and never a traceback
# --------------------------------------------------------------------------------------------------

JUNK = st.sampled_from(["", "-1", "0", "1e400", "nan", "inf", "abc", "3,x", ",", "99999999999999999999", "2.5"])
PATHS = st.sampled_from(["g.png", "sub/g.png", "afile/g.png", "/proc/g.png", "g.jpg", "adir", "s.npy", "g",
                         "sub/deeper/s.npy", "afile"])
OPTION_VALUES = {
    "--runtime": st.sampled_from(["auto", "onnx-cpu", "openvino", "torch", "onnx-cuda", "tensorrt"]),
    "--sampler": st.sampled_from(["ddim", "ddpm", "dpmpp-2m", "heun", "euler"]),
    "--steps": st.integers(-2, 3).map(str) | JUNK, "--eta": st.sampled_from(["0", "0.5", "-1", "nan"]),
    "--seed": st.integers(-3, 2**64).map(str) | JUNK, "--num-images": st.integers(-1, 3).map(str) | JUNK,
    "--batch-size": st.integers(-1, 3).map(str) | JUNK, "--labels": st.sampled_from(["0", "3,10", "11", "-1", "a"]),
    "--guidance": st.floats(allow_nan=True).map(str) | JUNK,
    "--guidance-schedule": st.sampled_from(["constant", "power-cosine", "cosine"]),
    "--cfg": st.sampled_from(["sampler", "in-graph", "both"]), "--output": PATHS, "--save-npy": PATHS,
    "--output-dir": PATHS, "--scale": st.integers(-1, 3).map(str),
    "--device": st.sampled_from(["cpu", "GPU", "cuda:7"]), "--devices": st.sampled_from(["cpu,cpu", "0,1", ",", "cpu"]),
    "--precision": st.sampled_from(["fp32", "fp16", "bf16"]), "--threads": st.sampled_from(["1", "0", "x"]),
    "--checkpoint": PATHS, "--ov-cache-dir": PATHS, "--ov-attention": st.sampled_from(["inline", "sdpa", "x"]),
    "--package": st.sampled_from(["PKG", "adir", "nowhere"]),
}
FLAGS = ["--tf32", "--cuda-graph", "--no-mha", "--no-fusions", "--clip-denoised", "--no-clip-denoised"]


@st.composite
def command_lines(draw):
    args = []
    for opt in draw(st.lists(st.sampled_from(sorted(OPTION_VALUES)), max_size=6)):
        args += [opt, draw(OPTION_VALUES[opt])]
    args += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    if draw(st.booleans()):
        args.append("--dry-run")
    else:                                                     # keep real runs small (the last value wins)
        args += ["--num-images", "2", "--batch-size", "2", "--steps", "2", "--threads", "1"]
    return args


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=command_lines())
def test_any_command_line_exits_0_1_or_2(pkg, tmp_path, args):
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "afile").write_text("x")
    (work / "adir").mkdir()
    args = [str(pkg) if a == "PKG" else a for a in args]
    if "--package" not in args:
        args = ["--package", str(pkg), *args]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = CliRunner().invoke(main, [*args, "--no-progress"])
    finally:
        os.chdir(cwd)
    assert r.exit_code in (0, 1, 2), (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output, repr(r.exception))
    if r.exit_code != 0:
        assert not [p for p in work.rglob("*") if p.name not in ("afile", "adir")], (args, r.output)
