"""The manifest schema: every field of a parsed manifest.json checked for type, range and consistency (NumPy-free).

`check_manifest` raises `SchemaError` naming the field; `diffit_port.package` turns it into a PackageError.
Two denoiser contracts are accepted: eps (inputs x, t, y) and edm (inputs x, sigma, y; the EDM fields in
`diffusion`). Unknown keys inside `model` and `diffusion` are left to the config dataclasses (which refuse
them); unknown keys inside `sampling` and at the top level are allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import PurePosixPath
from typing import Any

from .config import EDM_FIELDS, PREDICTIONS, ModelConfig

FORMAT = "diffit-package"
FORMAT_VERSION = 1
OPSET = 17                                   # the only standard opset a package is written at
BATCH = "batch"                              # the one dynamic axis of every graph
CONTRACTS = dict(zip(PREDICTIONS, ("t", "sigma")))   # prediction -> the name of the graph's noise-level input
MAX_TIMESTEPS = 100_000                      # far beyond any schedule; keeps a corrupt value from allocating GBs
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DTYPES = ("float32", "float16", "int64")


class SchemaError(ValueError):
    """A manifest field of the wrong type, out of range, or inconsistent with another field."""


def _fail(where: str, problem: str) -> None:
    raise SchemaError(f"{where}: {problem}")


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        _fail(where, f"must be an object, got {_type_name(v)}")
    return v


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, f"must be an integer, got {_type_name(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(where, f"must be in {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}, got {v}")
    return v


def _num(v: Any, where: str, lo: float | None = None, positive: bool = False, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, f"must be a number, got {_type_name(v)}")
    if not math.isfinite(v):
        _fail(where, f"must be finite, got {v}")
    if (positive and v <= 0) or (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = "> 0" if positive else f"in [{lo}, {hi if hi is not None else 'inf'}]"
        _fail(where, f"must be {bound}, got {v}")
    return float(v)


def _choice(v: Any, where: str, choices: tuple[Any, ...]) -> Any:
    if not isinstance(v, str) or v not in choices:
        _fail(where, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        _fail(where, f"must be true or false, got {_type_name(v)}")
    return v


def check_relpath(rel: Any, where: str) -> str:
    """A file name inside the package: a relative POSIX path without '..', '\\' or an empty part."""
    if not isinstance(rel, str) or not rel:
        _fail(where, f"must be a non-empty string, got {_type_name(rel)}")
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or "\\" in rel or ":" in rel.split("/")[0] or ".." in parts or "\0" in rel:
        _fail(where, f"{rel!r} is not a plain relative path inside the package")
    return rel


# ----------------------------------------------------------------------------------------------
# model, diffusion, sampling, image
# ----------------------------------------------------------------------------------------------

POSITIVE_MODEL_INTS = ("image_size", "in_channels", "head_dim", "patch_size", "window_size", "gn_groups", "freq_dim")


def check_model(m: Any, where: str = "model") -> dict[str, Any]:
    """Types from ModelConfig's annotations (unknown keys are ModelConfig's to refuse), ranges that keep its
    arithmetic defined (no division by zero) and sizes a runtime can allocate."""
    m = _obj(m, where)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in m:
            continue
        v, w, kind = m[f.name], f"{where}.{f.name}", str(f.type)
        if kind == "int":
            _int(v, w, lo=1 if f.name in POSITIVE_MODEL_INTS else 0, hi=1 << 16)
        elif kind == "float":
            _num(v, w, lo=0.0)
        elif kind == "bool":
            _bool(v, w)
        elif kind == "str":
            if not isinstance(v, str):
                _fail(w, f"must be a string, got {_type_name(v)}")
        elif kind.startswith("tuple[int"):
            if not isinstance(v, list):
                _fail(w, f"must be an array of integers, got {_type_name(v)}")
            for i, c in enumerate(v):
                _int(c, f"{w}[{i}]", lo=1, hi=1 << 16)
    if "class_dropout_prob" in m:
        _num(m["class_dropout_prob"], f"{where}.class_dropout_prob", lo=0.0, hi=1.0)
    return m


def check_diffusion(d: Any, where: str = "diffusion") -> dict[str, Any]:
    d = _obj(d, where)
    if "schedule" in d:
        _choice(d["schedule"], f"{where}.schedule", ("linear", "cosine"))
    if "num_timesteps" in d:
        _int(d["num_timesteps"], f"{where}.num_timesteps", lo=1, hi=MAX_TIMESTEPS)
    _choice(d.get("prediction", "eps"), f"{where}.prediction", tuple(CONTRACTS))
    for key in EDM_FIELDS:
        if key in d:
            _num(d[key], f"{where}.{key}", positive=key not in ("p_mean",))
    if "sigma_min" in d and "sigma_max" in d and not d["sigma_min"] < d["sigma_max"]:
        _fail(where, f"sigma_min ({d['sigma_min']}) must be below sigma_max ({d['sigma_max']})")
    return d


def check_sampling(s: Any, model: dict[str, Any], diffusion: dict[str, Any], where: str = "sampling") -> None:
    s = _obj(s, where)
    if "sampler" in s and (not isinstance(s["sampler"], str) or not s["sampler"]):
        _fail(f"{where}.sampler", f"must be a sampler name, got {s['sampler']!r}")
    if "steps" in s:
        _int(s["steps"], f"{where}.steps", lo=1, hi=int(diffusion.get("num_timesteps", 1000)))
    if "guidance" in s:
        _num(s["guidance"], f"{where}.guidance", lo=0.0)
    if "guidance_schedule" in s:
        _choice(s["guidance_schedule"], f"{where}.guidance_schedule", ("constant", "power-cosine"))
    if "guidance_power" in s:
        _num(s["guidance_power"], f"{where}.guidance_power", positive=True)
    if "guide_channels" in s:
        _int(s["guide_channels"], f"{where}.guide_channels", lo=0, hi=int(model.get("in_channels", 1)))
    if "clip_denoised" in s:
        _bool(s["clip_denoised"], f"{where}.clip_denoised")


def check_image(img: Any, model: dict[str, Any], where: str = "image") -> None:
    img = _obj(img, where)
    for key in ("channels", "height", "width"):
        _int(img.get(key), f"{where}.{key}", lo=1, hi=1 << 16)
    _choice(img.get("space"), f"{where}.space", ("pixels", "latents"))
    size = model.get("image_size")
    expected = {"channels": model.get("in_channels"), "height": size, "width": size}
    for key, want in expected.items():
        if want is not None and img[key] != want:
            _fail(f"{where}.{key}", f"is {img[key]} but the model's is {want}")


# ----------------------------------------------------------------------------------------------
# graphs and files
# ----------------------------------------------------------------------------------------------

def check_tensor(t: Any, where: str) -> dict[str, Any]:
    t = _obj(t, where)
    if not isinstance(t.get("name"), str) or not t["name"]:
        _fail(f"{where}.name", f"must be a non-empty string, got {t.get('name')!r}")
    _choice(t.get("dtype"), f"{where}.dtype", DTYPES)
    shape = t.get("shape")
    if not isinstance(shape, list) or not shape:
        _fail(f"{where}.shape", f"must be a non-empty array, got {_type_name(shape)}")
    for i, dim in enumerate(shape):
        if dim != BATCH:
            _int(dim, f"{where}.shape[{i}]", lo=1, hi=1 << 20)
    return t


def _signature(entry: dict[str, Any], key: str) -> list[tuple[str, str, list[Any]]]:
    return [(t["name"], t["dtype"], t["shape"]) for t in entry[key]]


def expected_io(name: str, m: dict[str, Any], prediction: str) -> tuple[list[Any], list[Any]] | None:
    """The (inputs, outputs) signature the contract fixes for a denoiser graph (None for the VAE decoder,
    whose output size depends on the VAE: only its input is fixed)."""
    c, s = m.get("in_channels"), m.get("image_size")
    out_c = c * (2 if m.get("learn_sigma") else 1) if isinstance(c, int) else None
    x = ("x", "float32", [BATCH, c, s, s])
    noise = (CONTRACTS[prediction], "float32", [BATCH])
    y = ("y", "int64", [BATCH])
    out = [("out", "float32", [BATCH, out_c, s, s])]
    if name == "denoiser":
        return [x, noise, y], out
    if name == "denoiser_cfg":
        return [x, noise, y, ("guidance", "float32", [BATCH])], out
    return None


def check_graph_entry(name: str, g: Any, m: dict[str, Any], prediction: str, where: str) -> dict[str, Any]:
    g = _obj(g, where)
    check_relpath(g.get("file"), f"{where}.file")
    for key in ("inputs", "outputs"):
        if not isinstance(g.get(key), list) or not g[key]:
            _fail(f"{where}.{key}", f"must be a non-empty array, got {_type_name(g.get(key))}")
        for i, t in enumerate(g[key]):
            check_tensor(t, f"{where}.{key}[{i}]")
    ext = g.get("external_data", [])
    if not isinstance(ext, list):
        _fail(f"{where}.external_data", f"must be an array, got {_type_name(ext)}")
    for i, rel in enumerate(ext):
        check_relpath(rel, f"{where}.external_data[{i}]")
    if "custom_nodes" in g:
        _int(g["custom_nodes"], f"{where}.custom_nodes", lo=0)
    if "precision" in g:
        _choice(g["precision"], f"{where}.precision", ("fp32", "fp16"))
    expected = expected_io(name, m, prediction)
    if expected is not None:
        for key, want in zip(("inputs", "outputs"), expected):
            if _signature(g, key) != want:
                _fail(f"{where}.{key}", f"{_signature(g, key)} does not match the {prediction} contract for this "
                                        f"model: {want}")
    elif name == "vae_decoder":
        c, s = m.get("in_channels"), m.get("image_size")
        if _signature(g, "inputs") != [("latents", "float32", [BATCH, c, s, s])]:
            _fail(f"{where}.inputs", f"must be latents float32 {[BATCH, c, s, s]}, got {_signature(g, 'inputs')}")
        out = g["outputs"]
        if len(out) != 1 or out[0]["name"] != "image" or out[0]["dtype"] != "float32" or len(out[0]["shape"]) != 4 \
                or out[0]["shape"][0] != BATCH or out[0]["shape"][1] not in (1, 3):
            _fail(f"{where}.outputs", "must be one image float32 [batch, 1 or 3, H, W]")
    else:
        _fail(where, "is not a graph this diffit-port knows (denoiser, denoiser_cfg, vae_decoder)")
    return g


def check_files(files: Any, where: str = "files") -> dict[str, str]:
    files = _obj(files, where)
    for rel, digest in files.items():
        check_relpath(rel, f"{where} key")
        if rel == "manifest.json":
            _fail(where, "lists manifest.json, which cannot hash itself")
        if not isinstance(digest, str) or not SHA256.match(digest):
            _fail(f"{where}[{rel!r}]", f"must be a sha256 hex digest, got {digest!r}")
    return files


# ----------------------------------------------------------------------------------------------
# the whole manifest
# ----------------------------------------------------------------------------------------------

def check_manifest(manifest: Any) -> dict[str, Any]:
    """Raise SchemaError unless `manifest` (parsed JSON) is a well-formed, self-consistent package manifest."""
    m = _obj(manifest, "the manifest")
    if m.get("format") != FORMAT:
        _fail("format", f"is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION or isinstance(m.get("format_version"), bool):
        _fail("format_version", f"{m.get('format_version')!r} is not supported (this diffit-port reads version "
                                f"{FORMAT_VERSION}); re-export the checkpoint")
    for key in ("model", "diffusion", "graphs", "files", "precision", "opset"):
        if key not in m:
            _fail(key, "missing (a required key)")
    model = check_model(m["model"])
    diffusion = check_diffusion(m["diffusion"])
    prediction = diffusion.get("prediction", "eps")
    check_sampling(m.get("sampling", {}), model, diffusion)
    if "image" in m and m["image"] is not None:
        check_image(m["image"], model)
    consistent = {"num_classes": model.get("num_classes", 0), "null_label": model.get("num_classes", 0),
                  "learn_sigma": model.get("learn_sigma", False), "prediction": prediction}
    for key, want in consistent.items():
        if key in m and (m[key] != want or type(m[key]) is not type(want)):
            _fail(key, f"is {m[key]!r} but the model / diffusion config says {want!r}")
    _choice(m["precision"], "precision", ("fp32", "fp16"))
    _int(m["opset"], "opset", lo=OPSET, hi=OPSET)
    if "preset" in m and m["preset"] is not None and not isinstance(m["preset"], str):
        _fail("preset", f"must be a string or null, got {_type_name(m['preset'])}")
    if "weights" in m:
        _choice(m["weights"], "weights", ("ema", "model"))
    graphs = _obj(m["graphs"], "graphs")
    if "denoiser" not in graphs:
        _fail("graphs", f"has no 'denoiser' graph (it has: {', '.join(graphs) or 'none'})")
    if "denoiser_cfg" in graphs and not model.get("num_classes"):
        _fail("graphs.denoiser_cfg", "in-graph guidance needs a class-conditional model (num_classes is 0)")
    for name, g in graphs.items():
        check_graph_entry(name, g, model, prediction, f"graphs.{name}")
    files = check_files(m["files"])
    named = [g["file"] for g in graphs.values()] + [e for g in graphs.values() for e in g.get("external_data", [])]
    ckpt = m.get("checkpoint")
    if ckpt is not None:
        named.append(check_relpath(ckpt, "checkpoint"))
    for rel in named:
        if rel not in files:
            _fail("files", f"does not hash {rel!r}, which the manifest names")
    vae = m.get("vae")
    if vae is not None:
        vae = _obj(vae, "vae")
        for key in ("scaling_factor", "shift_factor", "upsampling"):
            if key in vae:
                _num(vae[key], f"vae.{key}", positive=key != "shift_factor")
    for key in ("parity", "producer"):
        if key in m and m[key] is not None:
            _obj(m[key], key)
    return m
