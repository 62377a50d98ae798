"""The onnx-cuda graph variants: separate q/k/v MatMuls with the key's inert terms dropped and the attention alone in
float16 (on the CPU EP, against the shipped graph), the diffusion-UNet fusions (structure here; values on CUDA, gpu
mark)."""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.base import quiet_tool
from diffit_port.runtimes.onnx_cuda import prepare_cuda_model
from diffit_port.config import ModelConfig, get_preset
from diffit_port.runtimes.ort_graph import graph_op_counts, rewrite_to_mha
from diffit_port.runtimes.ort_windows import pack_windows, window_groups
from runtime_helpers import FP16_STEP_ATOL, STEP_ATOL, has_cuda_provider, package_path, step_inputs


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return lambda kind: package_path(kind, tmp_path_factory)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("kind", ["tiny", "tiny-latent"])
def test_separate_qkv_equals_the_shipped_graph(packages, kind):
    package = load_package(packages(kind))
    path = package.graph_path("denoiser")
    x, t, y = step_inputs(package)
    feeds = {"x": x, "t": t, "y": y}
    ref = _run(onnx.load(str(path)), feeds)
    separate = rewrite_to_mha(onnx.load(str(path)), qkv="separate")
    counts = graph_op_counts(separate)
    n = package.manifest["graphs"]["denoiser"]["custom_nodes"]
    assert counts["MultiHeadAttention"] == n and counts.get("Split", 0) == n   # only the (B, 2C) time split
    # the key's bias and time term are gone: its MatMul output feeds the attention directly
    mha = [nd for nd in separate.graph.node if nd.op_type == "MultiHeadAttention"]
    producers = {o: nd for nd in separate.graph.node for o in nd.output}
    assert all(producers[nd.input[1]].op_type == "MatMul" for nd in mha)
    fused = prepare_cuda_model(path, qkv="separate")
    errs = {"separate": float(np.abs(_run(separate, feeds) - ref).max()),
            "separate+fusions": float(np.abs(_run(fused, feeds) - ref).max())}
    print(f"\n{kind} separate q/k/v vs shipped graph: {errs}")
    assert max(errs.values()) <= 1e-5 and float(np.abs(ref).max()) > 0.1


@pytest.mark.parametrize("kind", ["tiny", "tiny-latent"])
def test_time_token_in_the_gemm_equals_the_shipped_graph(packages, kind):
    """qkv="separate-time": q and v come straight out of MatMuls over the one-hot-extended rows (no add after
    them), one one-hot per time input, and the step equals the shipped graph's for a batch of 3 (3 x 3 one-hot)."""
    package = load_package(packages(kind))
    path = package.graph_path("denoiser")
    x, t, y = step_inputs(package)
    feeds = {"x": x, "t": t, "y": y}
    shipped = onnx.load(str(path))
    ref = _run(shipped, feeds)
    time_inputs = {nd.input[1] for nd in shipped.graph.node if nd.op_type == "TimeTokenAttention"}
    model = rewrite_to_mha(onnx.load(str(path)), qkv="separate-time")
    producers = {o: nd for nd in model.graph.node for o in nd.output}
    mha = [nd for nd in model.graph.node if nd.op_type == "MultiHeadAttention"]
    assert len(mha) > len(time_inputs) and graph_op_counts(model)["EyeLike"] == len(time_inputs)
    for nd in mha:
        q, k, v = (producers[i] for i in nd.input[:3])
        assert q.op_type == v.op_type == k.op_type == "MatMul" and q.input[0] == v.input[0] != k.input[0]
        assert producers[q.input[0]].op_type == "Concat" and producers[q.input[1]].op_type == "Concat"
    errs = {"rewrite": float(np.abs(_run(model, feeds) - ref).max()),
            "+fusions, folds": float(np.abs(_run(prepare_cuda_model(path, qkv="separate-time", fold_biases=True),
                                                 feeds) - ref).max())}
    print(f"\n{kind} time token in the q/v GEMMs vs shipped graph: {errs}")
    assert max(errs.values()) <= 1e-5 and float(np.abs(ref).max()) > 0.1
    assert np.abs(_run(prepare_cuda_model(path, qkv="separate-time", fp16=True), feeds) - ref).max() <= FP16_STEP_ATOL


