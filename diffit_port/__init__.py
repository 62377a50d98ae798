"""diffit-port: DiffiT in PyTorch, exported to ONNX with a custom time-token attention op, run anywhere.

`import diffit_port` stays torch-free; `build_model` imports torch on first use.
"""

from .config import PRESETS, DiffusionConfig, ModelConfig, Preset, get_preset

__version__ = "0.1.0"


def build_model(spec):
    """A freshly initialised PyTorch denoiser for a preset name, Preset or ModelConfig (imports torch)."""
    from .models import build_model as _build

    return _build(spec)


__all__ = ["PRESETS", "DiffusionConfig", "ModelConfig", "Preset", "get_preset", "build_model", "__version__"]
