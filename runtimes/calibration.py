"""The calibration run behind both int8 graphs (onnx-cpu's `ort_int8`, openvino's `ov_int8`): the denoiser calls of
the package's own default sampling on a few images, from pure noise to the last step, which the quantizers take the
ranges of the activations from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import numpy as np

from diffit_port.package import Package

from .base import Denoiser

CALIBRATION_IMAGES = 4   # images of the calibration run (with guidance the denoiser sees twice as many rows a call)
CALIBRATION_SEED = 0
CALIBRATION_STEPS = 10   # at most this many sampler steps (the same noise levels from sigma_max down, fewer of them)
CALIBRATION_CALLS = 10   # at most this many of the run's calls, evenly spaced, are the quantizer's calibration set


def calibration_run(package: Package, graph: str, denoiser: Denoiser) -> None:
    """The package's default sampling (its sampler and guidance, at most CALIBRATION_STEPS steps; in-graph guidance
    for the "denoiser_cfg" graph) of CALIBRATION_IMAGES images, one of each class in turn, on `denoiser` (one that
    records its calls); the samples are dropped."""
    from .generate import SamplingConfig, default_labels, generate

    cfg = SamplingConfig.from_package(package, num_images=CALIBRATION_IMAGES, batch_size=CALIBRATION_IMAGES,
                                      seed=CALIBRATION_SEED, cfg="in-graph" if graph == "denoiser_cfg" else None)
    cfg = replace(cfg, steps=min(cfg.steps, CALIBRATION_STEPS))
    generate([denoiser], package, cfg, default_labels(package, CALIBRATION_IMAGES))


def evenly_spaced(calls: list[Any]) -> list[Any]:
    """At most CALIBRATION_CALLS of `calls`, evenly spaced, the first and the last included."""
    n = len(calls)
    keep = np.unique(np.linspace(0, n - 1, min(n, CALIBRATION_CALLS)).round().astype(int))
    return [calls[i] for i in keep]


def calibration_key(package: Package, graph: str, *extra: Any) -> str:
    """24 hex digits naming a calibrated int8 graph in a cache: a hash of everything it depends on besides `extra`
    (the runtime's own settings and versions): the manifest (which holds the graph's sha256 and the default
    sampling), the graph's name and the calibration settings."""
    key = json.dumps([package.manifest, graph, CALIBRATION_IMAGES, CALIBRATION_SEED, CALIBRATION_STEPS,
                      CALIBRATION_CALLS, *extra], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]