@pytest.mark.parametrize("kind", ["tiny", "tiny-latent"])
def test_attention_in_fp16_on_the_cpu_ep(packages, kind):
    """attention_fp16: every MultiHeadAttention reads float16 q, k, v and bias and its output is cast back; the
    step stays within the fp16 bound of the shipped graph and does differ from it (the float16 path is used)."""
    package = load_package(packages(kind))
    path = package.graph_path("denoiser")
    x, t, y = step_inputs(package)
    feeds = {"x": x, "t": t, "y": y}
    ref = _run(onnx.load(str(path)), feeds)
    model = prepare_cuda_model(path, qkv="separate", attention_fp16=True)
    producers = {o: nd for nd in model.graph.node for o in nd.output}
    consumers = {i: nd for nd in model.graph.node for i in nd.input}
    mha = [nd for nd in model.graph.node if nd.op_type == "MultiHeadAttention"]
    assert len(mha) == package.manifest["graphs"]["denoiser"]["custom_nodes"]
    for nd in mha:
        cast_in = [producers[nd.input[i]] for i in (0, 1, 2, 5)]
        assert all(c.op_type == "Cast" and c.attribute[0].i == onnx.TensorProto.FLOAT16 for c in cast_in)
        out = consumers[nd.output[0]]
        assert out.op_type == "Cast" and out.attribute[0].i == onnx.TensorProto.FLOAT
    err = float(np.abs(_run(model, feeds) - ref).max())
    err32 = float(np.abs(_run(prepare_cuda_model(path, qkv="separate"), feeds) - ref).max())
    print(f"\n{kind} attention in fp16 vs shipped graph: {err:.2e} (all fp32: {err32:.2e})")
    assert 2 * err32 < err <= FP16_STEP_ATOL and float(np.abs(ref).max()) > 0.1


def test_window_groups_fill_a_64_row_tile_and_divide_every_stage():
    assert window_groups(get_preset("image-cifar10").model) == {16: 4}      # 4x4 windows at 32, 16 and 8
    assert window_groups(get_preset("digits").model) == {}                  # 8x8 windows fill the tile already
    assert window_groups(get_preset("image-ffhq64").model) == {}
    assert window_groups(get_preset("latent-xl2-256").model) == {}
    odd = ModelConfig(kind="image", image_size=24, in_channels=1, channels=(16, 32), blocks=(1, 1), window_size=4,
                      head_dim=8, gn_groups=8)                                           # 36 windows at 24, 9 at 12
    assert window_groups(odd) == {}
    assert window_groups(dataclasses.replace(odd, image_size=48)) == {16: 4}   # 144 and 36 windows
    assert window_groups(dataclasses.replace(odd, image_size=48), tile=32) == {16: 2}


@pytest.mark.parametrize("qkv", ["split", "separate"])
def test_packed_windows_equal_the_shipped_graph(packages, qkv):
    """pack_windows: four 16-token windows per attention sequence with a block-diagonal bias give the shipped
    graph's step (CPU EP); each packed node reads a (1, h, 64, 64) bias whose off-diagonal blocks are masked."""
    package = load_package(packages("tiny"))
    path = package.graph_path("denoiser")
    x, t, y = step_inputs(package)
    feeds = {"x": x, "t": t, "y": y}
    ref = _run(onnx.load(str(path)), feeds)
    groups = window_groups(package.model)
    assert groups == {16: 4}
    model = prepare_cuda_model(path, qkv=qkv, pack=tuple(groups.items()))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    mha = [nd for nd in model.graph.node if nd.op_type == "MultiHeadAttention"]
    assert len(mha) == package.manifest["graphs"]["denoiser"]["custom_nodes"]
    for nd in mha:
        bias = inits[nd.input[5]]
        assert bias.shape[2:] == (64, 64)
        assert (bias[:, :, :16, 16:] == -10000.0).all() and (bias[:, :, 16:32, 16:32] == bias[:, :, :16, :16]).all()
    assert graph_op_counts(model).get("Unsqueeze", 0) < graph_op_counts(prepare_cuda_model(path, qkv=qkv))["Unsqueeze"]
    err = float(np.abs(_run(model, feeds) - ref).max())
    print(f"\npacked windows ({qkv}) vs shipped graph: {err:.2e}")
    assert err <= 1e-5 and float(np.abs(ref).max()) > 0.1


def test_pack_windows_checks_its_arguments(packages):
    path = load_package(packages("tiny")).graph_path("denoiser")
    with pytest.raises(ValueError, match="needs the MultiHeadAttention rewrite"):
        prepare_cuda_model(path, mha=False, pack=((16, 4),))
    with pytest.raises(ValueError, match="groups must be >= 1"):
        pack_windows(rewrite_to_mha(onnx.load(str(path))), {16: 0})
    masked = rewrite_to_mha(onnx.load(str(path)))
    node = next(nd for nd in masked.graph.node if nd.op_type == "MultiHeadAttention")
    node.input[4] = "key_padding_mask"     # packing would mix windows' masks: that node is left alone
    counts = graph_op_counts(pack_windows(masked, {16: 4}))
    assert counts["Reshape"] == graph_op_counts(rewrite_to_mha(onnx.load(str(path))))["Reshape"] + 4 * (
        counts["MultiHeadAttention"] - 1)


