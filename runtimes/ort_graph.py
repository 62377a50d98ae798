"""Load-time graph rewrites for ONNX Runtime: the custom TMSA node -> com.microsoft.MultiHeadAttention,
onnxruntime's transformer fusions, and the fp16 conversion. All in memory; the package is never written.
The rewrites change the ModelProto they are given (no copies of multi-GB weights): hand them a model you
own, as prepare_cuda_model does with the one it loads."""

from __future__ import annotations

import itertools
import logging
from typing import Any, ContextManager

import numpy as np
import onnx
from onnx import helper, numpy_helper

from diffit_port.package import CUSTOM_DOMAIN, CUSTOM_OP

from .base import quiet_tool

MS_DOMAIN = "com.microsoft"
QKV_MODES = ("split", "separate", "separate-time")    # rewrite_to_mha's ways of computing q, k and v
MAX_IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; the onnxruntime releases we target read <= 10 safely


def _opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    raise ValueError(f"model imports no opset for domain {domain!r}")


def count_custom_nodes(model: onnx.ModelProto) -> int:
    return sum(n.domain == CUSTOM_DOMAIN and n.op_type == CUSTOM_OP for n in model.graph.node)


def rewrite_to_mha(model: onnx.ModelProto, qkv: str = "split") -> onnx.ModelProto:
    """Replace, IN PLACE, every TimeTokenAttention node of `model` by standard ops around one
    com.microsoft.MultiHeadAttention (works on the CPU and CUDA providers); returns `model` itself.
    Pass a copy (or a freshly loaded model) to keep the original: no copy is made here, since the
    weights of a large graph would be duplicated.

        time = Unsqueeze(MatMul(t_emb, w_time) + b_qkv, 1)        # (B, 1, 3C): per-sample, so not MHA's bias
        q, k, v = Split(MatMul(x, w_qkv) + time, 3, axis=-1)       # (B, N, C) each; heads split as (h, d)
        out = MultiHeadAttention(q, k, v, attention_bias=Unsqueeze(rel_bias, 0), num_heads=h)

    qkv="separate" (needs w_qkv, w_time and b_qkv as initializers) computes q, k and v with three MatMuls
    and drops the key's bias and time term: q . (k + c) = q . k + q . c shifts every logit of a query by the
    same amount, which the softmax removes exactly; no Split copy and 2C instead of 3C per-sample adds:

        q = MatMul(x, w_q) + Unsqueeze(MatMul(t_emb, w_tq) + b_q, 1); k = MatMul(x, w_k)
        v = MatMul(x, w_v) + Unsqueeze(MatMul(t_emb, w_tv) + b_v, 1)

    qkv="separate-time" is "separate" with the time token inside the q and v MatMuls instead of a broadcast add
    after each: the rows of x get a one-hot of their sample appended and the weights the per-sample time rows,
    so (x | e_b) @ (w_q ; T_q) = x w_q + T_q[b] comes out of the GEMM. The add read and wrote the whole
    (B, N, C) output once more; the GEMM's K grows by B instead, which pays while B is small against C (latent
    models; E is made once per time input):

        T_q, T_v = Split(MatMul(t_emb, w_tqv) + b_qv); x1 = Concat(x, E, -1), E = Expand(eye(B)[:, None], (B, N, B))
        q = MatMul(x1, Concat(w_q, T_q, axis=0)); k = MatMul(x, w_k); v = MatMul(x1, Concat(w_v, T_v, axis=0))

    MHA's default scale is 1/sqrt(C/h), the op's. The model-local function and the custom-domain
    import are dropped when no node uses them any more. The IR version is left alone (prepare_cuda_model
    caps it once, after every rewrite).
    """
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv must be one of {', '.join(map(repr, QKV_MODES))}, got {qkv!r}")
    graph = model.graph
    opset = _opset_version(model)
    inits = {t.name: t for t in graph.initializer} if qkv != "split" else {}
    onehots: dict[str, str] | None = {} if qkv == "separate-time" else None
    names = (f"tmsa_mha_{i}" for i in itertools.count())
    axes_1 = numpy_helper.from_array(np.array([1], dtype=np.int64), "tmsa_mha_axes_1")
    axes_0 = numpy_helper.from_array(np.array([0], dtype=np.int64), "tmsa_mha_axes_0")
    used_axes = False
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not (node.domain == CUSTOM_DOMAIN and node.op_type == CUSTOM_OP):
            new_nodes.append(node)
            continue
        if len(node.input) != 6 or len(node.output) != 1:
            raise ValueError(f"{CUSTOM_OP} node {node.name!r} has {len(node.input)} inputs, expected 6")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "num_heads" not in attrs:
            raise ValueError(f"{CUSTOM_OP} node {node.name!r} has no num_heads attribute")
        base, heads = next(names), int(attrs["num_heads"])
        used_axes = True
        if qkv != "split":
            new_nodes += _separate_qkv_nodes(graph, inits, node, base, heads, axes_1.name, axes_0.name, opset, onehots)
        else:
            new_nodes += _split_qkv_nodes(node, base, heads, axes_1.name, axes_0.name, opset)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if inits:   # qkv="separate" sliced the stacked weights: drop the originals nothing reads any more
        read = {i for nd in graph.node for i in nd.input}
        stale = [t for t in graph.initializer if t.name in inits and t.name not in read]
        for t in stale:
            graph.initializer.remove(t)
    if used_axes:
        graph.initializer.extend([axes_1, axes_0])
    if count_custom_nodes(model) == 0:
        _drop_custom_function(model)
    return imports_ms_domain(model)


