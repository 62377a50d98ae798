"""What the diffit-run tests share: the summary line's pattern, a CliRunner call, a short run's options, a package
poisoned to give non-finite output, and checks of a failed run (one error line, the output directory untouched)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from diffit_port.runtimes.cli import main

SUMMARY = re.compile(r"^runtime=(\S+) provider=\S+ device=\S+ precision=(\w+) sampler=(\S+) steps=(\d+) "
                     r"images=(\d+) batch=\d+ cfg=\S+ guidance=\S+ wall=[\d.]+s images/s=[\d.]+$")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


BASE = ["--num-images", "5", "--batch-size", "2", "--steps", "4", "--threads", "1", "--no-progress"]


def poisoned_package(src: Path, dst: Path, value: float = float("nan")) -> Path:
    """A copy of package `src` whose final convolution bias is `value` in every graph and in the embedded
    checkpoint, re-hashed so that it passes the integrity check: every runtime's denoiser output is non-finite."""
    import onnx
    import torch
    from onnx import numpy_helper

    from diffit_port.package import MANIFEST, hash_files

    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    for entry in manifest["graphs"].values():
        model = onnx.load(str(dst / entry["file"]))
        hit = [t for t in model.graph.initializer if t.name.endswith("head.2.bias")]
        assert hit, entry["file"]
        for t in hit:
            t.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(t), value), t.name))
        onnx.save(model, str(dst / entry["file"]))
    ckpt = torch.load(dst / "checkpoint.pt", weights_only=True)
    ckpt["model"]["head.2.bias"].fill_(value)
    torch.save(ckpt, dst / "checkpoint.pt")
    manifest["files"] = hash_files(dst)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def error_line(result) -> str:
    """The one line a failed CLI run printed (click's 'Error: ...'), asserting there is exactly one and no traceback."""
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("Usage:", "Try "))]
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def assert_only(directory: Path, expected: dict[str, bytes]) -> None:
    """`directory` holds exactly these files with these bytes (no temporary file, nothing new)."""
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == expected