def test_separate_qkv_needs_constant_weights(packages):
    model = onnx.load(str(load_package(packages("tiny")).graph_path("denoiser")))
    node = next(nd for nd in model.graph.node if nd.op_type == "TimeTokenAttention")
    name = node.input[2]
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(init.dims)))
    with pytest.raises(ValueError, match="needs constant TMSA weights"):
        rewrite_to_mha(model, qkv="separate")
    with pytest.raises(ValueError, match="qkv must be"):
        rewrite_to_mha(model, qkv="packed")


def test_unet_fusions_make_nhwc_convs_and_fused_groupnorm_silu(packages):
    """onnxruntime's diffusion-UNet fusions match the exporter's GroupNorm lowering (Reshape,
    InstanceNormalization, Reshape, Mul, Add, Sigmoid, Mul): every GroupNorm+SiLU becomes one node."""
    package = load_package(packages("tiny"))
    shipped = graph_op_counts(onnx.inliner.inline_local_functions(onnx.load(str(package.graph_path()))))
    fused = graph_op_counts(prepare_cuda_model(package.graph_path(), fusions="unet"))
    groupnorms = fused.get("GroupNorm", 0) + fused.get("SkipGroupNorm", 0)
    assert shipped["InstanceNormalization"] == groupnorms > 0 and "InstanceNormalization" not in fused
    assert fused["NhwcConv"] == shipped["Conv"]
    half = graph_op_counts(prepare_cuda_model(package.graph_path(), fusions="unet", fp16=True))
    assert half.get("GroupNorm", 0) + half.get("SkipGroupNorm", 0) == groupnorms


def test_graph_preparation_writes_nothing(capfd, caplog):
    """onnxruntime's transformer tools (1.31, 1.32) print a failed symbolic shape inference while they convert the
    shipped digits graph to fp16 after the unet fusions (diffit-run --fastest) and draw a "fusion" progress bar on
    stderr; stdout is diffit-run's for its one summary line, stderr its own progress bar, and their warning (file an
    issue) is noise to a user."""
    prepare_cuda_model(default_package_path() / "denoiser.onnx", fusions="unet", qkv="separate", fp16=True)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    # nor the converter's request to file an issue about the shape inference it then goes on without
    assert not [r for r in caplog.records if r.name.startswith("onnxruntime.transformers")], caplog.records


def test_held_tool_output_shows_only_when_the_tool_fails(capfd):
    """quiet_tool(hold=True): what a tool prints to stdout and stderr is dropped when it succeeds, and written to
    stderr, before its exception, when it fails."""
    def tool(fail: bool) -> None:
        print("tool says hello")
        sys.stderr.write("tool bar 100%\n")
        if fail:
            raise RuntimeError("tool failed")

    with quiet_tool("some.tool", logging.ERROR, hold=True):
        tool(fail=False)
    assert capfd.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="tool failed"), quiet_tool("some.tool", logging.ERROR, hold=True):
        tool(fail=True)
    out, err = capfd.readouterr()
    assert out == "" and err == "tool says hello\ntool bar 100%\n", (out, err)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
@pytest.mark.parametrize("opts", [dict(fusions="unet"), dict(qkv="separate"),
                                  dict(provider_options={"prefer_nhwc": "1"}),
                                  dict(fusions="unet", qkv="separate", cuda_graph=True),
                                  dict(fusions="unet", qkv="separate", cuda_graph=True,
                                       provider_options={"cudnn_conv_algo_search": "HEURISTIC"}),
                                  dict(fusions="unet", qkv="separate", cuda_graph=True, pack_windows=False)])
def test_cuda_graph_variants_match_torch(packages, opts):
    package = load_package(packages("tiny"))
    x, t, y = step_inputs(package)
    ref = create_denoiser("torch", package)(x, t, y)
    out = create_denoiser("onnx-cuda", package, **opts)(x, t, y)
    assert float(np.abs(out - ref).max()) <= STEP_ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
