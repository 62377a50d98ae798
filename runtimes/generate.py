"""The sampling run every runtime shares: per-image noise, labels, guidance, batches split over one or more
denoiser sessions (one per device), streamed batch by batch to a sink or gathered in image order."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from diffit_port import samplers
from diffit_port.package import Package
from diffit_port.schema import CONTRACTS

from .base import Denoiser
from .capture_gate import GATE


@dataclass(frozen=True)
class SamplingConfig:
    """What one `diffit-run` samples; defaults come from the package manifest's sampling section."""

    sampler: str = "ddim"
    steps: int = 10
    seed: int = 0
    num_images: int = 16
    batch_size: int = 16           # per denoiser session; guidance on the sampler side doubles it per call
    guidance: float = 1.0          # classifier-free guidance scale w (1 = off)
    guidance_schedule: str = "constant"  # "power-cosine" for eps packages only (it is defined on t)
    guidance_power: float = 4.0    # exponent of the power-cosine schedule
    guide_channels: int = 0        # guide only the first k eps channels (0 = all)
    cfg: str = "sampler"           # "sampler": classifier_free_guidance around the step; "in-graph": denoiser_cfg
    eta: float = 0.0               # DDIM only
    clip_denoised: bool = False    # clip x_0 estimates (eps) or D (EDM) to [-1, 1] (as the package records)
    device_loop: bool = False      # run the sampler update on the denoiser's device (onnx-cpu, onnx-cuda)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_package(cls, package: Package, **overrides: Any) -> SamplingConfig:
        """The config with the defaults of the package manifest's sampling section (sampler, steps, guidance,
        guidance_schedule, guidance_power, guide_channels, clip_denoised; the field defaults where the
        manifest has none, and heun for an EDM package without a sampler), then `overrides` (any field; a
        None value keeps the default). An unconditional package samples with guidance 1 and the constant schedule
        unless `guidance` itself is given.
        Nothing is validated here: generate() checks the config against the package."""
        s = package.sampling
        values: dict[str, Any] = {
            "sampler": s.get("sampler", "heun" if package.diffusion.is_edm else cls.sampler),
            "steps": int(s.get("steps", cls.steps)),
            "guidance": float(s.get("guidance", cls.guidance)),
            "guidance_schedule": s.get("guidance_schedule", cls.guidance_schedule),
            "guidance_power": float(s.get("guidance_power", cls.guidance_power)),
            "guide_channels": int(s.get("guide_channels", cls.guide_channels)),
            "clip_denoised": bool(s.get("clip_denoised", cls.clip_denoised)),
        }
        given = {k: v for k, v in overrides.items() if v is not None}
        if package.model.num_classes == 0 and "guidance" not in given:
            given.pop("guidance_schedule", None)
            values.update(guidance=1.0, guidance_schedule="constant")
        return cls(**{**values, **given})


def image_shape(package: Package) -> tuple[int, int, int]:
    """(C, H, W) of what the denoiser samples (latents for a latent package)."""
    img = package.manifest.get("image")
    if img:
        return int(img["channels"]), int(img["height"]), int(img["width"])
    m = package.model
    return m.in_channels, m.image_size, m.image_size


def default_labels(package: Package, num_images: int) -> np.ndarray:
    """int64 (N,): image i gets class i % num_classes; the null label for an unconditional package."""
    k = package.model.num_classes
    if k == 0:
        return np.full(num_images, package.model.null_label, dtype=np.int64)
    return np.arange(num_images, dtype=np.int64) % k


def cycle_labels(labels: list[int], num_images: int, package: Package) -> np.ndarray:
    """int64 (N,): image i gets labels[i % len(labels)]; each label in 0..num_classes (num_classes is
    the null label: an unguided, unconditional sample)."""
    if not labels:
        raise ValueError("no labels given")
    k = package.model.num_classes
    bad = [lab for lab in labels if not 0 <= lab <= k]
    if bad:
        what = f"classes 0..{k - 1} (or {k}, the null label)" if k else "only the null label 0 (unconditional model)"
        raise ValueError(f"labels {bad} are out of range: this package has {k} classes; use {what}")
    return np.array([labels[i % len(labels)] for i in range(num_images)], dtype=np.int64)