def _split_qkv_nodes(node: onnx.NodeProto, base: str, heads: int, axes_1: str, axes_0: str,
                     opset: int) -> list[onnx.NodeProto]:
    """rewrite_to_mha's default form of one TimeTokenAttention `node`: one q/k/v product plus the time token, split
    in three, into MultiHeadAttention with the relative-position bias (node names prefixed `base`)."""
    x, t_emb, w_qkv, w_time, b_qkv, rel_bias = node.input
    t_proj, t_bias, t_tok, xw, packed = (f"{base}/{s}" for s in ("t_proj", "t_bias", "t_tok", "xw", "qkv"))
    q, k, v, bias4 = (f"{base}/{s}" for s in ("q", "k", "v", "bias4"))
    split_kw: dict[str, Any] = {"num_outputs": 3} if opset >= 18 else {}
    return [
        helper.make_node("MatMul", [t_emb, w_time], [t_proj], name=f"{base}/MatMul_t"),
        helper.make_node("Add", [t_proj, b_qkv], [t_bias], name=f"{base}/Add_b"),
        helper.make_node("Unsqueeze", [t_bias, axes_1], [t_tok], name=f"{base}/Unsqueeze_t"),
        helper.make_node("MatMul", [x, w_qkv], [xw], name=f"{base}/MatMul_x"),
        helper.make_node("Add", [xw, t_tok], [packed], name=f"{base}/Add_t"),
        helper.make_node("Split", [packed], [q, k, v], name=f"{base}/Split", axis=-1, **split_kw),
        helper.make_node("Unsqueeze", [rel_bias, axes_0], [bias4], name=f"{base}/Unsqueeze_bias"),
        # inputs: query, key, value, bias, key_padding_mask, attention_bias
        helper.make_node("MultiHeadAttention", [q, k, v, "", "", bias4], [node.output[0]],
                         name=f"{base}/MultiHeadAttention", domain=MS_DOMAIN, num_heads=heads),
    ]


def _drop_custom_function(model: onnx.ModelProto) -> None:
    """IN PLACE: remove the TimeTokenAttention function, and the custom domain's import where nothing uses it."""
    keep = [f for f in model.functions if not (f.domain == CUSTOM_DOMAIN and f.name == CUSTOM_OP)]
    del model.functions[:]
    model.functions.extend(keep)
    if not (any(n.domain == CUSTOM_DOMAIN for n in model.graph.node) or any(f.domain == CUSTOM_DOMAIN for f in keep)):
        imports = [i for i in model.opset_import if i.domain != CUSTOM_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)


