"""`diffit-run --runtime onnx-cpu` end to end in a fresh virtual environment that has no torch at all."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from runtime_helpers import package_path

# The runtime's dependencies (pyproject's core list plus onnxruntime), pinned to this environment's versions
# so pip can take them from its cache; their own dependencies (none of them torch) come along.
RUNTIME_DISTS = ("numpy", "onnx", "onnxruntime", "click", "pillow", "tqdm", "protobuf", "ml_dtypes",
                 "typing_extensions")
REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "diffit_port", "export", "runtimes")


def _pins() -> list[str]:
    pins = []
    for dist in RUNTIME_DISTS:
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def _bin(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.mark.slow
def test_onnx_cpu_runs_without_torch(tmp_path, tmp_path_factory):
    pkg = package_path("tiny", tmp_path_factory)  # exported here, with torch; run there, without
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env)
    py = _bin(env, "python")
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, *_pins()], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # The project from a copy of its sources, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    r = subprocess.run([*pip, "--no-deps", str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr  # really absent

    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([str(_bin(env, "diffit-run")), "--package", str(pkg), "--runtime", "onnx-cpu",
                          "--num-images", "4", "--steps", "3", "--save-npy", "s.npy"],
                         capture_output=True, text=True, cwd=work, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "diffit-samples.png").stat().st_size > 0 and (work / "s.npy").is_file()
    assert run.stdout.startswith("runtime=onnx-cpu ")

    # The same run, recording every attempt to import torch (even a guarded try/except one).
    code = textwrap.dedent("""
        import sys
        tried = []
        class Recorder:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    tried.append(name)
                return None
        sys.meta_path.insert(0, Recorder())
        from diffit_port.runtimes.cli import main
        main(standalone_mode=False)
        print("torch import attempts:", tried)
    """)
    run = subprocess.run([str(py), "-c", code, "--package", str(pkg), "--runtime", "onnx-cpu", "--num-images", "2",
                          "--steps", "2", "--output", "again.png", "--no-progress"],
                         capture_output=True, text=True, cwd=work, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch import attempts: []" in run.stdout, run.stdout
    assert (work / "again.png").is_file()

    # The README's other commands on a runtime-only install: help works, and what needs torch says which extra.
    extra = 'pip install "diffit-port[torch]"'
    r = subprocess.run([str(_bin(env, "diffit-export")), "--help"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 0 and "Examples:" in r.stdout and extra in r.stdout, r.stdout + r.stderr
    (work / "ckpt.pt").write_bytes(b"x")
    r = subprocess.run([str(_bin(env, "diffit-export")), "ckpt.pt"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"diffit-export needs torch and onnxscript, which this installation lacks; install the export extra: " \
           f"{extra}" in r.stderr, r.stderr
    r = subprocess.run([str(py), "-m", "diffit_port", "presets"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["preset", "kind", "input"] and "digits" in r.stdout
    assert f"note: parameter counts need PyTorch, which is not installed: {extra}" in r.stderr
    # training, evaluation and conversion need torch / scikit-learn: one line each, nothing written
    for cmd, msg in ([[str(py), "-m", "diffit_port.train", "--steps", "1", "--out", "run"],
                      f"python -m diffit_port.train needs torch, which this installation lacks; install the torch "
                      f"extra: {extra}"],
                     [[str(py), "-m", "diffit_port.evaluate", "--package", str(pkg), "--runtime", "onnx-cpu"],
                      f"python -m diffit_port.evaluate needs scikit-learn, which this installation lacks; install the "
                      f"torch extra: {extra}"],
                     [[str(_bin(env, "diffit-convert")), "ckpt.pt", "-o", "out.pt"], "diffit-convert needs PyTorch"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr and msg in r.stderr, (cmd, r.stderr)
    assert sorted(p.name for p in work.iterdir()) == ["again.png", "ckpt.pt", "diffit-samples.png", "s.npy"]