def in_graph_step(denoiser: Denoiser, package: Package, cfg: SamplingConfig) -> samplers.Denoise:
    """The step for the in-graph guidance graph: the denoiser fed with the guidance scale s(t) per sample."""
    T = package.diffusion.num_timesteps

    def step(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = samplers.guidance_scale(t, cfg.guidance, cfg.guidance_schedule, cfg.guidance_power, T)
        return denoiser(x, t, y, guidance=s.astype(np.float32))

    return step


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering 0..n-1, sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def check_config(package: Package, cfg: SamplingConfig) -> None:
    """ValueError when `cfg` cannot run on `package` (checked before any session is opened): a sampler or
    guidance schedule the package's contract has not, a guidance scale that is not finite and >= 0, or a
    graph whose time input is not the contract's."""
    prediction = package.diffusion.prediction
    samplers.check_sampler(cfg.sampler, prediction)
    samplers.check_guidance_schedule(prediction, cfg.guidance_schedule)
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (1 = off), got {cfg.guidance}")
    graph = package.manifest["graphs"].get("denoiser_cfg" if cfg.cfg == "in-graph" else "denoiser", {})
    names = [i["name"] for i in graph.get("inputs", [])]
    want = CONTRACTS[prediction]
    if names and want not in names:
        raise ValueError(f"the package says prediction {prediction!r} but its graph takes {names}, not {want!r}")
    if cfg.cfg == "in-graph" and not package.has_graph("denoiser_cfg"):
        raise ValueError("this package has no denoiser_cfg graph: use sampler-side guidance (--cfg sampler)")
    if package.model.num_classes == 0 and (cfg.guidance != 1 or cfg.guidance_schedule != "constant"):
        raise ValueError("an unconditional package cannot use classifier-free guidance (set guidance to 1)")
    if cfg.device_loop and cfg.cfg == "in-graph":
        raise ValueError("the device loop does sampler-side guidance only (use --cfg sampler)")


Sink = Callable[[int, np.ndarray], None]


class NonFiniteSamples(samplers.NonFiniteError):
    """A sampler's NonFiniteError in a run of many images: also names the runtime and the failed batch."""

    def __init__(self, err: samplers.NonFiniteError, runtime: str, first: int, last: int):
        super().__init__(err.what, err.step, err.t)
        self.runtime, self.first, self.last = runtime, first, last
        self.args = (f"{err} on the {runtime} runtime (batch of images {first}..{last})",)


def _run_batch(batches: Iterator[np.ndarray], runtime: str, cfg: SamplingConfig, a: int, b: int,
               failed: threading.Event, sink: Callable[[np.ndarray], None], lock: threading.Lock) -> None:
    """The next batch (images a..b-1) of `batches` into `sink`, under `lock`; a non-finite value (also in the final
    samples) sets `failed` and raises NonFiniteSamples, as does any other error (raised as it is)."""
    try:
        # NumPy's own overflow / invalid-value warnings would only repeat what NonFiniteError reports.
        with np.errstate(all="ignore"):
            x0 = next(batches)
        if not np.isfinite(x0).all():        # the last update after the last denoiser call
            raise samplers.NonFiniteError("final samples", samplers.num_denoiser_calls(cfg.sampler, cfg.steps) - 1,
                                          0.0)
    except samplers.NonFiniteError as e:
        failed.set()
        raise NonFiniteSamples(e, runtime, a, b - 1) from None
    except BaseException:
        failed.set()
        raise
    with lock:
        sink(np.asarray(x0, dtype=np.float32))     # each batch's own array: no copy needed


def stream(denoisers: list[Denoiser], package: Package, cfg: SamplingConfig, labels: np.ndarray, sink: Sink, *,
           on_call: Callable[[], None] | None = None) -> None:
    """Sample and hand every finished batch to `sink(start, x0)`: x0 float32 (b, C, H, W) final samples of
    images start..start+b-1 (unclipped; latents for a latent package). Nothing else is kept, so memory does
    not grow with `cfg.num_images`.

    Images are split into contiguous chunks, one per denoiser (each a session on its own device, run in
    its own thread), and each chunk into batches of `cfg.batch_size`. Image i always draws its noise from
    stream i of `NoiseSource(seed, N)`, so any split gives the same images. `sink` and `on_call` (after
    every denoiser call) are serialised here. A non-finite value stops every session and raises
    NonFiniteSamples before that batch reaches the sink."""
    if not denoisers:
        raise ValueError("no denoiser given")
    check_config(package, cfg)
    C, H, W = image_shape(package)
    N = cfg.num_images
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape ({N},), got {labels.shape}")
    schedule = samplers.schedule_from_config(package.diffusion)
    noise = samplers.NoiseSource(cfg.seed, N)
    lock, failed = threading.Lock(), threading.Event()

    def tick(i: int, n: int) -> None:
        if on_call is not None:
            with lock:
                on_call()

    def run_chunk(denoiser: Denoiser, start: int, stop: int) -> None:
        # In-graph guidance: the graph guides itself (null_label=None: no wrapping). Sampler side:
        # sample_batches wraps the plain step in classifier_free_guidance (conditional packages only).
        in_graph = cfg.cfg == "in-graph"
        step = in_graph_step(denoiser, package, cfg) if in_graph else denoiser
        null = None if in_graph or package.model.num_classes == 0 else package.model.null_label
        loop = getattr(denoiser, "device_loop", None) if cfg.device_loop else None
        if cfg.device_loop and loop is None:   # the same run with x and the sampler state on the session's device
            raise ValueError(f"the {denoiser.name} runtime has no device loop (onnx-cpu and onnx-cuda have)")
        kwargs = dict(null_label=null, guidance=cfg.guidance, guidance_schedule=cfg.guidance_schedule,
                      guidance_power=cfg.guidance_power, guide_channels=cfg.guide_channels, eta=cfg.eta,
                      clip_denoised=cfg.clip_denoised, callback=tick)
        spans = [(a, min(a + cfg.batch_size, stop)) for a in range(start, stop, cfg.batch_size)]
        if loop is not None:   # the chunk's batches in one iter_batches (with `ahead`, each prepared during the last)
            pairs = loop.iter_batches(cfg.sampler, noise.split(start, stop), (C, H, W), labels[start:stop], schedule,
                                      cfg.steps, batch_size=cfg.batch_size, **kwargs)
            batches = (x0 for _, x0 in pairs)
        else:
            pairs = None
            batches = (samplers.sample_batches(cfg.sampler, step, noise.split(a, b), (C, H, W), labels[a:b], schedule,
                                               cfg.steps, batch_size=b - a, **kwargs) for a, b in spans)
        try:
            for a, b in spans:
                if failed.is_set():
                    return
                _run_batch(batches, denoiser.name, cfg, a, b, failed, lambda x0: sink(a, x0), lock)
        finally:
            batches.close()
            if pairs is not None:
                pairs.close()     # an early stop waits for a batch the loop's worker is preparing

    work = [(d, a, b) for d, (a, b) in zip(denoisers, split_evenly(N, len(denoisers))) if b > a]
    if len(work) == 1:
        run_chunk(*work[0])
    else:   # CUDA-graph sessions in several threads capture one at a time (capture_gate)
        with GATE.threads(len(work)), ThreadPoolExecutor(max_workers=len(work),
                                                         thread_name_prefix="diffit-session") as pool:
            for f in [pool.submit(run_chunk, *w) for w in work]:
                f.result()


def generate(denoisers: list[Denoiser], package: Package, cfg: SamplingConfig, labels: np.ndarray, *,
             on_call: Callable[[], None] | None = None) -> np.ndarray:
    """float32 (N, C, H, W) final samples x_0 of `stream` gathered in one array (unclipped; latents for a
    latent package): the library form, for runs whose samples fit in memory."""
    out = np.empty((cfg.num_images, *image_shape(package)), dtype=np.float32)

    def keep(start: int, x0: np.ndarray) -> None:
        out[start:start + len(x0)] = x0

    stream(denoisers, package, cfg, labels, keep, on_call=on_call)
    return out


def num_calls(cfg: SamplingConfig, num_sessions: int) -> int:
    """Denoiser calls the whole run makes (the progress bar's total)."""
    per_batch = samplers.num_denoiser_calls(cfg.sampler, cfg.steps)
    total = 0
    for a, b in split_evenly(cfg.num_images, num_sessions):
        total += -(-(b - a) // cfg.batch_size) * per_batch
    return total
