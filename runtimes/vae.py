"""The package's optional VAE decoder (input `latents`, output `image` in [-1, 1]) on the runtime's backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffit_port.package import Package

from .base import RuntimeUnavailable


class VaeDecoder:
    """latents float32 (B, C, h, w) -> image float32 (B, 3, H, W) in [-1, 1], in batches."""

    def __init__(self, run: Any, backend: str):
        self._run, self.backend = run, backend

    def __call__(self, latents: np.ndarray, batch_size: int = 8) -> np.ndarray:
        # The graph itself undoes the latent scaling (z / scaling_factor + shift_factor): feed sampler latents.
        z = np.asarray(latents, dtype=np.float32)
        parts = [self._run(np.ascontiguousarray(z[i:i + batch_size])) for i in range(0, len(z), batch_size)]
        return np.concatenate(parts).astype(np.float32)


def create_vae_decoder(package: Package, runtime: str, device: str | None = None) -> VaeDecoder:
    """ONNX Runtime for the onnx-* runtimes (CUDA for onnx-cuda), OpenVINO for openvino; the torch runtime
    uses onnxruntime on the CPU when installed, else OpenVINO."""
    path = package.graph_path("vae_decoder")
    if runtime == "openvino":
        return _openvino_decoder(path, device or "CPU")
    from .onnx_cuda import cuda_device_id
    from .onnx_rt import create_graph_session

    cuda = cuda_device_id(device) if runtime == "onnx-cuda" else None
    try:
        session = create_graph_session(path, cuda_device=cuda)
    except RuntimeUnavailable:
        if runtime != "torch":
            raise
        return _openvino_decoder(path, "CPU")
    return VaeDecoder(lambda z: session.run(None, {"latents": z})[0], "onnxruntime")


def _openvino_decoder(path: Path, device: str) -> VaeDecoder:
    from .openvino_rt import create_graph_model

    compiled = create_graph_model(path, device=device)
    out = compiled.output(0)
    # The compiled model reuses its output tensor on the next call: copy it out.
    return VaeDecoder(lambda z: np.array(compiled({"latents": z})[out], copy=True), "openvino")
