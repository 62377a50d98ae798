"""The package reader (diffit_port.package, .schema, .package_graphs): manifests of the wrong shape, fields of the
wrong type or inconsistent with the graphs, external-data locations outside the package, the EDM contract, and a
hypothesis property: whatever the manifest holds, loading gives a package or a PackageError, never a traceback."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffit_port.package import MANIFEST, PackageError, default_package_path, hash_files, load_package
from diffit_port.runtimes.cli import main as run_main
from diffit_port.schema import SchemaError, check_manifest


def copy_package(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def write(root: Path, manifest, rehash: bool = True) -> None:
    if rehash and isinstance(manifest, dict):
        manifest["files"] = hash_files(root)
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_the_shipped_package_validates():
    p = load_package(default_package_path())
    assert p.manifest["preset"] == "digits-edm" and p.manifest["prediction"] == "edm"


def edited(pkg: Path, tmp_path: Path, edit) -> Path:
    """A copy of `pkg` whose manifest went through `edit(manifest)`, which edits in place or returns a list to
    use instead (hashes kept valid)."""
    root = copy_package(pkg, tmp_path / "edited")
    m = read(root)
    result = edit(m)
    write(root, result if isinstance(result, list) else m)
    return root


SCHEMA_CASES = {
    "array": (lambda m: [m], "the manifest: must be an object, got an array"),
    "model string size": (lambda m: m["model"].update(image_size="16"), "model.image_size: must be an integer"),
    "zero head_dim": (lambda m: m["model"].update(head_dim=0), "model.head_dim: must be in 1.."),
    "timesteps float": (lambda m: m["diffusion"].update(num_timesteps=1000.5),
                        "diffusion.num_timesteps: must be an integer"),
    "schedule": (lambda m: m["diffusion"].update(schedule="quadratic"), "diffusion.schedule: must be one of"),
    "guidance nan": (lambda m: m["sampling"].update(guidance=float("nan")), "sampling.guidance: must be finite"),
    "guidance text": (lambda m: m["sampling"].update(guidance="high"), "sampling.guidance: must be a number"),
    "steps": (lambda m: m["sampling"].update(steps=0), "sampling.steps: must be in 1..1000"),
    "graphs list": (lambda m: m.update(graphs=[]), "graphs: must be an object, got an array"),
    "inputs object": (lambda m: m["graphs"]["denoiser"].update(inputs={}),
                      "graphs.denoiser.inputs: must be a non-empty"),
    "image vs model": (lambda m: m["image"].update(height=32), "image.height: is 32 but the model's is 16"),
    "model vs graph entry": (lambda m: (m["model"].update(image_size=32), m["image"].update(height=32, width=32)),
                             "graphs.denoiser.inputs: [('x', 'float32', ['batch', 1, 16, 16])"),
    "num_classes": (lambda m: m.update(num_classes=3), "num_classes: is 3 but the model / diffusion config says 10"),
    "hash": (lambda m: m["files"].update({"denoiser.onnx": "abc"}), "must be a sha256 hex digest"),
    "absolute file": (lambda m: m["graphs"]["denoiser"].update(file="/etc/hostname"), "is not a plain relative path"),
    "dotdot file": (lambda m: m["graphs"]["denoiser"].update(file="../x.onnx"), "is not a plain relative path"),
    "opset": (lambda m: m.update(opset=18), "opset: must be in 17..17"),
    "version": (lambda m: m.update(format_version=True), "format_version: True is not supported"),
    "unknown model field": (lambda m: m["model"].update(colour="red"), "unknown ModelConfig fields: ['colour']"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_rows(pkg, tmp_path, case):
    edit, msg = SCHEMA_CASES[case]
    if case == "hash":                              # write() would re-hash: break the hash after it
        root = copy_package(pkg, tmp_path / "edited")
        m = read(root)
        edit(m)
        write(root, m, rehash=False)
    else:
        root = edited(pkg, tmp_path, edit)
    with pytest.raises(PackageError) as e:
        load_package(root)
    assert str(e.value).startswith(str(root / MANIFEST)) and msg in str(e.value), str(e.value)
    r = CliRunner().invoke(run_main, ["--package", str(root), "--output", str(tmp_path / "g.png")])
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "g.png").exists()


def test_manifest_declaring_other_io_than_the_graph(pkg, tmp_path):
    """A manifest consistent in itself (model, image and graph entries all say 32x32) whose graph file is 16x16:
    caught by reading the graph's inputs, before any runtime loads it."""
    def to_32(m):
        m["model"]["image_size"] = 32
        m["image"].update(height=32, width=32)
        for g in m["graphs"].values():
            for t in g["inputs"][:1] + g["outputs"]:
                t["shape"][2:] = [32, 32]
    root = edited(pkg, tmp_path, to_32)
    with pytest.raises(PackageError, match=r"graph denoiser(_cfg)?\.onnx has inputs .*16, 16.* the manifest declares "
                                            r".*32, 32"):
        load_package(root)


# --------------------------------------------------------------------------------------------------
# External data
# --------------------------------------------------------------------------------------------------

