"""diffit-convert: golden outputs of the official DiffiT code (tests/data/official), config inference, the
strict checks and their one-line errors, and the latent path end to end (convert -> export with VAE -> run)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from diffit_port import samplers
from diffit_port.checkpoint import load_model, sampling_defaults
from diffit_port.config import PRESETS, ModelConfig, get_preset
from diffit_port.convert import (convert, infer_config, matching_preset, official_shapes, release_sampling,
                                 to_official)
from diffit_port.convert_cli import main as convert_cli
from diffit_port.export.cli import main as export_cli
from diffit_port.export.graphs import Denoiser, GuidedDenoiser
from diffit_port.models import build_model, randomize_zero_init_, sincos_pos_embed_2d
from diffit_port.package import load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.cli import main as run_cli
from diffit_port.runtimes.generate import SamplingConfig, in_graph_step
from runtime_helpers import require_openvino

DATA = Path(__file__).parent / "data" / "official"
OFFICIAL = DATA / "diffit_small.safetensors"
GOLDEN_ATOL = 1e-5     # the converted PyTorch model (and guidance around it) vs the official PyTorch code
RUNTIME_ATOL = 1e-4    # an exported graph vs the official code: the exporter's own float32 bound
EXPECTED = ModelConfig(kind="latent", image_size=16, in_channels=4, num_classes=10, learn_sigma=True,
                       num_heads=4, hidden_size=128, depth=2, patch_size=2)


@pytest.fixture(scope="module")
def golden():
    g = np.load(DATA / "golden.npz")
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("convert") / "xl.pt"
    convert(OFFICIAL, dst)
    return dst


def forward(model, x, t, y) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def cli(args, main=convert_cli):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res) -> str:
    """The CLI failed with exit code 1 and a single `Error: ...` line, no traceback."""
    assert res.exit_code == 1, res.output
    out = res.output.strip()
    assert out.startswith("Error: ") and "\n" not in out and "Traceback" not in out, out
    return out


# --------------------------------------------------------------------------------------------------
# Golden: the official forward and guided forward
# --------------------------------------------------------------------------------------------------

def test_converted_model_reproduces_the_official_outputs(converted, golden):
    model, ckpt = load_model(converted)
    want = golden["out"]
    assert np.abs(want).max() > 1.0 and set(golden["y"]) >= {10}   # O(1) outputs; null label among the inputs
    got = forward(model, golden["x"], golden["t"], golden["y"])
    err = float(np.abs(got - want).max())
    print(f"\nconverted torch model vs official forward: max|diff| {err:.2e}")
    assert err <= GOLDEN_ATOL


def test_inferred_config_and_release_defaults(converted):
    ckpt = load_model(converted)[1]
    assert ModelConfig.from_dict(ckpt["model_config"]) == EXPECTED
    assert ckpt["preset"] is None                      # no preset of this size: the defaults are written out
    assert ckpt["diffusion_config"] == {"schedule": "linear", "num_timesteps": 1000, "prediction": "eps"}
    assert ckpt["sampling"] == {"sampler": "ddpm", "steps": 250, "guidance": 4.4, "guidance_schedule": "power-cosine",
                                "guidance_power": 4.0, "guide_channels": 3, "clip_denoised": False}
    assert ckpt["source"] == {"layout": "NVlabs/DiffiT", "file": OFFICIAL.name,
                              "entry": "the file's top-level state dict", "dtypes": ["float32"]}


@pytest.mark.parametrize("name", ["latent-xl2-256", "latent-xl2-512"])
def test_release_shapes_give_the_release_presets(name):
    """Tensors of the released shapes (on the meta device: no memory) are inferred as the preset, and the
    release's sampling defaults equal the preset's."""
    shapes = official_shapes(get_preset(name).model)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert len(sd) == 2 + 4 + 1 + 28 * 12 + 2 + 1      # embedders, 28 blocks of 12 tensors, final layer, pos
    cfg = infer_config(sd)
    assert cfg == get_preset(name).model and matching_preset(cfg) == name
    assert release_sampling(cfg) == {**sampling_defaults(get_preset(name)), "guidance_power": 4.0}


def test_guidance_reproduces_the_official_forward_with_cfg(converted, golden):
    """forward_with_cfg's batch is [conditional half, null half] with x duplicated; its first half is the
    guided output: eps[:, :3] = u + s(t) (c - u), s the power-cosine ramp, channels 3.. from the conditional
    pass. The project's sampler-side guidance and the in-graph module reproduce it."""
    model = load_model(converted)[0]
    B = len(golden["cfg_x"]) // 2
    x, t, y = golden["cfg_x"][:B], golden["cfg_t"][:B], golden["cfg_y"][:B]
    want = golden["cfg_out"][:B]
    assert np.all(golden["cfg_y"][B:] == 10) and float(golden["cfg_scale"]) == 4.4
    cond = forward(model, x, t, y)
    assert np.abs(want[:, :3] - cond[:, :3]).max() > 0.1           # guidance really moved eps

    def denoise(x_, t_, y_):
        return forward(model, x_, t_, y_)

    guided = samplers.classifier_free_guidance(denoise, 4.4, 10, schedule="power-cosine", power=4.0,
                                               num_timesteps=1000, guide_channels=3)(x, t, y)
    s = samplers.guidance_scale(t, 4.4, "power-cosine", 4.0, 1000).astype(np.float32)
    in_graph = GuidedDenoiser(Denoiser(model), 10, 3).eval()
    with torch.no_grad():
        module = in_graph(*(torch.from_numpy(a) for a in (x, t, y, s))).numpy()
    errs = {"sampler side": float(np.abs(guided - want).max()), "in-graph module": float(np.abs(module - want).max())}
    print(f"\nguided vs official forward_with_cfg: {errs}")
    assert max(errs.values()) <= GOLDEN_ATOL, errs


