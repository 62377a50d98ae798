"""`python -m diffit_port presets`: the named presets with their parameter counts."""

from __future__ import annotations

import click

from .config import PRESETS


@click.group()
def cli():
    """diffit-port utilities (training: python -m diffit_port.train; export: diffit-export; sampling: diffit-run)."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def presets(as_json: bool):
    """List the presets and count each model's parameters (built on the meta device: no memory, no weights).

    Counts include the fixed position embedding of latent models, as the paper's 561M does.
    """
    import json

    import torch

    from .models import build_model, count_parameters

    rows = []
    for name, p in PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(build_model(name))
        m = p.model
        shape = f"{m.in_channels}x{m.image_size}x{m.image_size}"
        rows.append({"preset": name, "kind": m.kind, "input": shape, "classes": m.num_classes,
                     "parameters": n, "description": p.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'preset':<16}{'kind':<8}{'input':<10}{'classes':>8}{'parameters':>15}  description")
    for r in rows:
        click.echo(f"{r['preset']:<16}{r['kind']:<8}{r['input']:<10}{r['classes']:>8}{r['parameters']:>15,}"
                   f"  {r['description']}")


if __name__ == "__main__":
    cli()
