"""The exported package on disk: manifest schema, hashing, and the checks a runtime makes before loading."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DiffusionConfig, ModelConfig
from .schema import FORMAT, FORMAT_VERSION, SchemaError, check_manifest  # noqa: F401 (FORMAT*: re-exported)

MANIFEST = "manifest.json"
CUSTOM_DOMAIN = "com.diffit"
CUSTOM_OP = "TimeTokenAttention"
CUSTOM_OP_VERSION = 1


class PackageError(RuntimeError):
    """A package that is missing, malformed, of another format version, or altered since export; the message
    names the file and the problem."""


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

    def graph_bytes(self, name: str = "denoiser") -> int:
        """Bytes on disk of a graph with its external data files."""
        path = self.graph_path(name)
        data = self.manifest["graphs"][name].get("external_data", [])   # file names beside the graph
        return path.stat().st_size + sum((path.parent / f).stat().st_size for f in data)

    def has_graph(self, name: str) -> bool:
        return name in self.manifest["graphs"]


def inside_package(root: Path, rel: str) -> Path:
    """root/rel with every symlink resolved, refused unless it stays inside the package."""
    p = (root / rel).resolve()
    if p != root.resolve() and root.resolve() not in p.parents:
        raise PackageError(f"package {root}: {rel!r} leads outside the package (to {p}); refusing to read it")
    return p


def _read_manifest(mpath: Path) -> Any:
    try:
        return json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{mpath} is not valid JSON: {e}") from None
    except RecursionError:
        raise PackageError(f"{mpath} is nested too deeply to be a manifest") from None
    except OSError as e:
        raise PackageError(f"cannot read {mpath}: {e.strerror or e}") from None


def _check_tree(root: Path) -> None:
    """No symlink in the package may lead outside it (the hashes would then cover a foreign file)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                inside_package(root, p.relative_to(root).as_posix())


def _check_integrity(root: Path, recorded: dict[str, str]) -> None:
    actual = hash_files(root)
    missing = sorted(set(recorded) - set(actual))
    extra = sorted(set(actual) - set(recorded))
    changed = sorted(k for k in set(recorded) & set(actual) if recorded[k] != actual[k])
    if missing or extra or changed:
        parts = [f"{label}: {', '.join(v)}" for label, v in
                 (("missing", missing), ("not in manifest", extra), ("sha256 mismatch", changed)) if v]
        raise PackageError(f"package {root} failed its integrity check ({'; '.join(parts)}); refusing to run it")


def load_package(path: str | os.PathLike, verify_hashes: bool = True) -> Package:
    """Read and validate a package directory before any runtime sees it: the manifest field by field
    (diffit_port.schema), the model and diffusion configs, symlinks and named files confined to the package,
    the sha256 of every file (a file added, removed or changed since export is refused), and each graph's
    inputs, outputs and external-data locations against the manifest (package_graphs). Raises PackageError."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise PackageError(f"{root} is not a diffit package: not a directory")
    if not mpath.is_file():
        raise PackageError(f"{root} is not a diffit package: no {MANIFEST}")
    manifest = _read_manifest(mpath)
    try:
        check_manifest(manifest)
    except SchemaError as e:
        raise PackageError(f"{mpath}: {e}") from None
    try:
        ModelConfig.from_dict(manifest["model"])
        DiffusionConfig.from_dict(manifest["diffusion"])
    except (TypeError, ValueError, ArithmeticError) as e:
        raise PackageError(f"{mpath}: invalid model or diffusion config: {e}") from None
    _check_tree(root)
    for rel in manifest["files"]:
        inside_package(root, rel)
    if verify_hashes:
        _check_integrity(root, manifest["files"])
    from .package_graphs import check_graph_files

    check_graph_files(root, manifest)
    return Package(root, manifest)


def default_package_path() -> Path:
    """The embedded default package (the digits model) shipped inside diffit_port/assets."""
    return Path(__file__).resolve().parent / "assets" / "digits"
