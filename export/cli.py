"""`diffit-export`: a training checkpoint -> a validated ONNX package directory (torch is imported only to export,
so --help works on a runtime-only install)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from diffit_port.extras import TORCH_EXTRA, missing, missing_message
from diffit_port.schema import OPSET

from .errors import ExportError

# What exporting imports beyond the runtime install, and the extra that provides it.
EXPORT_NEEDS = ("torch", "onnxscript")

EXAMPLES = f"""
\b
Examples:
  diffit-export --opset 17 runs/digits/ckpt.pt
      -> runs/digits/ckpt-onnx/ (denoiser.onnx + manifest.json), EMA weights, float32
  diffit-export --opset 17 ckpt.pt -o pkg/ --cfg in-graph --embed-checkpoint --force
      adds denoiser_cfg.onnx (guidance in the graph) and checkpoint.pt (for diffit-run --runtime torch)
  diffit-export --opset 17 latent.pt --fp16 --vae ./sd-vae-ft-ema
      float16 weights (float32 I/O) plus vae_decoder.onnx from a local diffusers AutoencoderKL directory

\b
Exporting needs PyTorch and onnxscript ({TORCH_EXTRA}); running a package does not.
Every graph is checked (ONNX checker, strict shape inference) and run in onnxruntime against the
PyTorch model at batch sizes 1 and 3 before anything is written; a tolerance miss is an error
(float32: max |diff| <= 1e-4). Exit codes: 0 written, 1 export or I/O error, 2 usage error.
Run the package with `diffit-run`; docs/PACKAGE_FORMAT.md describes its files and the custom
TimeTokenAttention op.
"""


def _opset(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value != OPSET:
        raise click.BadParameter(f"{value} is not supported: packages are written at ONNX opset {OPSET} only "
                                 f"(pass --opset {OPSET})")
    return value


def _size(path: Path) -> str:
    n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--opset", type=int, default=OPSET, show_default=True, callback=_opset,
              help=f"ONNX opset of the standard domain; only {OPSET} is written.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Package directory  [default: <checkpoint stem>-onnx next to the checkpoint]")
@click.option("--fp16", is_flag=True, help="Float16 weights and compute (norms stay float32; I/O stays float32).")
@click.option("--ema/--no-ema", default=True, show_default=True,
              help="Export the EMA weights (when the checkpoint has them) or the raw training weights.")
@click.option("--cfg", type=click.Choice(["none", "in-graph"]), default="none", show_default=True,
              help="in-graph: also write denoiser_cfg.onnx, which takes a per-sample `guidance` scale.")
@click.option("--vae", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="diffusers AutoencoderKL directory (save_pretrained layout) -> vae_decoder.onnx; latent models.")
@click.option("--embed-checkpoint", is_flag=True,
              help="Add checkpoint.pt, a weights-only copy of the exported weights (for the torch runtime).")
@click.option("--force", is_flag=True, help="Replace an existing package directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(checkpoint: Path, opset: int, out_dir: Path | None, fp16: bool, ema: bool, cfg: str, vae: Path | None,
         embed_checkpoint: bool, force: bool, quiet: bool) -> None:
    """Export a diffit-port CHECKPOINT to an ONNX package (opset 17, one custom TimeTokenAttention
    node per attention layer, a model-local function so stock onnxruntime runs it)."""
    lacking = missing(*EXPORT_NEEDS)
    if lacking:
        raise click.UsageError(missing_message("diffit-export", lacking, "export"))
    from .package_writer import export_package

    try:
        dest = export_package(checkpoint, out_dir, opset=opset, fp16=fp16, use_ema=ema, cfg=cfg, vae=vae,
                              force=force, embed_checkpoint=embed_checkpoint, progress=not quiet)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    manifest = json.loads((dest / "manifest.json").read_text())
    figures = ", ".join(f"{name} max_abs {p['max_abs']:.2g} rel_l2 {p['rel_l2']:.2g}"
                        for name, p in manifest["parity"].items())
    click.echo(f"{dest} ({_size(dest)}, {manifest['precision']}): {figures}")