def external_package(pkg: Path, root: Path) -> Path:
    """A copy of `pkg` whose denoiser keeps its weights in denoiser.onnx.data (the >2 GB layout)."""
    import onnx

    copy_package(pkg, root)
    model = onnx.load(str(root / "denoiser.onnx"))
    onnx.save_model(model, str(root / "denoiser.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="denoiser.onnx.data", size_threshold=0)
    m = read(root)
    m["graphs"]["denoiser"]["external_data"] = ["denoiser.onnx.data"]
    write(root, m)
    return root


def set_location(root: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(root / "denoiser.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(root / "denoiser.onnx"))
    write(root, read(root))


def test_external_data_locations_are_checked_by_the_project(pkg, tmp_path, monkeypatch):
    import onnxruntime as ort

    good = external_package(pkg, tmp_path / "good")
    load_package(good)
    outside = tmp_path / "outside.data"
    shutil.copy(good / "denoiser.onnx.data", outside)

    def absolute(root):
        set_location(root, str(outside))

    def dotdot(root):
        set_location(root, "../outside.data")

    def symlink_out(root):
        (root / "denoiser.onnx.data").unlink()
        os.symlink(outside, root / "denoiser.onnx.data")

    def unlisted(root):
        shutil.copy(root / "denoiser.onnx.data", root / "other.data")
        set_location(root, "other.data")

    cases = {absolute: "is not a plain relative path", dotdot: "is not a plain relative path",
             symlink_out: "leads outside the package", unlisted: "is not listed in the manifest"}
    # onnxruntime must never be the one that notices.
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("onnxruntime was given the graph"))
    for make, msg in cases.items():
        root = copy_package(good, tmp_path / make.__name__)
        make(root)
        with pytest.raises(PackageError, match=msg):
            load_package(root)
        r = CliRunner().invoke(run_main, ["--package", str(root), "--runtime", "onnx-cpu",
                                          "--output", str(tmp_path / "g.png")])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, (make.__name__, r.output)


def test_symlinked_graph_outside_the_package(pkg, tmp_path):
    root = copy_package(pkg, tmp_path / "link")
    shutil.move(root / "denoiser.onnx", tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", root / "denoiser.onnx")
    with pytest.raises(PackageError, match="'denoiser.onnx' leads outside the package"):
        load_package(root)


# --------------------------------------------------------------------------------------------------
# The EDM contract (inputs x, sigma, y; EDM fields in diffusion) is accepted by the schema
# --------------------------------------------------------------------------------------------------

def edm_manifest(pkg: Path) -> dict:
    m = read(pkg)
    m["diffusion"] = {"schedule": "linear", "num_timesteps": 1000, "prediction": "edm", "sigma_data": 0.5,
                      "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2, "p_std": 1.2}
    m["prediction"] = "edm"
    m["sampling"]["sampler"] = "edm-stochastic"          # a name the eps registry does not know: not the schema's call
    for g in m["graphs"].values():
        g["inputs"][1]["name"] = "sigma"
    return m


def test_edm_contract_is_accepted_and_checked(pkg):
    m = edm_manifest(pkg)
    check_manifest(m)
    bad = {"eps graph under edm": lambda m: m["graphs"]["denoiser"]["inputs"][1].update(name="t"),
           "sigma under eps": lambda m: (m["diffusion"].update(prediction="eps"), m.update(prediction="eps")),
           "sigma range": lambda m: m["diffusion"].update(sigma_min=90.0),
           "negative sigma_data": lambda m: m["diffusion"].update(sigma_data=-0.5),
           "top-level prediction": lambda m: m.update(prediction="eps")}
    for name, edit in bad.items():
        broken = copy.deepcopy(m)
        edit(broken)
        with pytest.raises(SchemaError):
            check_manifest(broken)


# --------------------------------------------------------------------------------------------------
# Property: any manifest content -> a package or a PackageError (CLI: exit 1 or 2), never anything else
# --------------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def node_paths(tree, prefix=()) -> list[tuple]:
    """The key path of every value inside `tree` (dict keys and list indices), depth first."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    paths = []
    for key, value in items:
        paths.append((*prefix, key))
        paths += node_paths(value, (*prefix, key))
    return paths


@st.composite
def mutated_manifests(draw, base: dict):
    """`base` with one to three random edits, each at a value drawn uniformly from all the values in the
    manifest (a top-level key, a graph entry, one entry of a tensor's shape, ...): replaced by random JSON,
    deleted, or given a new sibling key; rarely the whole manifest replaced."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = node_paths(m)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON)
    return m


@pytest.fixture(scope="module")
def scratch_package(pkg, tmp_path_factory):
    return copy_package(pkg, tmp_path_factory.mktemp("prop") / "pkg")


PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def mutated(root: Path, data) -> Iterator[Path]:
    """The scratch package with a drawn manifest for the block; its original manifest is put back after."""
    (root / MANIFEST).write_text(json.dumps(data.draw(mutated_manifests(_pristine(root)))))
    try:
        yield root
    finally:
        (root / MANIFEST).write_text(json.dumps(_pristine(root)))


@settings(PROPERTY, max_examples=300)
@given(data=st.data())
def test_any_manifest_gives_a_package_or_a_package_error(scratch_package, data):
    with mutated(scratch_package, data) as root:
        try:
            load_package(root)
        except PackageError:
            pass


@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_any_manifest_gives_exit_0_1_or_2_from_the_cli(scratch_package, data):
    with mutated(scratch_package, data) as root:
        r = CliRunner().invoke(run_main, ["--package", str(root), "--dry-run"])
    assert r.exit_code in (0, 1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), r.output


_PRISTINE: dict[str, dict] = {}


def _pristine(root: Path) -> dict:
    """A copy of the scratch package's original manifest (read once, before any mutation)."""
    if str(root) not in _PRISTINE:
        _PRISTINE[str(root)] = read(root)
    return copy.deepcopy(_PRISTINE[str(root)])
