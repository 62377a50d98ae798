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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class DiffusionConfig:
    """The discrete forward process the denoiser was trained on (ADM / DiT convention)."""

    schedule: str = "linear"                 # "linear" (1e-4 .. 2e-2) or "cosine" (Nichol & Dhariwal)
    num_timesteps: int = 1000
    prediction: str = "eps"                  # the network predicts the noise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        return cls(**d)


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


def _latent(size: int, **kw) -> ModelConfig:
    # The released ImageNet model: XL/2 width, depth 28 (spec §7 #1), learned variance, 1000 classes.
    base = dict(kind="latent", image_size=size, in_channels=4, num_classes=1000, learn_sigma=True,
                hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("latent-xl2-256", _latent(32), sampler="ddpm", steps=250, guidance=4.4,
               guidance_schedule="power-cosine", guide_channels=3,
               description="ImageNet-256 latent DiffiT (paper Table 1; 32x32x4 SD-VAE latents)"),
        Preset("latent-xl2-512", _latent(64), sampler="ddpm", steps=250, guidance=1.49, guide_channels=3,
               description="ImageNet-512 latent DiffiT (paper Table 1; 64x64x4 SD-VAE latents)"),
        Preset("image-cifar10",
               ModelConfig(kind="image", image_size=32, in_channels=3, channels=(128, 256, 256),
                           blocks=(4, 4, 4), window_size=4, time_dim=512),
               sampler="heun", steps=18, clip_denoised=True,
               description="CIFAR-10 image-space DiffiT (paper Table 2), unconditional"),
        Preset("image-ffhq64",
               ModelConfig(kind="image", image_size=64, in_channels=3, channels=(128, 256, 256, 256),
                           blocks=(4, 4, 4, 4), window_size=8, time_dim=512),
               sampler="heun", steps=40, clip_denoised=True,
               description="FFHQ-64 image-space DiffiT (paper Table 2), unconditional"),
        Preset("digits",
               ModelConfig(kind="image", image_size=32, in_channels=1, num_classes=10, channels=(64, 128, 128),
                           blocks=(1, 2, 2), window_size=8, head_dim=32, time_dim=192, gn_groups=16,
                           mlp_ratio=2.0),
               diffusion=DiffusionConfig(schedule="cosine"), sampler="dpmpp-2m", steps=50, guidance=1.5,
               clip_denoised=True,
               description="32x32 grayscale handwritten digits, class-conditional (the embedded default)"),
        Preset("tiny",
               ModelConfig(kind="image", image_size=16, in_channels=1, num_classes=10, channels=(16, 32),
                           blocks=(1, 1), window_size=4, head_dim=8, time_dim=32, freq_dim=32, gn_groups=8),
               sampler="ddim", steps=10, guidance=2.0, clip_denoised=True,
               description="about 50k parameters, for tests"),
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
