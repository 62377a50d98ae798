"""The exported package on disk: manifest schema, hashing, and the checks a runtime makes before loading."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DiffusionConfig, ModelConfig

FORMAT = "diffit-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CUSTOM_DOMAIN = "com.diffit"
CUSTOM_OP = "TimeTokenAttention"
CUSTOM_OP_VERSION = 1


class PackageError(RuntimeError):
    """A package that is missing, malformed, of another format version, or altered since export."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every regular file under `root` except the manifest, keyed by POSIX relative path."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


@dataclass(frozen=True)
class Package:
    """A validated package directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict(self.manifest["diffusion"])

    @property
    def sampling(self) -> dict[str, Any]:
        return self.manifest.get("sampling", {})

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def graph_path(self, name: str = "denoiser") -> Path:
        """Path of a graph named in the manifest ("denoiser", "denoiser_cfg", "vae_decoder")."""
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise PackageError(f"package {self.root} has no {name!r} graph (it has: {', '.join(graphs)})")
        return self.root / graphs[name]["file"]

    def has_graph(self, name: str) -> bool:
        return name in self.manifest["graphs"]


def _safe_relpath(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise PackageError(f"manifest names a file outside the package: {rel!r}")
    return p


def load_package(path: str | os.PathLike, verify_hashes: bool = True) -> Package:
    """Read and validate a package directory: format and version, required keys, and the sha256 of
    every file (a file added, removed or changed since export is refused)."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PackageError(f"{root} is not a diffit package: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{mpath} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                           f"(this diffit-port reads version {FORMAT_VERSION}); re-export the checkpoint")
    for key in ("model", "diffusion", "graphs", "files", "precision", "opset"):
        if key not in manifest:
            raise PackageError(f"{mpath}: missing required key {key!r}")
    if verify_hashes:
        recorded = manifest["files"]
        for rel in recorded:
            _safe_relpath(root, rel)
        actual = hash_files(root)
        missing = sorted(set(recorded) - set(actual))
        extra = sorted(set(actual) - set(recorded))
        changed = sorted(k for k in set(recorded) & set(actual) if recorded[k] != actual[k])
        if missing or extra or changed:
            parts = [f"{label}: {', '.join(v)}" for label, v in
                     (("missing", missing), ("not in manifest", extra), ("sha256 mismatch", changed)) if v]
            raise PackageError(f"package {root} failed its integrity check ({'; '.join(parts)}); refusing to run it")
    for g in manifest["graphs"].values():
        _safe_relpath(root, g["file"])
    ckpt = manifest.get("checkpoint")
    if ckpt is not None:
        _safe_relpath(root, ckpt)
        if ckpt not in manifest["files"]:
            raise PackageError(f"{mpath}: the embedded checkpoint {ckpt!r} is not among the hashed files")
    try:
        ModelConfig.from_dict(manifest["model"])
        DiffusionConfig.from_dict(manifest["diffusion"])
    except (TypeError, ValueError) as e:
        raise PackageError(f"{mpath}: invalid model or diffusion config: {e}") from None
    return Package(root, manifest)


def default_package_path() -> Path:
    """The embedded default package (the digits model) shipped inside diffit_port/assets."""
    return Path(__file__).resolve().parent / "assets" / "digits"