def test_time_token_in_the_gemm_on_cuda(packages):
    """qkv="separate-time" on the CUDA EP (its one-hot ops all have CUDA kernels, so CUDA graphs capture it):
    fp32 within the step bound of torch fp32, fp16 within the float16 one, at two batch sizes of one session."""
    package = load_package(packages("tiny-latent"))
    x, t, y = step_inputs(package)
    ref = create_denoiser("torch", package)
    for opts, atol in ((dict(qkv="separate-time", cuda_graph=True), STEP_ATOL),
                       (dict(qkv="separate-time", cuda_graph=True, precision="fp16"), FP16_STEP_ATOL)):
        d = create_denoiser("onnx-cuda", package, **opts)
        for rows in (len(x), 1):
            assert float(np.abs(d(x[:rows], t[:rows], y[:rows]) - ref(x[:rows], t[:rows], y[:rows])).max()) <= atol


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
def test_reduced_precision_variants_on_cuda(packages):
    """The graphs with float16 in them, against torch fp32 on CUDA: the fp32 graph with the attention alone in
    float16 and the fp16 graph with either convolution algorithm search stay within the float16 step bound;
    the fp16-attention graph is closer to fp32 than the full fp16 graph and farther than the fp32 graph."""
    package = load_package(packages("tiny"))
    x, t, y = step_inputs(package)
    ref = create_denoiser("torch", package)(x, t, y)
    unet = dict(fusions="unet", qkv="separate", cuda_graph=True)
    variants = {"fp32": unet, "fp16 attention": dict(unet, attention_fp16=True),
                "fp16 exhaustive conv": dict(unet, precision="fp16",
                                             provider_options={"cudnn_conv_algo_search": "EXHAUSTIVE"}),
                "fp16": dict(unet, precision="fp16"),   # (cuDNN's heuristic convolution algorithms: the default)
                "fp16 unpacked": dict(unet, precision="fp16", pack_windows=False)}
    graphs = {k: {} for k in variants}     # each variant's prepared graph, to see what the defaults did
    denoisers = {k: create_denoiser("onnx-cuda", package, prepared_cache=graphs[k], **o) for k, o in variants.items()}
    packed = {k: sum(i.name.endswith("/packed_bias") for m in g.values() for i in m.graph.initializer)
              for k, g in graphs.items()}
    mha = package.manifest["graphs"]["denoiser"]["custom_nodes"]
    assert packed == {**{k: mha for k in variants}, "fp16 unpacked": 0}    # packing is on by default
    options = {k: d.session.get_provider_options()["CUDAExecutionProvider"] for k, d in denoisers.items()}
    searches = {k: o["cudnn_conv_algo_search"] for k, o in options.items()}
    assert searches == {"fp32": "EXHAUSTIVE", "fp16 attention": "EXHAUSTIVE", "fp16 exhaustive conv": "EXHAUSTIVE",
                        "fp16": "HEURISTIC", "fp16 unpacked": "HEURISTIC"}
    kernels = {k: o.get("sdpa_kernel") for k, o in options.items()}
    assert kernels["fp16"] == kernels["fp16 unpacked"] == "18" and kernels["fp32"] != "18"   # memory-efficient
    errs = {k: float(np.abs(d(x, t, y) - ref).max()) for k, d in denoisers.items()}
    print(f"\nreduced-precision variants vs torch fp32 on CUDA (max|diff|): {errs}")
    assert max(errs.values()) <= FP16_STEP_ATOL
    fp16 = min(errs["fp16"], errs["fp16 exhaustive conv"], errs["fp16 unpacked"])
    assert errs["fp32"] < errs["fp16 attention"] < fp16


def _digits_feeds(package, batch: int = 4) -> dict[str, np.ndarray]:
    """Inputs of the embedded digits package (trained: every bias the folds move is nonzero)."""
    rng = np.random.default_rng(0)
    shape = (batch, package.model.in_channels, package.model.image_size, package.model.image_size)
    return {"x": rng.standard_normal(shape).astype(np.float32),
            "sigma": np.geomspace(0.05, 60.0, batch).astype(np.float32),
            "y": np.arange(batch, dtype=np.int64) % (package.model.num_classes + 1)}