def imports_ms_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """IN PLACE: import the com.microsoft opset into `model` if it does not yet (its contrib nodes need it for
    onnx's shape inference, which onnxruntime's quantizer runs); returns `model` itself."""
    if not any(i.domain == MS_DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _separate_qkv_nodes(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], node: onnx.NodeProto,
                        base: str, heads: int, axes_1: str, axes_0: str, opset: int,
                        onehots: dict[str, str] | None = None) -> list[onnx.NodeProto]:
    """The nodes of one TMSA node for rewrite_to_mha(qkv="separate"); adds the sliced weights to `graph`. With
    `onehots` (qkv="separate-time": t_emb -> its (B, N, B) one-hot, shared by the nodes of one t_emb) the
    time token goes into the q and v MatMuls."""
    x, t_emb, w_qkv, w_time, b_qkv, rel_bias = node.input
    missing = [n for n in (w_qkv, w_time, b_qkv) if n not in inits]
    if missing:
        raise ValueError(f"qkv='separate' needs constant TMSA weights; {missing} of {node.name!r} are computed")
    w, wt, b = (numpy_helper.to_array(inits[n]) for n in (w_qkv, w_time, b_qkv))
    c = w.shape[0]
    # q|k|v stacked along the last axis (attention.time_token_attention); the time rows of q and v in one MatMul
    parts = {"w_q": w[:, :c], "w_k": w[:, c:2 * c], "w_v": w[:, 2 * c:],
             "w_tqv": np.concatenate([wt[:, :c], wt[:, 2 * c:]], axis=1), "b_qv": np.concatenate([b[:c], b[2 * c:]])}
    names = {k: f"{base}/{k}" for k in parts}
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), names[k]) for k, v in parts.items())
    o = {s: f"{base}/{s}" for s in ("t_qv", "t_qv_b", "t_qv_tok", "t_q", "t_v", "xq", "xv", "q", "k", "v", "bias4")}
    split = {"num_outputs": 2} if opset >= 18 else {}
    nodes = [helper.make_node("MatMul", [t_emb, names["w_tqv"]], [o["t_qv"]], name=f"{base}/MatMul_t"),
             helper.make_node("Add", [o["t_qv"], names["b_qv"]], [o["t_qv_b"]], name=f"{base}/Add_b")]
    if onehots is None:
        nodes += [
            helper.make_node("Unsqueeze", [o["t_qv_b"], axes_1], [o["t_qv_tok"]], name=f"{base}/Unsqueeze_t"),
            helper.make_node("Split", [o["t_qv_tok"]], [o["t_q"], o["t_v"]], name=f"{base}/Split_t", axis=-1, **split),
            helper.make_node("MatMul", [x, names["w_q"]], [o["xq"]], name=f"{base}/MatMul_q"),
            helper.make_node("Add", [o["xq"], o["t_q"]], [o["q"]], name=f"{base}/Add_q"),
            helper.make_node("MatMul", [x, names["w_v"]], [o["xv"]], name=f"{base}/MatMul_v"),
            helper.make_node("Add", [o["xv"], o["t_v"]], [o["v"]], name=f"{base}/Add_v")]
    else:
        nodes += [helper.make_node("Split", [o["t_qv_b"]], [o["t_q"], o["t_v"]], name=f"{base}/Split_t", axis=-1,
                                   **split)]
        nodes += _time_in_gemm_nodes(x, t_emb, base, names, o, onehots, axes_1)
    return nodes + [
        helper.make_node("MatMul", [x, names["w_k"]], [o["k"]], name=f"{base}/MatMul_k"),
        helper.make_node("Unsqueeze", [rel_bias, axes_0], [o["bias4"]], name=f"{base}/Unsqueeze_bias"),
        helper.make_node("MultiHeadAttention", [o["q"], o["k"], o["v"], "", "", o["bias4"]], [node.output[0]],
                         name=f"{base}/MultiHeadAttention", domain=MS_DOMAIN, num_heads=heads),
    ]


def _time_in_gemm_nodes(x: str, t_emb: str, base: str, names: dict[str, str], o: dict[str, str],
                        onehots: dict[str, str], axes_1: str) -> list[onnx.NodeProto]:
    """q and v (o["q"], o["v"]) as MatMuls of x's rows extended by their sample's one-hot with the weights
    extended by the per-sample time rows o["t_q"], o["t_v"] (B, C); the one-hot of t_emb is made here the first
    time (`onehots`)."""
    nodes = []
    if t_emb not in onehots:   # one (B, N, B) one-hot for every node of this time input (N: the first's)
        onehots[t_emb] = f"{base}/onehot"
        nodes += _onehot_nodes(x, onehots[t_emb], f"{base}/onehot", axes_1)
    x1 = f"{base}/x_onehot"    # (a node with another N would fail in this Concat, loudly)
    nodes.append(helper.make_node("Concat", [x, onehots[t_emb]], [x1], name=f"{x1}/Concat", axis=-1))
    for s in ("q", "v"):       # (C + B, C): the weights, then each sample's time row
        nodes += [helper.make_node("Concat", [names[f"w_{s}"], o[f"t_{s}"]], [f"{base}/w{s}_t"],
                                   name=f"{base}/Concat_w{s}", axis=0),
                  helper.make_node("MatMul", [x1, f"{base}/w{s}_t"], [o[s]], name=f"{base}/MatMul_{s}")]
    return nodes


