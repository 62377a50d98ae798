"""DiffiT denoisers: the image-space U-shaped model and the latent ViT-style model (paper §3.2).

Both follow one contract: forward(x (B,C,H,W) float, t (B,) float time input, y (B,) int64 label, the
null label for "no class") -> (B, C or 2C, H, W). For eps training t is the training index and the output
eps, plus the variance channels when the config learns them; inside EDM's preconditioning (edm.py) t is
c_noise = ln(sigma) / 4 and the output the network's part F of the denoiser.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TMSA, window_partition, window_reverse
from .config import ModelConfig, Preset, get_preset


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------

def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of a (B,) float timestep, (B, dim) (DiT / ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Positional time embedding followed by Linear -> SiLU -> Linear: the time token x_t."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector added to the time token; row `num_classes` is the null (unconditional) label."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2D sin-cos absolute position embedding, (grid*grid, dim), tokens row-major (MAE / DiT / official
    DiffiT layout): the first dim/2 channels encode the column (w) coordinate, the last dim/2 the row (h)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

class DiffiTBlock(nn.Module):
    """DiffiT transformer block (Eqs. 7-8): pre-norm TMSA and MLP, LayerNorms without affine."""

    def __init__(self, dim: int, time_dim: int, num_heads: int, grid: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, time_dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), c)                                      # x_hat, Eq. 7
        return x + self.mlp(self.norm2(x))                                       # Eq. 8


class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock (Eqs. 9-10): Conv3x3(SiLU(GN(x))) then a windowed DiffiT block, plus the input.

    `dropout` > 0 drops activations right before the conv. The paper names no place; EDM's UNet blocks drop
    right before the last conv of the residual branch, and this conv is the block's only one (inferred)."""

    def __init__(self, channels: int, time_dim: int, num_heads: int, window: int, groups: int,
                 mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.window = window
        self.norm = nn.GroupNorm(groups, channels)
        # Identity at 0: no parameters either way, and no random numbers drawn (eps runs stay bit-exact).
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, time_dim, num_heads, window, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w = self.window
        h = self.conv(self.dropout(F.silu(self.norm(x))))                        # (B, C, H, W)
        tokens = window_partition(h, w)                                          # (B*nW, w*w, C)
        n_win = (H // w) * (W // w)
        c_win = c[:, None, :].expand(B, n_win, c.shape[-1]).reshape(-1, c.shape[-1])  # same x_t in every window
        tokens = self.block(tokens, c_win)
        return window_reverse(tokens, w, H, W) + x


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def _init_linears_and_embedders(model: nn.Module) -> None:
    """DiT's initialisation: xavier-uniform Linear weights with zero biases; N(0, 0.02) for the timestep MLP
    and the label table."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    if model.y_embedder is not None:
        nn.init.normal_(model.y_embedder.table.weight, std=0.02)


class ImageDiffiT(nn.Module):
    """Image-space U-shaped DiffiT: conv tokenizer, stages of L ResBlocks, stride-2 conv down,
    nearest+conv up, additive skips at every resolution, GN -> SiLU -> Conv3x3 head (Fig. 4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, td, S = cfg.channels, cfg.time_embed_dim, len(cfg.channels)
        res = [cfg.image_size // 2 ** i for i in range(S)]

        def stage(i: int, n: int) -> nn.ModuleList:
            window = min(cfg.window_size, res[i])
            if res[i] % window:
                raise ValueError(f"stage {i} size {res[i]} is not divisible by window {window}")
            return nn.ModuleList(DiffiTResBlock(ch[i], td, ch[i] // cfg.head_dim, window, cfg.gn_groups,
                                                cfg.mlp_ratio, cfg.dropout) for _ in range(n))

        self.t_embedder = TimestepEmbedder(cfg.freq_dim, td)
        self.y_embedder = LabelEmbedder(cfg.num_classes, td) if cfg.num_classes else None
        self.tokenizer = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(i, cfg.blocks[i]) for i in range(S))
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(S - 1))
        self.up = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in reversed(range(S - 1)))
        self.decoder = nn.ModuleList(stage(i, cfg.blocks[i]) for i in reversed(range(S - 1)))
        self.head = nn.Sequential(nn.GroupNorm(cfg.gn_groups, ch[0]), nn.SiLU(),
                                  nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self):
        _init_linears_and_embedders(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t)                                                   # (B, Ct) time token
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        h = self.tokenizer(x)                                                    # (B, ch0, H, W)
        skips = []
        for i, blocks in enumerate(self.encoder):
            for blk in blocks:
                h = blk(h, c)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)                                              # halve resolution
        for up, blocks in zip(self.up, self.decoder):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips.pop()
            for blk in blocks:
                h = blk(h, c)
        return self.head(h)                                                      # (B, out, H, W)


class LatentDiffiT(nn.Module):
    """Latent DiffiT (Fig. 3): patch embedding, N DiffiT blocks with global TMSA, LN -> SiLU -> Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // p
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        # Fixed, not trained; a Parameter (as DiT) so parameter counts match the paper's 561M.
        self.pos_embed = nn.Parameter(torch.tensor(sincos_pos_embed_2d(D, self.grid), dtype=torch.float32)[None],
                                      requires_grad=False)
        self.t_embedder = TimestepEmbedder(cfg.freq_dim, D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiffiTBlock(D, D, cfg.num_heads, self.grid, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(D, p * p * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        _init_linears_and_embedders(self)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.zeros_(self.final_linear.weight)                                 # the model starts at eps = 0
        nn.init.zeros_(self.final_linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g, c = self.cfg.patch_size, self.grid, self.cfg.out_channels
        x = x.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)              # (B, c, g, p, g, p)
        return x.reshape(-1, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed       # (B, T, D)
        c = self.t_embedder(t)                                                   # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)                                           # label added to time (Fig. 3)
        for blk in self.blocks:
            h = blk(h, c)
        h = self.final_linear(F.silu(self.final_norm(h)))                        # (B, T, p*p*out)
        return self.unpatchify(h)                                                # (B, out, H, W)


def build_model(spec: str | Preset | ModelConfig) -> nn.Module:
    """A freshly initialised denoiser from a preset name, a Preset or a ModelConfig."""
    cfg = get_preset(spec).model if isinstance(spec, str) else spec.model if isinstance(spec, Preset) else spec
    return (LatentDiffiT if cfg.kind == "latent" else ImageDiffiT)(cfg)


def count_parameters(model: nn.Module) -> int:
    """All parameters, the fixed position embedding included (the convention of the paper's 561M)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_zero_init_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """For tests: give a LatentDiffiT's zero-initialised output layer (`final_linear`) random weights, so
    an untrained model is a non-trivial function of x, t and y (a zero output would make any parity
    check pass). Only latent models are changed; any other model is returned untouched."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, LatentDiffiT):
        for p in (model.final_linear.weight, model.final_linear.bias):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
