"""What the runtime tests share: tolerances, the tiny packages exported once per session, inputs, and the helpers that
open several runtimes for comparison (OpenVINO left out only where it is not installed)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from diffit_port.runtimes import create_denoiser

STEP_ATOL = 1e-4       # one denoiser call, float32, vs torch float32 (the export's own bound)
LOOP_ATOL = 1e-3       # a whole 20-step loop, float32, vs the same loop on torch
FP16_STEP_ATOL = 1e-2  # float16 package vs torch float32: 20x fp16 roundoff on O(1) outputs (export's bound)

# --------------------------------------------------------------------------------------------------
# Packages, exported once per test session (the `packages` fixture is in conftest.py)
# --------------------------------------------------------------------------------------------------

PACKAGE_KINDS = {
    "tiny": dict(preset="tiny", cfg="in-graph"),              # image-space, windowed TMSA, 10 classes
    "tiny-latent": dict(preset="tiny-latent", cfg="in-graph"),  # latent ViT, learned sigma, 3 guided channels
    "tiny-fp16": dict(preset="tiny", fp16=True),
    "tiny-edm": dict(preset="tiny-edm", cfg="in-graph"),      # the EDM contract: x, sigma, y -> D
    "tiny-edm-fp16": dict(preset="tiny-edm", fp16=True),
}
_BUILT: dict[tuple[str, str], Path] = {}


def package_path(kind: str, tmp_path_factory) -> Path:
    """Export (once per test session) a package of a tiny untrained model, with its checkpoint embedded."""
    root = tmp_path_factory.getbasetemp() / "diffit-packages"
    root.mkdir(exist_ok=True)
    key = (kind, str(root))
    if key not in _BUILT and (root / kind / "manifest.json").is_file():
        _BUILT[key] = root / kind  # exported earlier in this session by another test module
    if key not in _BUILT:
        import torch

        from diffit_port.checkpoint import make_checkpoint, save_atomic
        from diffit_port.config import get_preset
        from diffit_port.export import export_package
        from diffit_port.models import build_model, randomize_zero_init_

        opts = dict(PACKAGE_KINDS[kind])
        preset = opts.pop("preset")
        torch.manual_seed(0)
        model = randomize_zero_init_(build_model(preset))  # the latent head starts at zero otherwise
        ckpt = root / f"{kind}.pt"
        save_atomic(make_checkpoint(model, preset=preset, diffusion=get_preset(preset).diffusion), ckpt)
        _BUILT[key] = export_package(ckpt, root / kind, embed_checkpoint=True, progress=False, **opts)
    return _BUILT[key]


def has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def step_inputs(package, batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (B,C,H,W) float32, t spanning the schedule (fractional too, as Heun feeds), y with the null label."""
    rng = np.random.default_rng(seed)
    m = package.model
    x = rng.standard_normal((batch, m.in_channels, m.image_size, m.image_size)).astype(np.float32)
    t = np.array([0.0, 437.25, 999.0, 120.0][:batch], dtype=np.float32)
    y = np.array([1, m.null_label, 7, 0][:batch], dtype=np.int64)
    return x, t, y


def require_openvino() -> None:
    """Skip only where OpenVINO is not installed at all. An installed OpenVINO that fails to import fails the
    test (importorskip would skip it silently, and with it every other runtime compared in the same test)."""
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (it is in the test extra: pip install -e '.[torch,test]')")
    import openvino  # noqa: F401


# Every CPU runtime compared with torch, one test each: a missing OpenVINO can skip only its own rows.
CPU_RUNTIMES = {"onnx-cpu": ("onnx-cpu", {}), "openvino": ("openvino", {}),
                "openvino-sdpa": ("openvino", {"attention": "sdpa"})}


def open_runtimes(package, names=("torch", "onnx-cpu", "openvino")):
    """Several runtimes at once, for tests that compare them together. OpenVINO is left out only where it is not
    installed at all (an installed one that fails to import fails the test), so it never takes the others'
    comparisons with it the way a skip would; a test that needs it by name then fails on the missing key."""
    if "openvino" in names:
        if importlib.util.find_spec("openvino") is None:
            names = tuple(n for n in names if n != "openvino")
        else:
            import openvino  # noqa: F401
    return {n: create_denoiser(n, package, threads=1) for n in names}


def open_runtime(package, name: str):
    """The denoiser of CPU_RUNTIMES[name] (one thread)."""
    runtime, opts = CPU_RUNTIMES[name]
    if runtime == "openvino":
        require_openvino()
    return create_denoiser(runtime, package, threads=1, **opts)


needs_cuda = pytest.mark.skipif(
    not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU host)")


def cuda_count() -> int:
    r = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True) if shutil.which("nvidia-smi") \
        else None
    return len([ln for ln in r.stdout.splitlines() if ln.startswith("GPU")]) if r and r.returncode == 0 else 0


def assert_fp16_figures(d: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray, what: str) -> None:
    """Print and bound (FP16_STEP_ATOL, absolute and relative L2) onnx-cpu and openvino against d["torch"],
    the float32 model the fp16 package was exported from (its embedded checkpoint)."""
    ref = d["torch"](x, t, y)
    errs = {}
    for name in ("onnx-cpu", "openvino"):
        out = d[name](x, t, y)
        errs[name] = (float(np.abs(out - ref).max()), float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    print(f"\n{what} step vs torch fp32 (max|diff|, rel L2): "
          + ", ".join(f"{k} {a:.2e}/{r:.2e}" for k, (a, r) in errs.items()))
    assert all(a <= FP16_STEP_ATOL and r <= FP16_STEP_ATOL for a, r in errs.values()), errs
