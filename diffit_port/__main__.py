"""`python -m diffit_port presets`: the named presets with their parameter counts (the counts need PyTorch)."""

from __future__ import annotations

import json

import click

from .config import PRESETS
from .extras import TORCH_EXTRA, missing


@click.group()
def cli():
    """diffit-port utilities (training: python -m diffit_port.train; export: diffit-export; sampling: diffit-run)."""


def _count(name: str) -> int:
    import torch

    from .models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(name))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def presets(as_json: bool):
    """List the presets and count each model's parameters (built on the meta device: no memory, no weights).

    Counts include the fixed position embedding of latent models, as the paper's 561M does. Counting builds
    the models with PyTorch; without it (a runtime-only install) the table has no counts and says so.
    """
    has_torch = not missing("torch")
    rows = []
    for name, p in PRESETS.items():
        m = p.model
        rows.append({"preset": name, "kind": m.kind, "input": f"{m.in_channels}x{m.image_size}x{m.image_size}",
                     "classes": m.num_classes, "parameters": _count(name) if has_torch else None,
                     "description": p.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{'preset':<16}{'kind':<8}{'input':<10}{'classes':>8}{'parameters':>15}  description")
        for r in rows:
            count = f"{r['parameters']:>15,}" if has_torch else f"{'-':>15}"
            click.echo(f"{r['preset']:<16}{r['kind']:<8}{r['input']:<10}{r['classes']:>8}{count}  {r['description']}")
    if not has_torch:
        click.echo(f"note: parameter counts need PyTorch, which is not installed: {TORCH_EXTRA}", err=True)


if __name__ == "__main__":
    cli()
