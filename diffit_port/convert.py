"""Official NVlabs/DiffiT latent checkpoints -> diffit-port checkpoints: reading, key mapping, config inference
from the tensors, strict checks and the release's sampling defaults (the CLI is `convert_cli.py`)."""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .attention import relative_position_index
from .checkpoint import CHECKPOINT_FORMAT, make_checkpoint, save_atomic
from .config import PRESETS, DiffusionConfig, ModelConfig, get_preset
from .models import LatentDiffiT, sincos_pos_embed_2d

SUFFIXES = (".safetensors", ".pt", ".pth")

# The release's diffusion (diffit/__init__.py `diffusion_defaults`, spec §5): linear betas 1e-4 .. 0.02 over
# 1000 steps, eps prediction, learned-range variance (the model's learn_sigma channels).
RELEASE_DIFFUSION = DiffusionConfig(schedule="linear", num_timesteps=1000, prediction="eps")
# Label dropout of the released model (diffit/diffit.py `DiffiT(class_dropout_prob=0.1)`): with it > 0 the label
# table has one extra row, the null label `num_classes`. Training only; it does not change the forward.
RELEASE_CLASS_DROPOUT = 0.1


class ConvertError(ValueError):
    """A file that cannot be converted: wrong type, unreadable, or not the official layout. One line."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def load_file(path: str | os.PathLike) -> Any:
    """The object stored in `path`: .safetensors through the safetensors library, .pt/.pth through
    torch.load(weights_only=True) (plain containers of tensors; argparse.Namespace, which DiT-style training
    scripts store beside the weights, is allowed as a plain attribute bag). Raises ConvertError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConvertError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of "
                           f"{', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_torch(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file as safe_load
    except ImportError:
        raise ConvertError("reading .safetensors needs the safetensors package "
                           "(pip install 'diffit-port[torch]')") from None
    try:
        return safe_load(os.fspath(path), device="cpu")
    except Exception as e:           # SafetensorError and OSError: a truncated or foreign file
        raise ConvertError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _load_torch(path: Path) -> Any:
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which would run the file's code: it is not passed on.
        if "weights only load failed" in str(e).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"would import {found.group(1)}" if found else "needs objects other than tensors"
            raise ConvertError(f"{path}: refused: its pickle {what}, so loading it could run code; only tensors "
                               "and plain containers are read") from None
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:          # truncated zip, empty or foreign file: the unpickler raises many types
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})"
                           ) from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (library messages run on for lines)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:160]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any, use_ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, which entry it came from). Accepts a bare state dict or the usual wrappers: "ema" and
    "model" (DiT-style training checkpoints: EMA by default, `use_ema=False` for the raw weights), then
    "state_dict"; a "module." prefix on every key (DistributedDataParallel) is removed."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        raise ConvertError("this is already a diffit-port checkpoint: pass it to diffit-export directly")
    if not isinstance(obj, dict):
        raise ConvertError(f"the file holds a {type(obj).__name__}, not a state dict")
    if _is_state_dict(obj):
        if use_ema is not None:
            raise ConvertError("--ema/--no-ema: the file is a bare state dict, without 'ema' and 'model' entries")
        sd, where = obj, "the file's top-level state dict"
    else:
        present = [k for k in ("ema", "model", "state_dict") if _is_state_dict(obj.get(k))]
        if use_ema is True and "ema" not in present or use_ema is False and "model" not in present:
            want = "ema" if use_ema else "model"
            raise ConvertError(f"{'--ema' if use_ema else '--no-ema'}: the file has no {want!r} state dict "
                               f"(entries: {', '.join(map(str, obj)) or 'none'})")
        if not present:
            raise ConvertError(f"no state dict found: the file's entries are {', '.join(map(str, obj)) or 'none'} "
                               "(expected tensors, or an 'ema', 'model' or 'state_dict' entry)")
        key = "model" if use_ema is False else present[0]
        sd = obj[key]
        others = [k for k in present if k != key]
        where = f"entry {key!r}" + (f" ({' and '.join(map(repr, others))} also present)" if others else "")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        where += ", 'module.' prefix removed"
    return sd, where


# --------------------------------------------------------------------------------------------
# The official layout
# --------------------------------------------------------------------------------------------

