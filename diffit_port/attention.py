"""Time-dependent multi-head self-attention (TMSA, paper Eqs. 3-6) with a Swin-style relative position bias."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_token_attention(x: torch.Tensor, t_emb: torch.Tensor, w_qkv: torch.Tensor, w_time: torch.Tensor,
                         b_qkv: torch.Tensor, rel_bias: torch.Tensor, num_heads: int,
                         reference: bool = False) -> torch.Tensor:
    """The time-token attention op: everything in TMSA between the inputs and the output projection.

    x (B, N, C) spatial tokens; t_emb (B, Ct) one time token per row of x; w_qkv (C, 3C) and
    w_time (Ct, 3C) the spatial and temporal projections (q|k|v stacked along the last axis, so
    q_s = x W_qs + x_t W_qt as in Eqs. 3-5); b_qkv (3C,) both biases summed; rel_bias (h, N, N).
    Returns softmax(q k^T / sqrt(C/h) + B) v with heads concatenated, (B, N, C).

    The exporter swaps this function for a custom ONNX node (`export/tmsa_op.py`); keep the
    signature in step with that op.
    """
    B, N, C = x.shape
    qkv = x @ w_qkv + (t_emb @ w_time + b_qkv).unsqueeze(1)                       # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
    if reference:
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(C // num_heads) + rel_bias
        out = logits.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=rel_bias.to(q.dtype))
    return out.transpose(1, 2).reshape(B, N, C)


def relative_position_index(m: int) -> torch.Tensor:
    """(m*m, m*m) index into a ((2m-1)^2, h) bias table; entry [i, j] depends only on (drow, dcol)."""
    coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)                     # (N, N, 2)
    return rel[..., 0] * (2 * m - 1) + rel[..., 1]


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention over an m x m grid of tokens (a window, or the whole grid)."""

    def __init__(self, dim: int, time_dim: int, num_heads: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)                 # W_qs | W_ks | W_vs
        self.qkv_time = nn.Linear(time_dim, 3 * dim)       # W_qt | W_kt | W_vt (W_kt is inert: see README)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
        self.register_buffer("rel_index", relative_position_index(grid), persistent=False)

    def relative_bias(self) -> torch.Tensor:
        return self.rel_bias_table[self.rel_index].permute(2, 0, 1)                 # (h, N, N)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, reference: bool = False) -> torch.Tensor:
        # Looked up at call time so the exporter can route it to the custom op.
        out = time_token_attention(x, t_emb, self.qkv.weight.t(), self.qkv_time.weight.t(),
                                   self.qkv.bias + self.qkv_time.bias, self.relative_bias(),
                                   self.num_heads, reference)
        return self.proj(out)


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B * H/w * W/w, w*w, C) non-overlapping windows, row-major."""
    B, C, H, W = x.shape
    x = x.permute(0, 2, 3, 1).reshape(B, H // w, w, W // w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def window_reverse(tokens: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, w*w, C) -> (B, C, H, W)."""
    C = tokens.shape[-1]
    x = tokens.reshape(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C).permute(0, 3, 1, 2)
