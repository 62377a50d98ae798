"""What a benchmark row is measured against: model FLOPs per image (torch FlopCounterMode, once), the machine's
measured matmul peak in the same process, the machine and its load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Any


def model_flops_per_image(model_cfg: Any) -> float | None:
    """FLOPs of one denoiser forward at batch 1 (matmuls, convolutions, attention; element-wise work is not
    counted), from torch's FlopCounterMode on a meta-device model (nothing is computed); None without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from diffit_port.models import build_model
    except ImportError:
        return None
    with torch.device("meta"):
        model = build_model(model_cfg).eval()
        m = model_cfg
        x = torch.zeros(1, m.in_channels, m.image_size, m.image_size)
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return float(counter.get_total_flops())


def _best_seconds(fn, reps: int) -> float:
    """The fastest of `reps` timed calls after one warm-up: a peak is what the machine can do at best."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measured_peak(cuda: bool) -> tuple[float, str]:
    """(FLOP/s, what was measured): a large bf16 matmul through torch on CUDA; on the CPU an fp32 matmul
    (torch, else NumPy) with the process's default threads."""
    if cuda:
        import torch

        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

        def mm():
            for _ in range(10):
                a @ b
            torch.cuda.synchronize()

        return 10 * 2 * n**3 / _best_seconds(mm, 5), f"torch bf16 matmul {n}^3 on {torch.cuda.get_device_name()}"
    n = 2048
    try:
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        text = f"torch fp32 matmul {n}^3, {torch.get_num_threads()} threads"
        return 2 * n**3 / _best_seconds(lambda: a @ b, 5), text
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        return 2 * n**3 / _best_seconds(lambda: a @ a, 5), f"NumPy fp32 matmul {n}^3"


def load_average() -> float:
    """The 1-minute load average (what 'quiet' is judged by)."""
    return os.getloadavg()[0]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs"]
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if gpus.returncode == 0 and gpus.stdout.strip():
            parts.append("GPU: " + "; ".join(ln.strip() for ln in gpus.stdout.splitlines()))
    except (OSError, subprocess.SubprocessError):
        pass
    versions = []
    try:
        import onnxruntime

        providers = ",".join(p.replace("ExecutionProvider", "") for p in onnxruntime.get_available_providers())
        versions.append(f"onnxruntime {onnxruntime.__version__} ({providers})")
    except ImportError:
        pass
    for dist in ("openvino", "torch", "numpy"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    parts.append(f"Python {platform.python_version()}, " + ", ".join(versions))
    return "; ".join(parts)
