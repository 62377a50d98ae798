"""`export_package`: checkpoint -> validated package directory, staged next to the destination and
renamed into place only when every graph passed its checks."""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from diffit_port.atomic import make_parents, remove_dirs
from diffit_port.checkpoint import CheckpointError, load_model, make_checkpoint, save_atomic
from diffit_port.config import DiffusionConfig
from diffit_port.package import FORMAT, MANIFEST, PackageError, load_package

from .errors import ExportError
from .graphs import PARITY_BATCHES, denoiser_specs, vae_spec
from .manifest import build_manifest, write_manifest
from .onnx_export import export_graph
from .tmsa_op import OPSET
from .validate import check_graph, measure_parity

CFG_MODES = ("none", "in-graph")
CHECKPOINT_FILE = "checkpoint.pt"


class _Phases:
    """Phase lines with elapsed time on stderr (long single steps make a bar uninformative)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            click.echo(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", err=True)


def default_out_dir(checkpoint: str | os.PathLike) -> Path:
    """`<dir>/<stem>-onnx` next to the checkpoint."""
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}-onnx")


def is_package_dir(path: Path) -> bool:
    """Whether `path` holds a diffit package manifest: a JSON object whose `format` is the package format (the
    rest of it may be damaged: --force exists to replace such a package)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_destination(dest: Path, force: bool) -> None:
    if not dest.exists() and not dest.is_symlink():
        return
    if not force:
        raise ExportError(f"{dest} already exists; pass force=True (--force) to replace it")
    # --force replaces a previous package (or an empty directory), never an arbitrary directory: a folder
    # that merely has a file named manifest.json (a web extension, say) is not a package.
    if not dest.is_dir() or dest.is_symlink() or (any(dest.iterdir()) and not is_package_dir(dest)):
        raise ExportError(f"{dest} exists and is not a diffit package (no {MANIFEST} with format {FORMAT!r}); "
                          "refusing to replace it even with --force")


class _KeepWork(ExportError):
    """An export failure after which the work directory still holds the previous package: do not delete it."""


def _move_into_place(stage: Path, dest: Path, work: Path, force: bool) -> None:
    """Rename the staged package to `dest`; a previous package is moved into `work` first and put back if the
    rename fails. Raises ExportError (and leaves `work` alone) if even that fails, naming where the old one is."""
    _check_destination(dest, force)              # again: something may have appeared meanwhile
    previous = work / "previous"
    if dest.exists():
        os.replace(dest, previous)               # removed with the work directory once the new one is in
    try:
        os.replace(stage, dest)
    except OSError as e:
        if previous.exists() and not dest.exists():
            try:
                os.replace(previous, dest)       # put the old package back before the work dir goes
            except OSError:
                raise _KeepWork(f"cannot move the new package to {dest} ({e.strerror}) nor the previous one "
                                f"back; the previous package is in {previous}") from None
        raise


def export_package(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, opset: int = 17,
                   fp16: bool = False, use_ema: bool = True, cfg: str = "none",
                   vae: str | os.PathLike | None = None, force: bool = False, embed_checkpoint: bool = False,
                   progress: bool = True) -> Path:
    """Export a diffit-port checkpoint to a package directory and return its path.

    Writes `denoiser.onnx` (x (batch,C,H,W) float32, t (batch,) float32, y (batch,) int64 -> out
    (batch, C or 2C, H, W) float32), `denoiser_cfg.onnx` with cfg="in-graph" (extra input guidance
    (batch,) float32), `vae_decoder.onnx` with `vae` (a diffusers AutoencoderKL directory),
    `checkpoint.pt` with `embed_checkpoint`, and `manifest.json`. Every graph is checked and its
    ONNX Runtime output compared with PyTorch before anything reaches `out_dir` (default:
    `<checkpoint stem>-onnx` next to the checkpoint); an existing `out_dir` is replaced only with
    `force`. Raises ExportError (ExportValidationError for a failed check).
    """
    if opset != OPSET:
        raise ExportError(f"opset {opset} is not supported: packages are written at opset {OPSET} only")
    if cfg not in CFG_MODES:
        raise ExportError(f"cfg must be one of {', '.join(CFG_MODES)}, got {cfg!r}")
    dest = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint)
    _check_destination(dest, force)
    say = _Phases(progress)

    say(f"reading {checkpoint}")
    try:
        model, ckpt = load_model(checkpoint, use_ema=use_ema)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    preset = ckpt.get("preset")
    weights = "ema" if use_ema and ckpt.get("ema") is not None else "model"
    diffusion = DiffusionConfig.from_dict(ckpt["diffusion_config"])
    sampling = dict(ckpt.get("sampling") or {})
    del ckpt                                     # its tensors are in `model` now; don't hold them twice
    specs = denoiser_specs(model, diffusion=diffusion, fp16=fp16,
                           cfg_in_graph=cfg == "in-graph", guide_channels=int(sampling.get("guide_channels", 0)))
    if vae is not None:
        specs.append(vae_spec(vae, model.cfg))

    try:
        created = make_parents(dest)
        work: Path | None = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise ExportError(f"cannot write the package to {dest}: {e.strerror or e}") from None
    try:
        stage = work / "package"
        stage.mkdir()
        written, parity = {}, {}
        for spec in specs:
            say(f"exporting {spec.file} ({spec.precision})")
            written[spec.name] = export_graph(spec, stage)
            gc.collect()
            say(f"checking {spec.file}")
            check_graph(spec, stage / spec.file)
            say(f"comparing {spec.file} with PyTorch at batch sizes {' and '.join(map(str, PARITY_BATCHES))}")
            parity[spec.name] = measure_parity(spec, stage / spec.file)
        ckpt_file = None
        if embed_checkpoint:
            say(f"writing {CHECKPOINT_FILE} ({weights} weights)")
            save_atomic(make_checkpoint(model, preset=preset, diffusion=diffusion, sampling=sampling),
                        stage / CHECKPOINT_FILE)
            ckpt_file = CHECKPOINT_FILE
        say("hashing files, writing manifest.json")
        manifest = build_manifest(stage, preset=preset, model=model.cfg, diffusion=diffusion, sampling=sampling,
                                  weights=weights, specs=specs, written=written, parity=parity, fp16=fp16,
                                  checkpoint=ckpt_file)
        write_manifest(stage, manifest)
        try:
            load_package(stage, verify_hashes=False)
        except PackageError as e:
            raise ExportError(f"the written manifest does not load: {e}") from None
        _move_into_place(stage, dest, work, force)
    except _KeepWork:
        work = None
        raise
    except OSError as e:                         # a full disk while staging, say: the destination is untouched
        raise ExportError(f"cannot write the package to {dest}: {e.strerror or e}; nothing was written") from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
            if not dest.exists():
                remove_dirs(created)
    say(f"wrote {dest}")
    return dest