def _onehot_nodes(x: str, out: str, prefix: str, axes_1: str) -> list[onnx.NodeProto]:
    """`out` = (B, N, B) in the dtype of `x` (B, N, C): row (b, n) is the one-hot of b. From ops the CUDA EP runs
    in every precision: an int64 EyeLike of a (B, B) ConstantOfShape, cast like `x` (the fp16 conversion leaves
    both int64 ops alone and the CastLike follows x), expanded over the tokens."""
    p = prefix
    return [helper.make_node("Shape", [x], [f"{p}/b"], name=f"{p}/Shape", end=1),
            helper.make_node("Shape", [x], [f"{p}/bn"], name=f"{p}/Shape_bn", end=2),
            helper.make_node("Concat", [f"{p}/b", f"{p}/b"], [f"{p}/bb"], name=f"{p}/Concat", axis=0),
            helper.make_node("Concat", [f"{p}/bn", f"{p}/b"], [f"{p}/bnb"], name=f"{p}/Concat_bnb", axis=0),
            helper.make_node("ConstantOfShape", [f"{p}/bb"], [f"{p}/zeros"], name=f"{p}/ConstantOfShape",
                             value=numpy_helper.from_array(np.array([0], np.int64))),
            helper.make_node("EyeLike", [f"{p}/zeros"], [f"{p}/eye"], name=f"{p}/EyeLike"),
            helper.make_node("CastLike", [f"{p}/eye", x], [f"{p}/eye_x"], name=f"{p}/CastLike"),
            helper.make_node("Unsqueeze", [f"{p}/eye_x", axes_1], [f"{p}/eye_1"], name=f"{p}/Unsqueeze"),
            helper.make_node("Expand", [f"{p}/eye_1", f"{p}/bnb"], [out], name=f"{p}/Expand")]


def _quiet_ort_tools() -> ContextManager[None]:
    """Around onnxruntime's transformer tools (about a second on the image presets). They print to stdout a failed
    symbolic shape inference (e.g. in the fp16 conversion of the shipped digits graph after the unet fusions), their
    unet optimizer draws a "fusion" progress bar on stderr, and their converter logs a warning asking to file an
    issue, then goes on without the shape inference (the converted graphs are checked by the fp16 parity tests):
    all of it is held back, and shown on stderr only if a tool fails."""
    return quiet_tool("onnxruntime.transformers.onnx_model", logging.ERROR, hold=True)


def fuse_transformer_ops(model: onnx.ModelProto, *, use_gpu: bool = True, model_type: str = "bert",
                         num_heads: int = 0, hidden_size: int = 0) -> onnx.ModelProto:
    """onnxruntime's transformer fusions (SkipLayerNormalization, FastGelu, BiasAdd, ...) where the
    patterns match; opt_level=0 so onnxruntime's own graph optimizer still runs at session load.
    Attention fusion is off: after `rewrite_to_mha` the attention already is MultiHeadAttention (and the
    optimizer does not recognise the function body). "bert" and "vit" give the same graph here.
    Works on `model` IN PLACE (onnxruntime's optimizer wraps the proto it is given, it does not copy it);
    use the returned model."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.enable_attention = False
    return _fused(_explicit_layernorm_bias(model), options, model_type=model_type, num_heads=num_heads,
                  hidden_size=hidden_size, use_gpu=use_gpu)


def fuse_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's GELU fusions alone: each tanh GELU, with the bias add before it, as one com.microsoft.FastGelu.
    The graph onnx-cpu runs: on the CPU it gets what the transformer fusions gave a digits call, without their
    SkipLayerNormalization, whose CPU kernel took 3-4 times a LayerNormalization and an add on the same rows
    (docs/BENCHMARKS_CPU.md); and without their shape inference, in 0.07 s instead of 0.5-1.1 s at load. Works on
    `model` IN PLACE; use the returned model."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    for name in vars(options):
        if name.startswith("enable_"):
            setattr(options, name, name in ("enable_gelu", "enable_bias_gelu", "enable_gelu_approximation"))
    return _fused(model, options, model_type="bert", use_gpu=False)


def _fused(model: onnx.ModelProto, options: Any, **kwargs: Any) -> onnx.ModelProto:
    """onnxruntime's transformer optimizer on `model` (IN PLACE) with fusion `options`, opt_level=0 (onnxruntime's own
    graph optimizer still runs at session load), its output held back (_quiet_ort_tools); the result imports the
    com.microsoft opset."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_ort_tools():
        opt = optimize_model(model, optimization_options=options, opt_level=0, **kwargs)
    return imports_ms_domain(opt.model)


