"""`diffit-convert`: an official NVlabs/DiffiT checkpoint -> a diffit-port checkpoint (torch imported lazily)."""

from __future__ import annotations

from pathlib import Path

import click

EXAMPLES = """
\b
Examples:
  diffit-convert diffit_256.safetensors -o xl.pt
      infers the config from the tensors (here: preset latent-xl2-256) and writes xl.pt
  diffit-convert diffit_512.safetensors -o xl512.pt --preset latent-xl2-512
      also checks the tensors against the preset
  diffit-convert train/checkpoints/0400000.pt -o mine.pt --no-ema
      a DiT-style training checkpoint: the raw 'model' weights instead of 'ema'

\b
Then, as for any project checkpoint:
  diffit-export --opset 17 xl.pt --vae ./sd-vae-ft-ema
  diffit-run --package xl-onnx --runtime onnx-cuda --labels 207,360,387,974 --output dogs.png

\b
The output holds the release's diffusion (linear betas, 1000 steps, learned-range variance) and sampling
defaults (DDPM 250 steps; 256 px: guidance 4.4 with the power-cosine schedule on the first 3 latent
channels; 512 px: constant 1.49). Every key must be known and every shape must fit, and the file's
pos_embed and relative-position indices must equal what this project computes, else nothing is written.
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "dst", type=click.Path(dir_okay=False, path_type=Path), required=True,
              metavar="DST.pt", help="The diffit-port checkpoint to write.")
@click.option("--preset", default=None, metavar="NAME",
              help="Check the tensors against this preset (e.g. latent-xl2-256) instead of only inferring.")
@click.option("--ema/--no-ema", "use_ema", default=None,
              help="For files with both 'ema' and 'model' entries: which to convert  [default: ema]")
@click.option("--force", is_flag=True, help="Replace an existing DST.")
def main(src: Path, dst: Path, preset: str | None, use_ema: bool | None, force: bool) -> None:
    """Convert SRC, an official DiffiT latent checkpoint (.safetensors, or .pt/.pth read with
    weights_only=True), into a diffit-port checkpoint that diffit-export and `diffit-run --runtime torch` take."""
    try:
        import torch  # noqa: F401  (the conversion builds the PyTorch model)
    except ImportError:
        raise click.ClickException("diffit-convert needs PyTorch: pip install 'diffit-port[torch]'") from None
    from diffit_port.convert import ConvertError, convert

    try:
        done = convert(src, dst, preset=preset, use_ema=use_ema, force=force)
    except ConvertError as e:
        raise click.ClickException(str(e)) from None
    c = done.config
    kept = done.source_dtypes == ("float32",)
    click.echo(f"read {src}: {done.source_entry}, {'/'.join(done.source_dtypes)} tensors"
               f"{'' if kept else ', stored as float32'}", err=True)
    click.echo(f"{done.path}: preset {done.preset or 'none (sampling defaults written explicitly)'}, latent "
               f"{c.in_channels}x{c.image_size}x{c.image_size}, patch {c.patch_size}, width {c.hidden_size}, "
               f"depth {c.depth}, {c.num_heads} heads, {c.num_classes} classes, "
               f"learn_sigma={c.learn_sigma}")


if __name__ == "__main__":  # pragma: no cover
    main()