def test_conv_bias_folded_into_the_norm_equals_the_shipped_graph():
    """fold_biases on the transformer-fused graph (CPU EP): every ResBlock convolution hands its bias to the
    LayerNorm after the window partition, which becomes a SkipLayerNormalization with a broadcast zero skip,
    and the residual reads its sum output; the step equals the shipped graph's."""
    package = load_package(default_package_path())
    path = package.graph_path("denoiser")
    feeds = _digits_feeds(package)
    ref = _run(onnx.load(str(path)), feeds)
    plain = prepare_cuda_model(path, qkv="separate")
    folded = prepare_cuda_model(path, qkv="separate", fold_biases=True)
    before, after = graph_op_counts(plain), graph_op_counts(folded)
    blocks = before["LayerNormalization"]
    assert blocks == package.manifest["graphs"]["denoiser"]["custom_nodes"] > 0
    assert "LayerNormalization" not in after
    assert after["SkipLayerNormalization"] == before["SkipLayerNormalization"] + blocks
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert sum(len(n.input) == 2 for n in convs) == blocks       # the others keep their biases
    skips = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer if t.name.endswith("/zero_skip")}
    assert len(skips) == blocks and all(s.ndim == 2 and not s.any() for s in skips.values())
    err = float(np.abs(_run(folded, feeds) - ref).max())
    print(f"\nconv bias folded into the norm vs shipped graph: {err:.2e}")
    assert err <= 1e-5 and float(np.abs(ref).max()) > 0.5


def test_unet_bias_folds_structure():
    """With the diffusion-UNet fusions the MLP biases move too: into every FastGelu, and the second Linear's
    into the SkipGroupNorm that reads the block after the window merge, as does the bias of an up convolution
    that a SkipGroupNorm reads (values: the gpu test below)."""
    from diffit_port.runtimes.ort_folds import fold_biases

    path = load_package(default_package_path()).graph_path("denoiser")
    plain = prepare_cuda_model(path, qkv="separate", fusions="unet")
    before = graph_op_counts(plain)
    folded = prepare_cuda_model(path, qkv="separate", fusions="unet")
    folds = fold_biases(folded)
    after = graph_op_counts(folded)
    gelus = [n for n in folded.graph.node if n.op_type == "FastGelu"]
    assert folds["fastgelu"] == len(gelus) > 0 and all(len(n.input) == 2 for n in gelus)
    assert folds["conv_layernorm"] == before["LayerNormalization"] > 0 and after.get("LayerNormalization", 0) == 0
    assert folds["skip_group_norm"] > 0 and folds["conv_skip_group_norm"] > 0
    with_bias = sum(n.op_type == "SkipGroupNorm" and len(n.input) == 5 for n in folded.graph.node)
    assert with_bias == folds["skip_group_norm"] + folds["conv_skip_group_norm"]
    assert after["SkipGroupNorm"] == before["SkipGroupNorm"]
    assert before["Add"] - after["Add"] == folds["fastgelu"] + folds["skip_group_norm"]
    biased = sum(len(n.input) == 3 for n in folded.graph.node if n.op_type == "NhwcConv")
    assert biased == before["NhwcConv"] - folds["conv_layernorm"] - folds["conv_skip_group_norm"]
    with pytest.raises(ValueError, match="fusions"):
        prepare_cuda_model(path, fusions=False, fold_biases=True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_provider(), reason="onnxruntime has no CUDAExecutionProvider (GPU host only)")
def test_bias_folds_match_the_unfolded_graph_on_cuda():
    """The folded unet graph of the trained digits package (the default) against the unfolded one and torch fp32,
    on CUDA; the prepared graphs show which is which."""
    package = load_package(default_package_path())
    feeds = _digits_feeds(package)
    x, t, y = feeds["x"], feeds["sigma"], feeds["y"]
    ref = create_denoiser("torch", package)(x, t, y)
    unet = dict(fusions="unet", qkv="separate")
    variants = {"fp32": dict(unet, fold_biases=False), "fp32 folded": unet,
                "fp16": dict(unet, precision="fp16", fold_biases=False),
                "fp16 folded": dict(unet, precision="fp16")}
    errs, skips = {}, {}
    for label, opts in variants.items():
        graphs: dict = {}
        errs[label] = float(np.abs(create_denoiser("onnx-cuda", package, prepared_cache=graphs, **opts)(x, t, y)
                                   - ref).max())
        skips[label] = sum(i.name.endswith("/zero_skip") for m in graphs.values() for i in m.graph.initializer)
    print(f"\nbias folds vs torch fp32 on CUDA (max|diff|): {errs}")
    blocks = package.manifest["graphs"]["denoiser"]["custom_nodes"]
    assert skips == {"fp32": 0, "fp32 folded": blocks, "fp16": 0, "fp16 folded": blocks}
    assert errs["fp32 folded"] <= STEP_ATOL and errs["fp16 folded"] <= FP16_STEP_ATOL
    assert errs["fp16 folded"] <= 2 * errs["fp16"] + 1e-3
