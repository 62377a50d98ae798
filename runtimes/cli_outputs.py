"""What a `diffit-run` writes: every output path checked before any session opens, the writers opened (their
temporary files made) before sampling, and the one-line errors of a run stopped after they were opened."""

from __future__ import annotations

import os
from pathlib import Path

import click

from diffit_port.outputs import (GridWriter, ImageDirWriter, NpyWriter, OutputError, WriteError, Writer, check_distinct,
                                 check_output_dir, check_output_file, discard_all)
from diffit_port.package import Package

from .base import RuntimeUnavailable
from .generate import NonFiniteSamples, image_shape


class RuntimeMissing(click.ClickException):
    """The requested runtime's backend is not installed or cannot start: exit code 2, nothing written."""

    exit_code = 2


def _inside(path: str | os.PathLike, root: Path) -> bool:
    return Path(os.path.abspath(path)).resolve().is_relative_to(root.resolve())


def check_outputs(package: Package, output: Path | None, output_dir: Path | None, save_npy: Path | None,
                  cache_dir: str | None) -> None:
    """Every output path is usable (extension, no file in the way, a writable place) before anything runs;
    nothing may land inside the package, whose integrity check would then refuse it."""
    named = {"--output": output, "--save-npy": save_npy, "--output-dir": output_dir, "--cache-dir": cache_dir}
    for flag, path in named.items():
        if path is not None and _inside(path, package.root):
            raise click.UsageError(f"{flag} {path} is inside the package {package.root}; the package's integrity "
                                   "check would refuse it on the next run: choose a directory outside it")
    try:
        if output is not None:
            check_output_file(output, ".png", "--output")
        if save_npy is not None:
            check_output_file(save_npy, ".npy", "--save-npy")
        if output_dir is not None:
            check_output_dir(output_dir, "--output-dir")
            for flag, path in (("--output", output), ("--save-npy", save_npy)):
                if path is not None and _inside(path, output_dir):
                    raise OutputError(f"{flag} {path} is inside --output-dir {output_dir}; put it elsewhere")
        check_distinct({"--output": output, "--save-npy": save_npy})
    except OutputError as e:
        raise click.UsageError(str(e)) from None


def output_shape(package: Package) -> tuple[int, int, int]:
    """(C, H, W) of what is written: the VAE decoder's image when the package has one, else the samples."""
    if package.has_graph("vae_decoder"):
        return tuple(int(d) for d in package.manifest["graphs"]["vae_decoder"]["outputs"][0]["shape"][1:])
    return image_shape(package)


def open_writers(package: Package, n: int, output: Path | None, output_dir: Path | None, save_npy: Path | None,
                 scale: int) -> list[Writer]:
    """The writers' temporary files are created now, before any session opens: an unwritable place or a
    disk without room for the .npy stops the run here."""
    shape = output_shape(package)
    writers: list[Writer] = []
    try:
        if save_npy is not None:
            writers.append(NpyWriter(save_npy, n, shape))
        if output_dir is not None:
            writers.append(ImageDirWriter(output_dir, n))
        if output is not None:
            writers.append(GridWriter(output, n, shape, scale=scale))
    except BaseException as e:
        discard_all(writers)
        reraise_cleanly(e)
    return writers


def reraise_cleanly(e: BaseException) -> None:
    """The one-line click error for what stopped a run after its outputs were opened (they are discarded)."""
    nothing = "; nothing was written"
    if isinstance(e, NonFiniteSamples):
        raise click.ClickException(f"stopped: {e}{nothing}") from None
    if isinstance(e, WriteError):
        raise click.ClickException(f"{e}{nothing} (any previous file is unchanged)") from None
    if isinstance(e, OutputError):
        raise click.UsageError(str(e)) from None
    if isinstance(e, RuntimeUnavailable):          # the VAE decoder's backend, opened after the sessions
        raise RuntimeMissing(str(e)) from None
    if isinstance(e, OSError):
        raise click.ClickException(f"{e.filename or 'output'}: {e.strerror or e}{nothing}") from None
    if isinstance(e, ValueError):
        raise click.UsageError(str(e)) from None
    raise e