_BLOCK_LINEARS = (("attn.qkv", "attn.qkv"), ("attn.qkv_temb", "attn.qkv_time"), ("attn.proj", "attn.proj"),
                  ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"))         # timm Mlp: fc1 -> GELU(tanh) -> fc2


def key_map(depth: int) -> dict[str, str | None]:
    """official key -> project key for a checkpoint of `depth` blocks (None: a fixed tensor that is checked,
    not loaded: `pos_embed`, each block's `relative_position_index` buffer)."""
    wb = ("weight", "bias")
    out: dict[str, str | None] = {f"x_embedder.proj.{s}": f"x_embedder.{s}" for s in wb}    # timm PatchEmbed.proj
    out["pos_embed"] = None
    out.update({f"t_embedder.mlp.{i}.{s}": f"t_embedder.mlp.{i}.{s}" for i in (0, 2) for s in wb})
    out["y_embedder.embedding_table.weight"] = "y_embedder.table.weight"
    for i in range(depth):
        for theirs, ours in _BLOCK_LINEARS:
            out.update({f"blocks.{i}.{theirs}.{s}": f"blocks.{i}.{ours}.{s}" for s in wb})
        out[f"blocks.{i}.attn.relative_position_bias_table"] = f"blocks.{i}.attn.rel_bias_table"
        out[f"blocks.{i}.attn.relative_position_index"] = None
    out.update({f"final_layer.linear.{s}": f"final_linear.{s}" for s in wb})
    return out


def _depth(keys) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _summarise(keys, limit: int = 6) -> str:
    """Keys with block indices folded ("blocks.*.attn.qkv.weight x28"), at most `limit` of them."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.*.", k), []).append(k)
    items = sorted(f"{g} x{len(ks)}" if len(ks) > 1 else ks[0] for g, ks in groups.items())
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _layout_error(unknown, missing, mismatched: list[str]) -> ConvertError:
    parts = []
    if unknown:
        parts.append(f"unknown keys ({len(unknown)}): {_summarise(unknown)}")
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if mismatched:
        more = f", ... ({len(mismatched) - 6} more)" if len(mismatched) > 6 else ""
        parts.append(f"shape mismatches ({len(mismatched)}): {', '.join(mismatched[:6])}{more}")
    return ConvertError("not an official DiffiT latent checkpoint: " + "; ".join(parts))


# Tensors whose shapes carry the config (the first one absent makes inference impossible).
_SHAPE_KEYS = ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
               "blocks.0.attn.relative_position_bias_table", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")


def infer_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The latent ModelConfig the tensors describe: patch size and channels from the patch embedding, width
    from it too, depth from the block count, heads from the relative-bias table, token grid from pos_embed,
    classes from the label table (one row is the null label), learned sigma from the final layer."""
    depth = _depth(sd)
    absent = [k for k in _SHAPE_KEYS if k not in sd]
    if absent:
        expected = key_map(max(depth, 1))
        raise _layout_error(sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd)), [])
    w = sd["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ConvertError(f"x_embedder.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    D, C, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    pos = sd["pos_embed"]
    grid = math.isqrt(int(pos.shape[-2])) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D or grid * grid != pos.shape[1]:
        raise ConvertError(f"pos_embed has shape {tuple(pos.shape)}, expected (1, g*g, {D}) for a g x g token grid")
    table = sd["blocks.0.attn.relative_position_bias_table"]
    if table.ndim != 2 or table.shape[0] != (2 * grid - 1) ** 2:
        raise ConvertError(f"blocks.0.attn.relative_position_bias_table has shape {tuple(table.shape)}, expected "
                           f"({(2 * grid - 1) ** 2}, heads): attention over the whole {grid}x{grid} grid")
    rows, out = sd["final_layer.linear.weight"].shape[0], None
    if rows % (p * p) == 0 and rows // (p * p) in (C, 2 * C):
        out = rows // (p * p)
    if out is None:
        raise ConvertError(f"final_layer.linear.weight has {rows} rows; expected p*p*C = {p * p * C} or "
                           f"p*p*2C = {2 * p * p * C} (learned sigma)")
    try:
        return ModelConfig(kind="latent", image_size=grid * p, in_channels=C,
                           num_classes=int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1,
                           learn_sigma=out == 2 * C, num_heads=int(table.shape[1]),
                           mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                           freq_dim=int(sd["t_embedder.mlp.0.weight"].shape[1]),
                           class_dropout_prob=RELEASE_CLASS_DROPOUT, hidden_size=D, depth=depth, patch_size=p)
    except ValueError as e:
        raise ConvertError(f"the tensors describe an impossible config: {e}") from None


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of an official checkpoint of `cfg` (from the project model's own shapes)."""
    with torch.device("meta"):                          # shapes only: no memory for a 561M-parameter model
        ours = {k: tuple(v.shape) for k, v in LatentDiffiT(cfg).state_dict().items()}
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    fixed = {"pos_embed": (1, tokens, cfg.hidden_size), "relative_position_index": (tokens, tokens)}
    return {k: ours[v] if v is not None else fixed[k.rsplit(".", 1)[-1]] for k, v in key_map(cfg.depth).items()}


def check_layout(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every key known, none missing, every shape as `cfg` needs; else one ConvertError listing all three."""
    shapes = official_shapes(cfg)
    mismatched = [f"{k} {tuple(sd[k].shape)} (expected {shape})" for k, shape in shapes.items()
                  if k in sd and tuple(sd[k].shape) != shape]
    unknown, missing = sorted(set(sd) - set(shapes)), sorted(set(shapes) - set(sd))
    if unknown or missing or mismatched:
        raise _layout_error(unknown, missing, mismatched)


def check_fixed_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The checkpoint's pos_embed and relative-position indices must equal what the project computes: that
    pins the position embedding's axis order (w in the first half) and the bias index's orientation."""
    grid = cfg.image_size // cfg.patch_size
    theirs = sd["pos_embed"]
    if not theirs.is_floating_point():
        raise ConvertError(f"pos_embed is {theirs.dtype}, expected a floating-point tensor")
    ours = torch.tensor(sincos_pos_embed_2d(cfg.hidden_size, grid), dtype=torch.float32)[None]
    diff = float((theirs.float() - ours.to(theirs.dtype).float()).abs().max())
    tol = 2 * torch.finfo(theirs.dtype).eps            # |values| <= 1: two roundings of the stored dtype
    if diff > tol:
        raise ConvertError(f"pos_embed differs from the project's sin-cos embedding (max |diff| {diff:.3g}, "
                           f"allowed {tol:.2g}): the position layout is not the official one; refusing")
    index = relative_position_index(grid)
    for i in range(cfg.depth):
        k = f"blocks.{i}.attn.relative_position_index"
        if sd[k].is_floating_point() or not torch.equal(sd[k].long(), index):
            raise ConvertError(f"{k} differs from the project's relative-position index for a {grid}x{grid} grid "
                               "(transposed or another layout); refusing")


def to_project(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> LatentDiffiT:
    """A LatentDiffiT of `cfg` holding the official tensors (float32); its own pos_embed is kept (checked equal)."""
    model = LatentDiffiT(cfg)
    state = model.state_dict()
    for theirs, ours in key_map(cfg.depth).items():
        if ours is not None:
            state[ours] = sd[theirs].to(torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_official(model: LatentDiffiT) -> dict[str, torch.Tensor]:
    """The inverse: the model's tensors in the official key layout, fixed tensors included (for tests and the
    full-size benchmark; the official code's `load_state_dict` accepts it)."""
    cfg, state = model.cfg, model.state_dict()
    index = relative_position_index(cfg.image_size // cfg.patch_size)
    out = {}
    for theirs, ours in key_map(cfg.depth).items():
        value = state[ours] if ours is not None else state["pos_embed"] if theirs == "pos_embed" else index
        out[theirs] = value.detach().clone().contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Presets, release defaults, the whole conversion
# --------------------------------------------------------------------------------------------

def matching_preset(cfg: ModelConfig) -> str | None:
    """The name of the preset whose model config equals `cfg` (latent-xl2-256 / -512 for the releases)."""
    return next((name for name, p in sorted(PRESETS.items()) if p.model == cfg), None)


def check_preset(cfg: ModelConfig, name: str) -> None:
    """ConvertError naming every field where the tensors' config differs from preset `name`."""
    try:
        want = get_preset(name).model
    except KeyError as e:
        raise ConvertError(str(e.args[0])) from None
    diffs = [f"{f.name} {getattr(cfg, f.name)!r} (preset: {getattr(want, f.name)!r})" for f in fields(ModelConfig)
             if getattr(cfg, f.name) != getattr(want, f.name)]
    if diffs:
        raise ConvertError(f"the tensors do not fit preset {name!r}: " + ", ".join(diffs))


def release_sampling(cfg: ModelConfig) -> dict[str, Any]:
    """How the release samples a model of this size. sample.py defaults: DDPM (use_ddim=False), 250 respaced
    steps, clip_denoised=False, scale_pow=4. Scale: slurm_sample_256.sh --cfg_scale 4.4, slurm_sample_512.sh
    --cfg_scale 1.49. diffit.py forward_with_cfg guides eps[:, :3] only, with the power-cosine ramp where
    input_size <= 32 (256 px) and a constant scale above (512 px)."""
    small = cfg.image_size <= 32
    return {"sampler": "ddpm", "steps": 250, "guidance": 4.4 if small else 1.49,
            "guidance_schedule": "power-cosine" if small else "constant", "guidance_power": 4.0,
            "guide_channels": min(3, cfg.in_channels), "clip_denoised": False}


@dataclass(frozen=True)
class Converted:
    """What `convert` wrote and how it read the source."""

    path: Path
    config: ModelConfig
    preset: str | None
    source_entry: str                 # which part of the file held the weights
    source_dtypes: tuple[str, ...]    # floating dtypes found (stored as float32)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, preset: str | None = None,
            use_ema: bool | None = None, force: bool = False) -> Converted:
    """Read an official checkpoint `src`, check it strictly and write a diffit-port checkpoint to `dst` (the
    release's diffusion and sampling defaults; preset name when the config equals one). Raises ConvertError."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConvertError("the output would overwrite the input; choose another -o")
    try:
        sd, entry = unwrap(load_file(src), use_ema)
        cfg = infer_config(sd)
        if preset is not None:
            check_preset(cfg, preset)
        check_layout(sd, cfg)
        check_fixed_tensors(sd, cfg)
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}" if not str(e).startswith(str(src)) else str(e)) from None
    model = to_project(sd, cfg)
    name = preset or matching_preset(cfg)
    dtypes = tuple(sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()}))
    source = {"layout": "NVlabs/DiffiT", "file": src.name, "entry": entry, "dtypes": list(dtypes)}
    save_atomic(make_checkpoint(model, preset=name, diffusion=RELEASE_DIFFUSION, sampling=release_sampling(cfg),
                                source=source), dst)
    return Converted(dst, cfg, name, entry, dtypes)
