"""The PyTorch reference against the paper's spec (§8 of the implementation spec)."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffit_port import PRESETS, build_model
from diffit_port.attention import TMSA, relative_position_index, time_token_attention, window_partition, window_reverse
from diffit_port.config import ModelConfig
from diffit_port.models import DiffiTResBlock, count_parameters, randomize_zero_init_

FP32_ATOL = 1e-6   # fp32 rounding of a few hundred multiply-adds on O(1) values


def _tmsa(dim=32, time_dim=24, heads=4, grid=4, seed=0):
    torch.manual_seed(seed)
    m = TMSA(dim, time_dim, heads, grid)
    with torch.no_grad():                 # non-zero biases so every term of Eqs. 3-5 is exercised
        for p in (m.qkv.bias, m.qkv_time.bias, m.proj.bias):
            p.normal_()
    return m


def _mhsa(m: TMSA, x: torch.Tensor) -> torch.Tensor:
    """Textbook multi-head self-attention with the same W_qkv, W_o and relative bias B."""
    B, N, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    q, k, v = m.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-1, -2) / math.sqrt(d) + m.relative_bias()).softmax(-1)
    return m.proj((a @ v).transpose(1, 2).reshape(B, N, C))


def test_tmsa_reduces_to_mhsa_when_time_projections_are_zero():
    """Spec §8.1: W_qt = W_kt = W_vt = 0 and zero time biases give standard MHSA."""
    m = _tmsa()
    with torch.no_grad():
        m.qkv_time.weight.zero_()
        m.qkv_time.bias.zero_()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 24)
    torch.testing.assert_close(m(x, c), _mhsa(m, x), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(m(x, c, reference=True), _mhsa(m, x), atol=FP32_ATOL, rtol=0)


def test_sdpa_fast_path_equals_reference_path():
    m = _tmsa()
    x, c = torch.randn(3, 16, 32), torch.randn(3, 24)
    torch.testing.assert_close(m(x, c), m(x, c, reference=True), atol=FP32_ATOL, rtol=0)


def test_key_side_time_projection_is_inert_and_gets_no_gradient():
    """Spec §8.2: logits are (q_i + q_t)·(k_j + k_t); the k_t terms are constant along the softmax
    axis j and cancel, so W_kt and b_kt cannot change the output. W_qt can."""
    m = _tmsa()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 24)
    ref = m(x, c).detach()
    C = 32
    with torch.no_grad():
        m.qkv_time.weight[C:2 * C].normal_(std=3.0)           # rows of W_kt (nn.Linear stores (out, in))
        m.qkv_time.bias[C:2 * C].normal_(std=3.0)
    torch.testing.assert_close(m(x, c), ref, atol=1e-5, rtol=0)

    m.zero_grad()
    m(x, c).square().sum().backward()
    g = m.qkv_time.weight.grad
    assert g[C:2 * C].abs().max() < 1e-5 * g[:C].abs().max()   # ~0 next to the W_qt gradient
    assert g[:C].abs().max() > 0 and g[2 * C:].abs().max() > 0

    with torch.no_grad():
        m.qkv_time.weight[:C].zero_()                          # zeroing W_qt does matter
    assert (m(x, c) - ref).abs().max() > 1e-3


def test_tmsa_closed_form():
    """Spec §8.3: TMSA(x, t) = MHSA(x) with an extra logit bias q_t·k_j/sqrt(d) per head, plus W_o v_t."""
    m = _tmsa()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 24)
    B, N, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    q, k, v = m.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    qt, _, vt = m.qkv_time(c).reshape(B, 3, h, d).permute(1, 0, 2, 3)            # (B, h, d)
    time_bias = (qt[:, :, None, :] @ k.transpose(-1, -2)) / math.sqrt(d)          # (B, h, 1, N)
    a = (q @ k.transpose(-1, -2) / math.sqrt(d) + m.relative_bias() + time_bias).softmax(-1)
    mhsa = (a @ v).transpose(1, 2).reshape(B, N, C)
    expected = m.proj(mhsa) + (vt.reshape(B, 1, C) @ m.proj.weight.t())
    torch.testing.assert_close(m(x, c), expected, atol=1e-5, rtol=0)


def test_concatenation_form_of_the_projections():
    """Spec §8.4: one Linear on [x_s ; x_t] with stacked weights gives the q, k, v of Eqs. 3-5."""
    m = _tmsa()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 24)
    stacked = torch.cat([m.qkv.weight, m.qkv_time.weight], dim=1)                 # (3C, C + Ct)
    xc = torch.cat([x, c[:, None].expand(-1, 16, -1)], dim=-1)
    concat = xc @ stacked.t() + m.qkv.bias + m.qkv_time.bias
    separate = m.qkv(x) + m.qkv_time(c)[:, None]
    torch.testing.assert_close(concat, separate, atol=1e-5, rtol=0)


def test_time_token_attention_op_matches_module_internals():
    m = _tmsa()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 24)
    out = time_token_attention(x, c, m.qkv.weight.t(), m.qkv_time.weight.t(), m.qkv.bias + m.qkv_time.bias,
                               m.relative_bias(), m.num_heads, reference=True)
    torch.testing.assert_close(m.proj(out), m(x, c), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("grid", [1, 2, 4, 8])
def test_relative_position_index(grid):
    """Spec §8.6: table of ((2M-1)^2, h), index covers 0..(2M-1)^2-1, B[i, j] depends only on (drow, dcol)."""
    idx = relative_position_index(grid)
    n = grid * grid
    assert idx.shape == (n, n)
    assert idx.min() == 0 and idx.max() == (2 * grid - 1) ** 2 - 1
    assert len(torch.unique(idx)) == (2 * grid - 1) ** 2
    rows, cols = torch.arange(n) // grid, torch.arange(n) % grid
    for i in range(n):
        for j in range(n):
            expected = (rows[i] - rows[j] + grid - 1) * (2 * grid - 1) + (cols[i] - cols[j] + grid - 1)
            assert idx[i, j] == expected
    m = TMSA(8, 8, 2, grid)
    assert m.rel_bias_table.shape == ((2 * grid - 1) ** 2, 2)


def test_window_partition_roundtrip():
    x = torch.randn(2, 5, 8, 8)
    w = window_partition(x, 4)
    assert w.shape == (8, 16, 5)
    torch.testing.assert_close(window_reverse(w, 4, 8, 8), x)
    # the first window holds the top-left 4x4 pixels in row-major order
    torch.testing.assert_close(w[0, :, 0], x[0, 0, :4, :4].reshape(-1))


def test_window_locality_and_global_window():
    """Spec §8.5: with window w, perturbing one window's input leaves every other window's output alone;
    with w = the whole grid the result equals global attention."""
    torch.manual_seed(0)
    blk = DiffiTResBlock(16, 8, 2, window=4, groups=4, mlp_ratio=2.0)
    x, c = torch.randn(1, 16, 8, 8), torch.randn(1, 8)
    # Perturb after the conv so the test isolates attention locality (the 3x3 conv itself crosses borders).
    h = blk.conv(F.silu(blk.norm(x)))
    tokens = window_partition(h, 4)
    out = blk.block(tokens, c.expand(4, -1))
    bumped = tokens.clone()
    bumped[1, 5] += 10.0                                       # a token in window 1
    out2 = blk.block(bumped, c.expand(4, -1))
    changed = (out2 - out).abs().amax(dim=(1, 2))
    assert changed[1] > 1e-3
    assert torch.all(changed[[0, 2, 3]] == 0)

    full = DiffiTResBlock(16, 8, 2, window=8, groups=4, mlp_ratio=2.0)
    tok = window_partition(full.conv(F.silu(full.norm(x))), 8)                   # one window = whole map
    flat = full.conv(F.silu(full.norm(x))).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tok, flat)
    torch.testing.assert_close(full(x, c), full.block(flat, c).transpose(1, 2).reshape(1, 16, 8, 8) + x)


@pytest.mark.parametrize("name,shape_in,shape_out,tokens", [
    ("latent-xl2-256", (2, 4, 32, 32), (2, 8, 32, 32), 256),
    ("latent-xl2-512", (2, 4, 64, 64), (2, 8, 64, 64), 1024),
])
def test_latent_shapes(name, shape_in, shape_out, tokens):
    """Spec §8.7 on the meta device (no memory): 256 tokens at 256 px, 1024 at 512 px."""
    with torch.device("meta"):
        m = build_model(name)
        out = m(torch.empty(shape_in), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == shape_out
    assert m.pos_embed.shape[1] == tokens
    assert m.blocks[0].attn.rel_index.shape == (tokens, tokens)


@pytest.mark.parametrize("name,expected", [("latent-xl2-256", 561_330_144), ("latent-xl2-512", 563_562_464)])
def test_parameter_counts(name, expected):
    """Spec §8.8: the released configuration's counts (the paper's Table 9 says 561M)."""
    with torch.device("meta"):
        n = count_parameters(build_model(name))
    assert n == expected
    assert abs(n - 561e6) / 561e6 < 1e-3 or name != "latent-xl2-256"   # the paper's 561M, within 0.1%


def test_dit_xl2_control_count():
    """The same counting on DiT-XL/2 (adaLN-Zero, 6x modulation, no TMSA) gives the published 675,129,632."""
    D, depth, p, heads = 1152, 28, 2, 16
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + (D * 6 * D + 6 * D)
    final = (D * 2 * D + 2 * D) + (D * p * p * 8 + p * p * 8)
    embed = (4 * p * p * D + D) + 256 * D + (256 * D + D + D * D + D) + 1001 * D
    assert embed + depth * block + final == 675_129_632
    # DiffiT's block swaps the 6D adaLN modulation for a 3D time projection and adds the bias table:
    diffit_block = block - (D * 6 * D + 6 * D) + (D * 3 * D + 3 * D) + 31 ** 2 * heads
    assert diffit_block == 19_935_760


def test_zero_initialised_latent_output():
    """Spec §8.9: a fresh latent model outputs exact zeros."""
    m = build_model("tiny-latent")
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 10]))
    assert out.shape == (2, 8, 8, 8) and torch.all(out == 0)


def test_image_space_shapes():
    """Spec §8.11: FFHQ-64 stages 64/32/16/8 with 128/256/256/256 channels; CIFAR-10 stages 32/16/8."""
    for name, sizes, widths in [("image-ffhq64", [64, 32, 16, 8], [128, 256, 256, 256]),
                                ("image-cifar10", [32, 16, 8], [128, 256, 256])]:
        with torch.device("meta"):
            m = build_model(name)
            seen = []
            hooks = [stage[-1].register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape[1:])))
                     for stage in m.encoder]
            tok = m.tokenizer(torch.empty(1, 3, sizes[0], sizes[0]))
            out = m(torch.empty(1, 3, sizes[0], sizes[0]), torch.zeros(1), torch.zeros(1, dtype=torch.long))
            for hk in hooks:
                hk.remove()
        assert tok.shape == (1, 128, sizes[0], sizes[0])
        assert seen == [(c, s, s) for c, s in zip(widths, sizes)]
        assert out.shape == (1, 3, sizes[0], sizes[0])


@pytest.mark.parametrize("name", ["tiny", "tiny-latent"])
def test_conditioning_changes_output_and_batch_is_independent(name):
    """Spec §8.12: t and y change the output; each sample in a batch is independent of the others."""
    m = randomize_zero_init_(build_model(name)).eval()
    c = m.cfg
    x = torch.randn(3, c.in_channels, c.image_size, c.image_size)
    t, y = torch.tensor([10.0, 400.0, 900.0]), torch.tensor([1, 2, c.null_label])
    out = m(x, t, y)
    assert (m(x, t + 50, y) - out).abs().max() > 1e-4
    assert (m(x, t, (y + 1) % (c.num_classes + 1)) - out).abs().max() > 1e-4
    assert (m(x * 1.1, t, y) - out).abs().max() > 1e-4
    single = torch.cat([m(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(single, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-latent"])
def test_gradients_reach_every_trainable_parameter(name):
    """Every trainable parameter gets a gradient, except the provably inert key-side time projection."""
    m = randomize_zero_init_(build_model(name))
    c = m.cfg
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size)
    m(x, torch.tensor([5.0, 600.0]), torch.tensor([0, 3])).square().mean().backward()
    for pname, p in m.named_parameters():
        if not p.requires_grad:
            assert pname == "pos_embed"
            continue
        g = p.grad
        assert g is not None, pname
        if pname.endswith("qkv_time.weight") or pname.endswith("qkv_time.bias"):
            C = g.shape[0] // 3
            assert g[C:2 * C].abs().max() < 1e-4 * g.abs().max(), pname
            assert g[:C].abs().max() > 0 and g[2 * C:].abs().max() > 0, pname
        else:
            assert g.abs().max() > 0, pname


def test_presets_and_config_round_trip():
    for name, p in PRESETS.items():
        d = p.model.to_dict()
        assert ModelConfig.from_dict(d) == p.model, name
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**PRESETS["tiny"].model.to_dict(), "bogus": 1})
    with torch.device("meta"):
        assert count_parameters(build_model("digits")) <= 3_000_000


def test_core_imports_do_not_import_torch():
    """`import diffit_port` (configs, presets, samplers, package reader, image grids) stays torch-free."""
    import subprocess
    import sys

    code = ("import sys, diffit_port, diffit_port.samplers, diffit_port.package, diffit_port.images; "
            "from diffit_port import PRESETS, get_preset; get_preset('digits'); "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