def _explicit_layernorm_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every LayerNormalization of `model` without its optional bias input an explicit zero bias, IN
    PLACE (the affine-free LayerNorms of DiffiT export that way); onnxruntime's SkipLayerNormalization
    fusion indexes the bias input unconditionally and fails without it. The values do not change.
    Returns `model` itself."""
    inits = {t.name: t for t in model.graph.initializer}
    made: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        scale = inits.get(node.input[1])
        if scale is None:
            continue  # a computed scale: leave the node alone (the fusion then skips nothing it can't see)
        if scale.name not in made:
            zero = numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), f"{scale.name}/zero_bias")
            model.graph.initializer.append(zero)
            made[scale.name] = zero.name
        node.input.append(made[scale.name])
    return model


def attention_in_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """IN PLACE: run every com.microsoft.MultiHeadAttention of a float32 `model` in float16 (Casts of its query,
    key, value and attention bias to float16, of its output back to float32); returns `model` itself.

    On the CUDA EP float32 attention over short sequences (the image models' 64-token windows) takes the unfused
    path: q, k and v are transposed to BNSH, the logits are written out, softmaxed and read back, and the result
    transposed again. Float16 admits the fused kernels (memory-efficient, cuDNN), which read BSNH directly and
    keep the logits on chip; the rest of the graph keeps its precision (fp32 or TF32)."""
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        for i, name in enumerate(node.input):
            if name and i in (0, 1, 2, 5):    # query, key, value, attention_bias
                half = f"{base}/in{i}_fp16"
                nodes.append(helper.make_node("Cast", [name], [half], name=f"{base}/Cast_in{i}", to=f16))
                node.input[i] = half
        out = node.output[0]
        node.output[0] = f"{base}/out_fp16"
        nodes += [node, helper.make_node("Cast", [node.output[0]], [out], name=f"{base}/Cast_out", to=f32)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


# Ops kept in float32 by the fp16 conversion, on top of onnxruntime's own list: GroupNorm, exported as
# InstanceNormalization (its mean/variance reduction overflows or loses the most in float16; the unet fusions
# replace it by onnxruntime's GroupNorm, which reads float16 and sums in float32). LayerNormalization is not
# kept: onnxruntime's CUDA kernel for float16 input computes the mean and variance in float32 already, so
# float32 I/O only adds two Casts per norm (image-cifar10 27.0 vs 28.3 ms per call in the device loop,
# docs/BENCHMARKS_GPU.md); the exporter's own fp16 packages still keep both norms in float32 for other runtimes.
FP16_KEEP_FP32 = ("InstanceNormalization",)


def convert_to_fp16(model: onnx.ModelProto, *, keep_fp32: tuple[str, ...] | None = FP16_KEEP_FP32) -> onnx.ModelProto:
    """float16 weights and activations, float32 inputs and outputs (keep_io_types), so the runtime's
    feeds do not change; `keep_fp32` op types stay float32 (None: only onnxruntime's default list).
    Run it after the fusions: their patterns only match float32 graphs. onnxruntime's converter may
    change `model` itself: use the returned model only."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    kwargs: dict[str, Any] = {"keep_io_types": True}
    if keep_fp32:
        kwargs["op_block_list"] = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32))
    with _quiet_ort_tools():
        wrapped.convert_float_to_float16(**kwargs)
    return _dedupe_converter_nodes(wrapped.model)


def _dedupe_converter_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Repair two defects of the fp16 converter, in place: an initializer shared by two kept-float32 nodes
    (e.g. the `scales` of two Resize nodes) gets two identical Casts writing one tensor name, which
    onnxruntime refuses ("Duplicate definition"); and inserted nodes can share a node name. The second of
    two identical producers is dropped (its consumers read the first one's output, which comes earlier);
    repeated node names get a suffix."""
    produced: dict[str, bytes] = {}
    names: set[str] = set()
    keep: list[onnx.NodeProto] = []
    for i, node in enumerate(model.graph.node):
        outputs = [o for o in node.output if o]
        signature = _signature(node)
        if outputs and all(o in produced for o in outputs):
            if all(produced[o] == signature for o in outputs):
                continue  # an exact duplicate of an earlier node
            raise ValueError(f"fp16 conversion produced two different definitions of {outputs}")
        for o in outputs:
            produced[o] = signature
        if node.name and node.name in names:
            node.name = f"{node.name}__{i}"
        names.add(node.name)
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return model


def _signature(node: onnx.NodeProto) -> bytes:
    """What a node computes: op, domain, inputs and attributes (not its name)."""
    attrs = b"".join(a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name))
    return "|".join([node.domain, node.op_type, *node.input]).encode() + b"#" + attrs


def graph_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} of the main graph (for logs and benchmarks)."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