# --------------------------------------------------------------------------------------------------
# The latent path end to end, as a user runs it (a tiny AutoencoderKL in the SD-VAE layout: 4 levels, 8x)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The README recipe through the three CLIs (plus --cfg in-graph, so the package also serves the
    in-graph golden check): diffit-convert -> diffit-export --vae -> diffit-run (onnx-cpu)."""
    import diffusers

    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=0.18215)
    vae.save_pretrained(root / "sd-vae-ft-ema")
    shutil.copy(OFFICIAL, root / "diffit_256.safetensors")
    cwd = os.getcwd()
    os.chdir(root)                                     # relative paths, as in the recipe
    try:
        steps = {"convert": cli(["diffit_256.safetensors", "-o", "xl.pt"]),
                 "export": cli(["--opset", "17", "xl.pt", "--vae", "./sd-vae-ft-ema", "--cfg", "in-graph", "-q"],
                               export_cli),
                 "run": cli(["--package", "xl-onnx", "--runtime", "onnx-cpu", "--labels", "2,3,5,9", "--num-images",
                             "4", "--steps", "25", "--output", "dogs.png", "--save-npy", "dogs.npy", "--no-progress"],
                            run_cli)}
    finally:
        os.chdir(cwd)
    return root, steps


def test_convert_export_run_end_to_end(e2e):
    root, steps = e2e
    for name, res in steps.items():
        assert res.exit_code == 0, f"{name}: {res.output}"
    assert "learn_sigma=True" in steps["convert"].output
    m = load_package(root / "xl-onnx").manifest
    assert m["sampling"]["guidance"] == 4.4 and m["sampling"]["guidance_schedule"] == "power-cosine"
    assert m["vae"]["upsampling"] == 8 and m["graphs"]["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, 128, 128]
    images = np.load(root / "dogs.npy")
    assert images.shape == (4, 3, 128, 128) and np.isfinite(images).all()
    png = Image.open(root / "dogs.png")
    assert png.mode == "RGB" and png.size == (2 + 2 * (128 + 2),) * 2   # a 2x2 grid of 128x128 RGB tiles
    assert "runtime=onnx-cpu" in steps["run"].output and "sampler=ddpm steps=25" in steps["run"].output


def test_torch_runtime_takes_the_converted_checkpoint(e2e, tmp_path):
    root, _ = e2e
    res = cli(["--package", root / "xl-onnx", "--runtime", "torch", "--checkpoint", root / "xl.pt", "--labels",
               "2,3,5,9", "--num-images", "4", "--steps", "25", "--output", tmp_path / "t.png", "--save-npy",
               tmp_path / "t.npy", "--no-progress"], run_cli)
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), np.load(root / "dogs.npy"), atol=1e-3, rtol=0)


def test_exported_package_reproduces_the_official_outputs(e2e, golden):
    require_openvino()
    package = load_package(e2e[0] / "xl-onnx")
    errs = {}
    for name in ("onnx-cpu", "openvino"):
        d = create_denoiser(name, package, threads=1)
        errs[name] = float(np.abs(d(golden["x"], golden["t"], golden["y"]) - golden["out"]).max())
        d.close()
    print(f"\nexported package vs official forward: {errs}")
    assert max(errs.values()) <= RUNTIME_ATOL, errs


def test_in_graph_guidance_package_reproduces_forward_with_cfg(e2e, golden):
    """The denoiser_cfg graph fed by the runtime's in-graph step with the package's own sampling defaults
    (the release's 4.4, power-cosine, exponent 4, 3 channels)."""
    require_openvino()
    package = load_package(e2e[0] / "xl-onnx")
    cfg = SamplingConfig.from_package(package, cfg="in-graph")
    B = len(golden["cfg_x"]) // 2
    x, t, y, want = golden["cfg_x"][:B], golden["cfg_t"][:B], golden["cfg_y"][:B], golden["cfg_out"][:B]
    errs = {}
    for name in ("onnx-cpu", "openvino"):
        d = create_denoiser(name, package, graph="denoiser_cfg", threads=1)
        errs[name] = float(np.abs(in_graph_step(d, package, cfg)(x, t, y) - want).max())
        d.close()
    print(f"\nin-graph guidance package vs official forward_with_cfg: {errs}")
    assert max(errs.values()) <= RUNTIME_ATOL, errs


# --------------------------------------------------------------------------------------------------
# The fixed tensors pin the layouts
# --------------------------------------------------------------------------------------------------

def test_position_embedding_puts_the_column_first():
    """Closed form (DiT / MAE): token n = (row r, col c) gets [sin(c w_k), cos(c w_k), sin(r w_k), cos(r w_k)]."""
    dim, grid = 16, 5
    pe = sincos_pos_embed_2d(dim, grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    r, c = np.divmod(np.arange(grid * grid), grid)
    want = np.concatenate([np.sin(c[:, None] * omega), np.cos(c[:, None] * omega),
                           np.sin(r[:, None] * omega), np.cos(r[:, None] * omega)], axis=1)
    np.testing.assert_allclose(pe, want, atol=1e-12)


def write_variant(tmp_path: Path, name: str, edit) -> Path:
    sd = load_file(OFFICIAL)
    edit(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_swapped_position_halves_are_refused(tmp_path):
    def swap(sd):
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[..., 64:], pe[..., :64]], dim=-1).contiguous()

    out = one_line_error(cli([write_variant(tmp_path, "rows-first.safetensors", swap), "-o", tmp_path / "o.pt"]))
    assert "pos_embed differs" in out and not (tmp_path / "o.pt").exists()


def test_transposed_bias_index_is_refused(tmp_path):
    def transpose(sd):
        sd["blocks.1.attn.relative_position_index"] = sd["blocks.1.attn.relative_position_index"].T.contiguous()

    out = one_line_error(cli([write_variant(tmp_path, "t.safetensors", transpose), "-o", tmp_path / "o.pt"]))
    assert "blocks.1.attn.relative_position_index differs" in out and not (tmp_path / "o.pt").exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs: one clean line each, nothing written
# --------------------------------------------------------------------------------------------------

def test_wrong_file_type(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    out = one_line_error(cli([tmp_path / "weights.npz", "-o", tmp_path / "o.pt"]))
    assert "unsupported file type '.npz'" in out
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    assert "not a readable PyTorch checkpoint" in one_line_error(cli([tmp_path / "notes.pt", "-o", tmp_path / "o.pt"]))
    assert "no such file" in one_line_error(cli([tmp_path / "absent.safetensors", "-o", tmp_path / "o.pt"]))
    assert not (tmp_path / "o.pt").exists()


def test_truncated_files(tmp_path):
    data = OFFICIAL.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in one_line_error(cli([tmp_path / "cut.safetensors", "-o",
                                                                    tmp_path / "o.pt"]))
    torch.save(load_file(OFFICIAL), tmp_path / "full.pt")
    pt = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(pt[: len(pt) // 2])
    assert "not a readable PyTorch checkpoint" in one_line_error(cli([tmp_path / "cut.pt", "-o", tmp_path / "o.pt"]))
    assert not (tmp_path / "o.pt").exists()


def test_unknown_missing_and_mismatched_keys_in_one_error(tmp_path):
    def edit(sd):
        sd["blocks.0.norm1.weight"] = torch.ones(128)                  # an affine LayerNorm the model lacks
        sd["blocks.1.norm1.weight"] = torch.ones(128)
        del sd["blocks.1.attn.qkv_temb.bias"]
        sd["blocks.1.mlp.fc2.weight"] = torch.zeros(128, 256)

    out = one_line_error(cli([write_variant(tmp_path, "e.safetensors", edit), "-o", tmp_path / "o.pt"]))
    assert "unknown keys (2): blocks.*.norm1.weight x2" in out
    assert "missing keys (1): blocks.1.attn.qkv_temb.bias" in out
    assert "shape mismatches (1): blocks.1.mlp.fc2.weight (128, 256) (expected (128, 512))" in out
    # A DiT-XL-style file (adaLN modulation instead of TMSA) names what it has and lacks.
    sd = {k: v for k, v in load_file(OFFICIAL).items() if "qkv_temb" not in k and "relative" not in k}
    sd["blocks.0.adaLN_modulation.1.weight"] = torch.zeros(768, 128)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    out = one_line_error(cli([tmp_path / "dit.safetensors", "-o", tmp_path / "o.pt"]))
    assert "unknown keys (1): blocks.0.adaLN_modulation.1.weight" in out and "blocks.*.attn.qkv_temb.weight x2" in out
    assert not (tmp_path / "o.pt").exists()


class _RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": load_file(OFFICIAL), "hook": _RunsCode(marker)}, tmp_path / "evil.pt")
    out = one_line_error(cli([tmp_path / "evil.pt", "-o", tmp_path / "o.pt"]))
    assert "refused" in out and "system" in out and "weights_only" not in out
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def test_preset_mismatch_and_other_refusals(tmp_path, converted):
    out = one_line_error(cli([OFFICIAL, "-o", tmp_path / "o.pt", "--preset", "latent-xl2-256"]))
    assert "do not fit preset 'latent-xl2-256'" in out and "hidden_size 128 (preset: 1152)" in out
    assert "unknown preset 'nope'" in one_line_error(cli([OFFICIAL, "-o", tmp_path / "o.pt", "--preset", "nope"]))
    assert "already a diffit-port checkpoint" in one_line_error(cli([converted, "-o", tmp_path / "o.pt"]))
    (tmp_path / "o.pt").write_bytes(b"keep")
    assert "already exists" in one_line_error(cli([OFFICIAL, "-o", tmp_path / "o.pt"]))
    assert (tmp_path / "o.pt").read_bytes() == b"keep"
    assert cli([OFFICIAL, "-o", tmp_path / "o.pt", "--force"]).exit_code == 0
    assert "Examples:" in cli(["--help"]).output


def test_training_checkpoint_wrappers(tmp_path):
    """A DiT-style .pt ({"model", "ema", "opt", "args"}, DDP-prefixed keys): EMA by default, --no-ema for the
    raw weights, each reported; argparse.Namespace is read as plain data."""
    sd = load_file(OFFICIAL)
    ema = {f"module.{k}": v for k, v in sd.items()}
    raw = {f"module.{k}": (v + 0.01 if k == "final_layer.linear.bias" else v) for k, v in sd.items()}
    torch.save({"model": raw, "ema": ema, "opt": {"step": 3}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "0400000.pt")
    res = cli([tmp_path / "0400000.pt", "-o", tmp_path / "ema.pt"])
    assert res.exit_code == 0, res.output
    assert "entry 'ema' ('model' also present), 'module.' prefix removed" in res.output
    assert cli([tmp_path / "0400000.pt", "-o", tmp_path / "raw.pt", "--no-ema"]).exit_code == 0
    a, b = (load_model(tmp_path / n)[0].final_linear.bias for n in ("ema.pt", "raw.pt"))
    torch.testing.assert_close(b - a, torch.full_like(a, 0.01))
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "lightning.pth")
    res = cli([tmp_path / "lightning.pth", "-o", tmp_path / "sd.pt"])
    assert res.exit_code == 0 and "entry 'state_dict'" in res.output, res.output
    torch.save(sd, tmp_path / "bare.pt")
    assert "bare state dict" in one_line_error(cli([tmp_path / "bare.pt", "-o", tmp_path / "o.pt", "--ema"]))
    torch.save({"opt": {"lr": 1.0}}, tmp_path / "opt.pt")
    assert "no state dict found" in one_line_error(cli([tmp_path / "opt.pt", "-o", tmp_path / "o.pt"]))


def test_round_trip_through_the_official_layout(tmp_path):
    """to_official is the inverse of the conversion: a project model -> official tensors -> the same model."""
    torch.manual_seed(3)
    model = randomize_zero_init_(build_model("tiny-latent"), std=0.5)
    save_file(to_official(model), str(tmp_path / "tiny.safetensors"))
    done = convert(tmp_path / "tiny.safetensors", tmp_path / "tiny.pt")
    assert done.preset == "tiny-latent" and done.config == PRESETS["tiny-latent"].model
    assert convert(tmp_path / "tiny.safetensors", tmp_path / "tiny.pt", preset="tiny-latent", force=True).preset \
        == "tiny-latent"
    back = load_model(tmp_path / "tiny.pt")[0]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_without_torch_the_cli_says_what_to_install(tmp_path):
    code = textwrap.dedent("""
        import sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Missing())
        from diffit_port.convert_cli import main
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code, str(OFFICIAL), "-o", "o.pt"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "pip install 'diffit-port[torch]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_power_cosine_scale_matches_the_official_formula():
    """s(t) = 1 + (w - 1) / 2 (1 - cos(pi (1 - t/T)^p)) (diffit.py forward_with_cfg): ~1 at t = T-1, w at 0."""
    t = np.array([0.0, 250.0, 600.0, 999.0])
    want = 1 + 3.4 * 0.5 * (1 - np.cos(math.pi * (1 - t / 1000) ** 4))
    np.testing.assert_allclose(samplers.guidance_scale(t, 4.4, "power-cosine", 4.0, 1000), want, rtol=1e-12)
    assert abs(want[-1] - 1) < 1e-9 and want[0] == pytest.approx(4.4)
