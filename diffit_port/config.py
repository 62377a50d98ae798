"""Frozen configuration dataclasses and the named presets (NumPy-free, torch-free)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one DiffiT denoiser; `kind` selects the image-space U-Net or the latent ViT."""

    kind: str                                # "image" (U-shaped, windowed TMSA) or "latent" (ViT, global TMSA)
    image_size: int                          # spatial size of x (pixels, or latent cells for "latent")
    in_channels: int                         # channels of x
    num_classes: int = 0                     # 0 = unconditional; the null label is always `num_classes`
    learn_sigma: bool = False                # output 2*in_channels: eps and the variance interpolation v
    num_heads: int = 0                       # latent: heads per block (image: derived from head_dim)
    head_dim: int = 64                       # image: channels per head (EDM convention, spec §7 #9)
    mlp_ratio: float = 4.0
    freq_dim: int = 256                      # width of the sinusoidal timestep features
    time_dim: int = 0                        # width of the time token x_t (0 = hidden_size for latent)
    class_dropout_prob: float = 0.1          # label dropout for classifier-free guidance (training only)
    dropout: float = 0.0                     # image: dropout before each ResBlock's conv (EDM's place; training only)
    # latent (ViT-style) fields
    hidden_size: int = 0
    depth: int = 0
    patch_size: int = 2
    # image-space (U-shaped) fields
    channels: tuple[int, ...] = ()           # width of each stage, finest first
    blocks: tuple[int, ...] = ()             # ResBlocks per stage (L1, L2, ...)
    window_size: int = 8                     # attention window at every stage (clipped to the feature map)
    gn_groups: int = 32

    def __post_init__(self):
        # Accept lists (from JSON / checkpoints) and store tuples so the config stays hashable.
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.kind not in ("image", "latent"):
            raise ValueError(f"ModelConfig.kind must be 'image' or 'latent', got {self.kind!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.kind != "image":
            raise ValueError("dropout applies to the image-space ResBlocks only (kind='image')")
        if self.kind == "latent":
            if self.hidden_size <= 0 or self.depth <= 0 or self.num_heads <= 0:
                raise ValueError("a latent config needs hidden_size, depth and num_heads > 0")
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be divisible by num_heads")
            if self.image_size % self.patch_size:
                raise ValueError("image_size must be divisible by patch_size")
        else:
            if not self.channels or len(self.channels) != len(self.blocks):
                raise ValueError("an image config needs `channels` and `blocks` of equal length")
            for c in self.channels:
                if c % self.head_dim or c % self.gn_groups:
                    raise ValueError(f"stage width {c} must be divisible by head_dim and gn_groups")
            if self.image_size % (2 ** (len(self.channels) - 1)):
                raise ValueError("image_size must be divisible by 2**(stages-1)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def time_embed_dim(self) -> int:
        return self.time_dim or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"], d["blocks"] = list(self.channels), list(self.blocks)
        if not self.dropout:
            del d["dropout"]  # written only when used: configs without dropout stay as they were before it existed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


PREDICTIONS = ("eps", "edm")
# Each formulation's own fields: DiffusionConfig writes only those of its prediction (eps configs serialise exactly
# as before EDM existed) and refuses non-default values of the other's, which would be silently ignored.
EPS_FIELDS = ("schedule", "num_timesteps")
EDM_FIELDS = ("sigma_data", "sigma_min", "sigma_max", "rho", "p_mean", "p_std")


@dataclass(frozen=True)
class DiffusionConfig:
    """The formulation the denoiser was trained with: the discrete VP forward process with eps prediction
    (ADM / DiT), or EDM's continuous noise levels with its preconditioning (Karras et al. 2022)."""

    schedule: str = "linear"                 # eps only: "linear" (1e-4 .. 2e-2) or "cosine" (Nichol & Dhariwal)
    num_timesteps: int = 1000                # eps only: length of the discrete chain
    prediction: str = "eps"                  # "eps": the network predicts the noise; "edm": D(x; sigma), below
    # EDM only, with EDM's values (Karras et al. 2022, Table 1 and its training setup):
    sigma_data: float = 0.5                  # standard deviation of the data, in c_skip, c_out, c_in
    sigma_min: float = 0.002                 # smallest noise level the sampler visits
    sigma_max: float = 80.0                  # largest noise level: x_T = sigma_max * N(0, I)
    rho: float = 7.0                         # exponent of the sampler's noise-level grid (Karras et al. eq. 5)
    p_mean: float = -1.2                     # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        other, other_name = (EDM_FIELDS, "edm") if self.prediction == "eps" else (EPS_FIELDS, "eps")
        changed = [f.name for f in dataclasses.fields(self) if f.name in other and getattr(self, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: only for prediction={other_name!r}")
        if self.prediction == "eps":
            return
        for name in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")

    @property
    def is_edm(self) -> bool:
        return self.prediction == "edm"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in EPS_FIELDS if self.is_edm else EDM_FIELDS:
            del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        return cls(**d)


def check_formulation(model: ModelConfig, diffusion: DiffusionConfig) -> None:
    """ValueError when the model cannot be trained or sampled with `diffusion` (learned variance is an eps idea)."""
    if diffusion.is_edm and model.learn_sigma:
        raise ValueError("a learn_sigma model cannot use EDM: its variance channels belong to the discrete eps "
                         "process (use prediction 'eps', or a config with learn_sigma=False)")


@dataclass(frozen=True)
class Preset:
    """A named model + diffusion pair, plus the sampling defaults the paper used for it."""

    name: str
    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: str = "dpmpp-2m"                # default sampler of `diffit-run`
    steps: int = 50
    guidance: float = 1.0                    # classifier-free guidance scale (1 = off)
    guidance_schedule: str = "constant"      # "constant" or "power-cosine" (paper, ImageNet-256)
    guide_channels: int = 0                  # guide only the first k eps channels (0 = all)
    clip_denoised: bool = False              # clip x_0 estimates to [-1, 1] while sampling (pixel-space models)
    description: str = ""

    def __post_init__(self):
        check_formulation(self.model, self.diffusion)


def with_formulation(preset: Preset, prediction: str | None = None, dropout: float | None = None) -> Preset:
    """`preset` trained another way: `prediction` "eps" or "edm" (None: the preset's) and `dropout` (None: the
    preset's). Switching the prediction of a pixel-space preset also switches x_0 clipping, which the eps
    samplers need there (docs/TRAINING.md) and EDM's do not use."""
    model = preset.model if dropout is None else dataclasses.replace(preset.model, dropout=dropout)
    diffusion, clip = preset.diffusion, preset.clip_denoised
    if prediction is not None and prediction != diffusion.prediction:
        diffusion = DiffusionConfig(prediction=prediction)       # each formulation's defaults
        clip = model.kind == "image" and prediction == "eps"
    return dataclasses.replace(preset, model=model, diffusion=diffusion, clip_denoised=clip)


def _latent(size: int, **kw) -> ModelConfig:
    # The released ImageNet model: XL/2 width, depth 28 (spec §7 #1), learned variance, 1000 classes.
    base = dict(kind="latent", image_size=size, in_channels=4, num_classes=1000, learn_sigma=True,
                hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    base.update(kw)
    return ModelConfig(**base)


_DIGITS = ModelConfig(kind="image", image_size=32, in_channels=1, num_classes=10, channels=(64, 128, 128),
                      blocks=(1, 2, 2), window_size=8, head_dim=32, time_dim=192, gn_groups=16, mlp_ratio=2.0)
_TINY = ModelConfig(kind="image", image_size=16, in_channels=1, num_classes=10, channels=(16, 32), blocks=(1, 1),
                    window_size=4, head_dim=8, time_dim=32, freq_dim=32, gn_groups=8)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("latent-xl2-256", _latent(32), sampler="ddpm", steps=250, guidance=4.4,
               guidance_schedule="power-cosine", guide_channels=3,
               description="ImageNet-256 latent DiffiT (paper Table 1; 32x32x4 SD-VAE latents)"),
        Preset("latent-xl2-512", _latent(64), sampler="ddpm", steps=250, guidance=1.49, guide_channels=3,
               description="ImageNet-512 latent DiffiT (paper Table 1; 64x64x4 SD-VAE latents)"),
        # Not a paper model: the latent model at DiT-S/2's width, depth and heads, small enough to benchmark the
        # latent form on a CPU (BENCHMARKS_CPU.md) and to try things quickly.
        Preset("latent-s2-256", _latent(32, hidden_size=384, depth=12, num_heads=6), sampler="ddpm", steps=250,
               guidance=4.4, guidance_schedule="power-cosine", guide_channels=3,
               description="a small latent DiffiT (DiT-S/2 width and depth; not in the paper), ImageNet-256 shapes"),
        # Image-space presets (paper App. H.1 / I.1; the spec's §3, §5 and §7 list the sources). The paper's:
        # resolution, stages (3 at 32/16/8; 4 at 64..8), L = 4 ResBlocks per stage, window 4 / 8, unconditional,
        # "EDM's training configuration" and EDM's deterministic sampler with 18 / 40 steps. EDM's, which the
        # paper says it follows: dropout 0.13 / 0.05 (EDM's CIFAR-10 / FFHQ-64 values) and its formulation
        # (sigma_data 0.5, log-normal sigma, sigma in [0.002, 80], rho 7). Inferred (the paper is silent):
        # EDM's preconditioning as the "EDM config" (spec §7 #13), widths 128/256/... (§7 #5, from EDM's channel
        # multipliers and Table S.2), time token 512 (Table 3 ablation, §3), head dim 64, MLP ratio 4,
        # 32 GroupNorm groups (§7 #9), 256 sinusoidal features (DiT's), the dropout's place (models.py).
        Preset("image-cifar10",
               ModelConfig(kind="image", image_size=32, in_channels=3, channels=(128, 256, 256),
                           blocks=(4, 4, 4), window_size=4, time_dim=512, dropout=0.13),
               diffusion=DiffusionConfig(prediction="edm"), sampler="heun", steps=18,
               description="CIFAR-10 image-space DiffiT (paper Table 2 setup, EDM; widths and heads inferred), "
                           "unconditional"),
        Preset("image-ffhq64",
               ModelConfig(kind="image", image_size=64, in_channels=3, channels=(128, 256, 256, 256),
                           blocks=(4, 4, 4, 4), window_size=8, time_dim=512, dropout=0.05),
               diffusion=DiffusionConfig(prediction="edm"), sampler="heun", steps=40,
               description="FFHQ-64 image-space DiffiT (paper Table 2 setup, EDM; widths and heads inferred), "
                           "unconditional"),
        Preset("digits", _DIGITS, diffusion=DiffusionConfig(schedule="cosine"), sampler="dpmpp-2m", steps=50,
               guidance=1.5, clip_denoised=True,
               description="32x32 grayscale handwritten digits, class-conditional "
                           "(eps; the embedded default until 2026-12)"),
        # The digits model and budget trained with EDM instead of eps (no dropout, as the eps model): the embedded
        # default since it measured at least as good at equal evaluations; DPM-Solver++(2M) at 10 steps held its
        # quality in the step table of docs/TRAINING.md (10/20/30/50 steps, all 99.7-99.8% class accuracy).
        Preset("digits-edm", _DIGITS, diffusion=DiffusionConfig(prediction="edm"), sampler="dpmpp-2m", steps=10,
               guidance=1.5, description="the digits model trained with EDM (the embedded default)"),
        Preset("tiny", _TINY, sampler="ddim", steps=10, guidance=2.0, clip_denoised=True,
               description="about 50k parameters, for tests"),
        Preset("tiny-edm", _TINY, diffusion=DiffusionConfig(prediction="edm"), sampler="heun", steps=6,
               guidance=2.0, description="the tiny model with EDM, class-conditional, for tests"),
        Preset("tiny-latent",
               ModelConfig(kind="latent", image_size=8, in_channels=4, num_classes=10, learn_sigma=True,
                           hidden_size=32, depth=2, num_heads=2, patch_size=2, freq_dim=32),
               sampler="ddpm", steps=10, guidance=2.0, guide_channels=3,
               description="a latent DiffiT with learned variance, for tests"),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
