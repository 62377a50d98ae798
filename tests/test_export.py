"""diffit-export: packages for the tiny presets, their parity with PyTorch, structure, manifest and safety."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from diffit_port import samplers
from diffit_port.attention import TMSA
from diffit_port.checkpoint import load_model
from diffit_port.export import ExportError, ExportValidationError, default_out_dir, export_package
from diffit_port.export.cli import main as cli
from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP, MANIFEST, PackageError, hash_files, load_package

FP16_BOUND = 1e-2      # float16 graph vs float32 torch: 20x float16's unit roundoff (the exporter's own bound)
PACKAGES = {           # id -> (preset, export options)
    "tiny-fp32": ("tiny", {}),
    "tiny-fp16": ("tiny", {"fp16": True}),
    "latent-fp32": ("tiny-latent", {"cfg": "in-graph", "embed_checkpoint": True}),
    "latent-fp16": ("tiny-latent", {"cfg": "in-graph", "fp16": True}),
}


@pytest.fixture(scope="module")
def package(request, checkpoint_file, tmp_path_factory):
    """Factory: package id -> (package dir, checkpoint path), exported once per module."""
    made = {}

    def get(pid: str) -> tuple[Path, Path]:
        if pid not in made:
            preset, opts = PACKAGES[pid]
            ckpt = checkpoint_file(preset)
            made[pid] = export_package(ckpt, tmp_path_factory.mktemp(pid) / "pkg", progress=False, **opts), ckpt
        return made[pid]

    return get


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_feeds(cfg, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((batch, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32),
            "t": rng.uniform(0, 999, batch).astype(np.float32),
            "y": rng.integers(0, cfg.num_classes + 1, batch).astype(np.int64)}


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("pid", list(PACKAGES))
def test_onnxruntime_matches_torch(package, pid):
    root, ckpt = package(pid)
    model, _ = load_model(ckpt)                          # EMA weights, as exported
    sess = session(root / "denoiser.onnx")
    rng = np.random.default_rng(123)                     # other inputs than the exporter's own check
    fp16 = PACKAGES[pid][1].get("fp16", False)
    for batch in (1, 3):
        feeds = random_feeds(model.cfg, batch, rng)
        got = sess.run(None, feeds)[0]
        with torch.no_grad():
            ref = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        assert got.shape == ref.shape == (batch, model.cfg.out_channels, model.cfg.image_size, model.cfg.image_size)
        err = np.abs(got - ref).max()
        assert err <= (FP16_BOUND if fp16 else 1e-4), (pid, batch, err)
        print(f"{pid} batch {batch}: max_abs {err:.3g}")
    # a non-trivial function of x, t and y (else parity would prove nothing)
    base = random_feeds(model.cfg, 2, rng)
    base["y"] = np.array([1, 2], dtype=np.int64)
    with torch.no_grad():
        outs = [model(*(torch.from_numpy(v) for v in f.values())).numpy() for f in
                (base, dict(base, x=base["x"] + 0.5), dict(base, t=base["t"] + 100), dict(base, y=base["y"] + 1))]
    assert all(np.abs(o - outs[0]).max() > 1e-4 for o in outs[1:])


@pytest.mark.parametrize("pid", list(PACKAGES))
def test_recorded_parity_within_bounds(package, pid):
    root, _ = package(pid)
    manifest = json.loads((root / MANIFEST).read_text())
    fp16 = manifest["precision"] == "fp16"
    assert set(manifest["parity"]) == set(manifest["graphs"])
    for name, p in manifest["parity"].items():
        assert p["batch_sizes"] == [1, 3]
        assert p["max_abs"] <= p["atol"] == (FP16_BOUND if fp16 else 1e-4)
        assert 0 < p["rel_l2"] <= (FP16_BOUND if fp16 else 1e-5)


@pytest.mark.parametrize("pid", list(PACKAGES))
def test_graph_structure(package, pid):
    root, ckpt = package(pid)
    model, _ = load_model(ckpt)
    n_tmsa = sum(isinstance(m, TMSA) for m in model.modules())
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["custom_ops"] == [{"domain": CUSTOM_DOMAIN, "op_type": CUSTOM_OP, "version": 1, "count": n_tmsa}]
    for entry in manifest["graphs"].values():
        path = root / entry["file"]
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.load(path)
        assert {i.domain: i.version for i in m.opset_import} == {"": 17, CUSTOM_DOMAIN: 1}
        assert m.ir_version == 8
        custom = [n for n in m.graph.node if n.domain == CUSTOM_DOMAIN]
        assert len(custom) == n_tmsa and {n.op_type for n in custom} == {CUSTOM_OP}
        assert [(f.domain, f.name) for f in m.functions] == [(CUSTOM_DOMAIN, CUSTOM_OP)]
        assert [i.name for i in m.graph.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in m.graph.output] == ["out"]
        elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
        for v, spec in zip([*m.graph.input, *m.graph.output], [*entry["inputs"], *entry["outputs"]]):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            assert (elem[v.type.tensor_type.elem_type], dims) == (spec["dtype"], spec["shape"])   # float32 I/O
        if manifest["precision"] == "fp16":
            assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)


@pytest.mark.parametrize("pid", ["latent-fp32", "latent-fp16"])
def test_in_graph_guidance_equals_sampler_guidance(package, pid):
    root, _ = package(pid)
    pkg = load_package(root)
    k, w, T = pkg.sampling["guide_channels"], 4.0, pkg.diffusion.num_timesteps
    assert pkg.manifest["graphs"]["denoiser_cfg"]["guide_channels"] == k == 3
    plain, guided = session(root / "denoiser.onnx"), session(root / "denoiser_cfg.onnx")
    step = samplers.classifier_free_guidance(lambda x, t, y: plain.run(None, {"x": x, "t": t, "y": y})[0], w,
                                             pkg.model.null_label, schedule="power-cosine", num_timesteps=T,
                                             guide_channels=k)
    feeds = random_feeds(pkg.model, 3, np.random.default_rng(7))
    s = samplers.guidance_scale(feeds["t"], w, "power-cosine", 4.0, T).astype(np.float32)   # per-sample scale
    want = step(**feeds)
    got = guided.run(None, dict(feeds, guidance=s))[0]
    assert got.shape == want.shape == (3, 8, 8, 8)
    np.testing.assert_allclose(got, want, atol=1e-5 if pid == "latent-fp32" else 2e-3, rtol=0)
    np.testing.assert_array_equal(got[:, k:], plain.run(None, feeds)[0][:, k:])       # unguided channels: conditional


def test_manifest_and_integrity(package, tmp_path):
    root, ckpt = package("latent-fp32")
    pkg = load_package(root)
    m = pkg.manifest
    assert (m["format"], m["format_version"], m["preset"], m["opset"], m["ir_version"]) == \
        ("diffit-package", 1, "tiny-latent", 17, 8)
    assert m["image"] == {"channels": 4, "height": 8, "width": 8, "space": "latents"}
    assert (m["num_classes"], m["null_label"], m["prediction"], m["learn_sigma"]) == (10, 10, "eps", True)
    assert m["model"] == pkg.model.to_dict() and m["diffusion"]["num_timesteps"] == 1000
    assert m["sampling"]["sampler"] == "ddpm" and m["weights"] == "ema" and m["precision"] == "fp32"
    assert set(m["producer"]) >= {"diffit_port", "torch", "onnx", "onnxruntime", "python"}
    assert m["graphs"]["denoiser"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", 4, 8, 8]}
    assert m["graphs"]["denoiser_cfg"]["inputs"][3] == {"name": "guidance", "dtype": "float32", "shape": ["batch"]}
    assert m["files"] == hash_files(root) and set(m["files"]) == {"denoiser.onnx", "denoiser_cfg.onnx", "checkpoint.pt"}

    # the embedded checkpoint holds exactly the exported (EMA) weights, loadable weights-only
    assert m["checkpoint"] == "checkpoint.pt"
    embedded, data = load_model(root / "checkpoint.pt")
    exported, _ = load_model(ckpt, use_ema=True)
    assert data["ema"] is None
    for (ka, a), (kb, b) in zip(embedded.state_dict().items(), exported.state_dict().items()):
        assert ka == kb and torch.equal(a, b)

    # one byte changed -> refused
    copy = tmp_path / "pkg"
    shutil.copytree(root, copy)
    raw = bytearray((copy / "denoiser.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / "denoiser.onnx").write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="sha256 mismatch"):
        load_package(copy)


def test_existing_destination_refused_then_forced(checkpoint_file, tmp_path):
    ckpt = checkpoint_file("tiny-latent")
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / MANIFEST).write_text('{"format": "diffit-package", "format_version": 0}')   # an old, damaged package
    (dest / "old.onnx").write_bytes(b"old")
    before = digest(dest)
    with pytest.raises(ExportError, match="already exists"):
        export_package(ckpt, dest, progress=False)
    assert digest(dest) == before
    junk = tmp_path / "not-a-package"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    # A browser extension's source folder: it has a manifest.json, but not a diffit package's.
    ext = tmp_path / "web-extension"
    ext.mkdir()
    (ext / MANIFEST).write_text('{"manifest_version": 3, "name": "my extension", "version": "1.0"}')
    (ext / "background.js").write_text("console.log('keep me')")
    (ext / "broken").mkdir()
    (ext / "broken" / MANIFEST).write_text("not json")
    for folder in (junk, ext, ext / "broken"):
        before_folder = digest(folder)
        with pytest.raises(ExportError, match="not a diffit package"):
            export_package(ckpt, folder, force=True, progress=False)
        assert digest(folder) == before_folder
    assert (junk / "notes.txt").read_text() == "keep me"

    assert export_package(ckpt, dest, force=True, progress=False) == dest
    assert not (dest / "old.onnx").exists()
    load_package(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-package", "pkg", "web-extension"]  # no temp dirs


def test_validation_failure_is_fatal_and_writes_nothing(checkpoint_file, tmp_path, monkeypatch):
    from diffit_port.export import onnx_export
    from diffit_port.export.tmsa_op import function_proto

    def wrong_body(opset):              # softmax over the query axis instead of the key axis
        fp = function_proto(opset)
        softmax = next(n for n in fp.node if n.op_type == "Softmax")
        softmax.attribute[0].i = 2
        return fp

    monkeypatch.setattr(onnx_export, "function_proto", wrong_body)
    with pytest.raises(ExportValidationError, match="misses its tolerance"):
        export_package(checkpoint_file("tiny-latent"), tmp_path / "pkg", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(checkpoint_file, tmp_path):
    ckpt = checkpoint_file("tiny-latent")
    runner = CliRunner()
    res = runner.invoke(cli, [str(ckpt), "--opset", "17", "-o", str(tmp_path / "pkg"), "--no-ema", "-q"])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "pkg") in res.output and "denoiser max_abs" in res.output
    assert load_package(tmp_path / "pkg").manifest["weights"] == "model"

    res = runner.invoke(cli, [str(ckpt), "--opset", "18", "-o", str(tmp_path / "other")])
    assert res.exit_code == 2 and "opset 17 only" in res.output and not (tmp_path / "other").exists()
    res = runner.invoke(cli, [str(ckpt), "--opset", "17", "-o", str(tmp_path / "pkg"), "-q"])
    assert res.exit_code == 1 and "already exists" in res.output and "Traceback" not in res.output
    assert "Examples:" in runner.invoke(cli, ["--help"]).output
    assert default_out_dir(Path("runs/a/ckpt.pt")) == Path("runs/a/ckpt-onnx")


def test_vae_decoder(checkpoint_file, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    root = export_package(checkpoint_file("tiny-latent"), tmp_path / "pkg", vae=tmp_path / "vae", progress=False)
    m = load_package(root).manifest
    entry = m["graphs"]["vae_decoder"]
    assert entry["inputs"] == [{"name": "latents", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    assert entry["outputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert m["vae"] == {"scaling_factor": 0.5, "shift_factor": 0.0, "upsampling": 2}
    assert m["parity"]["vae_decoder"]["max_abs"] <= 1e-4
    latents = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    got = session(root / "vae_decoder.onnx").run(None, {"latents": latents})[0]
    with torch.no_grad():
        want = vae.eval().decode(torch.from_numpy(latents) / 0.5).sample.clamp(-1, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    with pytest.raises(ExportError, match="latent models"):
        export_package(checkpoint_file("tiny"), tmp_path / "img", vae=tmp_path / "vae", progress=False)


def test_external_data_path(checkpoint_file, tmp_path, monkeypatch):
    # the path latent-xl2-256 takes in float32 (weights > 2 GiB), forced here on a tiny model
    from diffit_port.export import onnx_export

    monkeypatch.setattr(onnx_export, "MAX_INLINE_BYTES", 1)
    root = export_package(checkpoint_file("tiny-latent"), tmp_path / "pkg", progress=False)
    m = load_package(root).manifest
    assert m["graphs"]["denoiser"]["external_data"] == ["denoiser.onnx.data"]
    assert set(m["files"]) == {"denoiser.onnx", "denoiser.onnx.data"}
    assert m["parity"]["denoiser"]["max_abs"] <= 1e-4
    assert (root / "denoiser.onnx").stat().st_size < (root / "denoiser.onnx.data").stat().st_size


def test_edm_spec_and_learned_variance_refusal(tmp_path):
    """An EDM model exports as the step x, sigma, y -> D; its validation draws sigma log-uniformly over
    [sigma_min, sigma_max]; a learn_sigma model with an EDM diffusion config is refused with the reason."""
    from diffit_port import build_model
    from diffit_port.checkpoint import make_checkpoint, save_atomic
    from diffit_port.config import DiffusionConfig
    from diffit_port.edm import EDMPrecond
    from diffit_port.export.graphs import denoiser_specs

    edm = DiffusionConfig(prediction="edm", sigma_min=0.01, sigma_max=20.0)
    (spec,) = denoiser_specs(build_model("tiny-edm").eval(), diffusion=edm, fp16=False, cfg_in_graph=False,
                             guide_channels=0)
    assert [s.name for s in spec.inputs] == ["x", "sigma", "y"] and isinstance(spec.reference, EDMPrecond)
    log_s = np.log(spec.sample(20000, np.random.default_rng(0))["sigma"].astype(np.float64))
    lo, hi = np.log(0.01), np.log(20.0)
    assert lo - 1e-6 <= log_s.min() and log_s.max() <= hi + 1e-6
    assert abs(log_s.mean() - (lo + hi) / 2) < 0.05 and abs(log_s.std() - (hi - lo) / np.sqrt(12)) < 0.05
    ckpt = tmp_path / "bad.pt"
    save_atomic(make_checkpoint(build_model("tiny-latent"), preset=None, diffusion=DiffusionConfig(prediction="edm")),
                ckpt)
    with pytest.raises(ExportError, match="learn_sigma"):
        export_package(ckpt, tmp_path / "pkg", progress=False)
