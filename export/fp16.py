"""Half-precision copies of a denoiser that keep the normalisation layers in float32."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

# Mean/variance reductions over hundreds of channels are where float16 loses the most (and where
# activations can overflow 65504 when squared): these run in float32.
FP32_MODULES = (nn.LayerNorm, nn.GroupNorm)


class Float32Island(nn.Module):
    """Runs `inner` in float32 inside a half-precision network: cast in, compute, cast back."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def to_half(model: nn.Module, keep_fp32: tuple[type[nn.Module], ...] = FP32_MODULES) -> nn.Module:
    """A float16 copy of `model` (the original is untouched) in which every `keep_fp32` module is a
    float32 island. Softmax needs nothing here: it lives inside the custom node, whose runtimes
    accumulate in float32 (ONNX Runtime CPU does; see docs/PACKAGE_FORMAT.md)."""
    half = copy.deepcopy(model)
    for parent in list(half.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, keep_fp32):
                setattr(parent, name, Float32Island(child))
    half.half()
    for m in half.modules():
        if isinstance(m, Float32Island):
            m.inner.float()
    return half.eval()
