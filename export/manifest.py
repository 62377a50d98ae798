"""The package manifest (`manifest.json`) as the exporter writes it; docs/PACKAGE_FORMAT.md is its spec
and `diffit_port.package` its reader."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from diffit_port.atomic import write_text
from diffit_port.config import DiffusionConfig, ModelConfig
from diffit_port.package import (CUSTOM_DOMAIN, CUSTOM_OP, CUSTOM_OP_VERSION, FORMAT, FORMAT_VERSION, MANIFEST,
                                 hash_files)

from .graphs import GraphSpec
from .onnx_export import IR_VERSION
from .tmsa_op import OPSET

_PRODUCERS = ("diffit-port", "torch", "onnx", "onnxscript", "onnxruntime")


def producer(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the distributions that made the package, and of Python."""
    out = {}
    for dist in (*_PRODUCERS, *extra):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    out["python"] = platform.python_version()
    return out


def graph_entry(spec: GraphSpec, files: list[Path]) -> dict[str, Any]:
    entry = {"file": spec.file, "inputs": [s.to_dict() for s in spec.inputs],
             "outputs": [s.to_dict() for s in spec.outputs], "precision": spec.precision,
             "external_data": [f.name for f in files if f.name != spec.file], "custom_nodes": spec.custom_nodes}
    entry.update(spec.extra)
    return entry


def build_manifest(root: Path, *, preset: str | None, model: ModelConfig, diffusion: DiffusionConfig,
                   sampling: dict[str, Any], weights: str, specs: list[GraphSpec],
                   written: dict[str, list[Path]], parity: dict[str, dict[str, Any]], fp16: bool,
                   checkpoint: str | None) -> dict[str, Any]:
    """The manifest for the files already written under `root` (hashed here: write it last)."""
    vae = next((s for s in specs if s.name == "vae_decoder"), None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "model": model.to_dict(),
        "diffusion": diffusion.to_dict(),
        "sampling": dict(sampling),
        "image": {"channels": model.in_channels, "height": model.image_size, "width": model.image_size,
                  "space": "latents" if model.kind == "latent" else "pixels"},
        "num_classes": model.num_classes,
        "null_label": model.null_label,
        "prediction": diffusion.prediction,
        "learn_sigma": model.learn_sigma,
        "weights": weights,
        "graphs": {s.name: graph_entry(s, written[s.name]) for s in specs},
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "custom_ops": [{"domain": CUSTOM_DOMAIN, "op_type": CUSTOM_OP, "version": CUSTOM_OP_VERSION,
                        "count": specs[0].custom_nodes}],
        "precision": "fp16" if fp16 else "fp32",
        "parity": parity,
        "vae": None if vae is None else {k: vae.extra[k] for k in ("scaling_factor", "shift_factor", "upsampling")},
        "producer": producer(("diffusers",) if vae is not None else ()),
        "checkpoint": checkpoint,
        "files": hash_files(root),
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    return write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
