"""Load-time bias folds for ONNX Runtime's CUDA graphs: per-channel bias adds that run as kernels of their own move
into the fused op that reads the tensor next, so the tensor is not read and written once more just to add a
vector. Each fold keeps the values (a per-channel bias commutes with reshapes and transposes that keep the
channel axis last) and leaves the graph alone where its pattern does not match exactly.

- the first MLP Linear's bias into FastGelu (FastGelu(x, bias), the transformer optimizer's own fusion, which its
  diffusion-UNet path never calls);
- a convolution's bias into the LayerNormalization that reads its output after the window partition: the norm
  becomes SkipLayerNormalization with the bias as its `bias` input, a zero (S, C) skip that broadcasts over the
  windows, and its optional sum output (the biased tensor) for the other readers. Without this the NHWC
  convolution adds its bias in a separate cuDNN kernel, and the LayerNorm kernel runs at about a fifth of the
  memory bandwidth on these 64-256-channel rows, which the SkipLayerNorm kernel does not;
- the second MLP Linear's bias into the SkipGroupNorm that reads the block's output after the window merge
  (its `bias` input; its sum output carries the bias on to the residual stream), and likewise the bias of a
  convolution that a SkipGroupNorm reads directly (the decoder's up convolution plus the encoder skip).

Run them on the fused float32 graph, before the fp16 conversion (which then converts the moved biases too)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_edit import GraphIndex
from .ort_graph import MS_DOMAIN


def fold_biases(model: onnx.ModelProto) -> dict[str, int]:
    """Every fold below on `model`, IN PLACE; returns how many of each were made."""
    return {"fastgelu": fold_bias_into_fastgelu(model), "conv_layernorm": fold_conv_bias_into_layernorm(model),
            "skip_group_norm": fold_bias_into_skip_group_norm(model),
            "conv_skip_group_norm": fold_conv_bias_into_skip_group_norm(model)}


def fold_bias_into_fastgelu(model: onnx.ModelProto) -> int:
    """Add(MatMul(...), bias) -> FastGelu  becomes  FastGelu(MatMul(...), bias), IN PLACE (onnxruntime's
    FusionBiasGelu); returns the number of FastGelu nodes that took a bias."""
    from onnxruntime.transformers.fusion_biasgelu import FusionBiasGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    before = sum(n.op_type == "FastGelu" and len(n.input) == 2 for n in model.graph.node)
    wrapped = OnnxModel(model)
    FusionBiasGelu(wrapped, is_fastgelu=True).apply()
    wrapped.topological_sort()
    return sum(n.op_type == "FastGelu" and len(n.input) == 2 for n in model.graph.node) - before


class _Graph(GraphIndex):
    """GraphIndex of a model, which the folds keep in step with their edits."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model.graph)

    def channels_last_path(self, start: str, channels: int, axis: int, rank: int,
                           until: set[str]) -> tuple[list[onnx.NodeProto], onnx.NodeProto, list[int]] | None:
        """From tensor `start` (channel axis `axis` of `rank`), follow its only reader through Reshapes and
        Transposes to the first node whose op type is in `until`; (the views passed, that node, the target shape
        of the last Reshape passed or []), if the channel axis ends last, every Reshape keeps it last with
        `channels` entries, and each tensor before the last has that one reader (the last may have other readers
        besides that node); else None."""
        views: list[onnx.NodeProto] = []
        name, shape = start, []
        while True:
            ends = [n for n in self.readers.get(name, []) if n.op_type in until]
            if ends:
                return (views, ends[0], shape) if axis == rank - 1 and len(ends) == 1 else None
            node = self.only_reader(name)
            if node is None:
                return None
            if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
                perm = [a for at in node.attribute if at.name == "perm" for a in at.ints]
                if not perm:
                    return None
                axis, rank = perm.index(axis), len(perm)
            elif node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
                target = self.constant(node.input[1]) if len(node.input) > 1 else None
                if target is None or axis != rank - 1 or int(target[-1]) != channels:
                    return None
                shape = [int(d) for d in target]
                rank, axis = len(shape), len(shape) - 1
            else:
                return None
            views.append(node)
            name = node.output[0]


def _bias_of(graph: _Graph, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    bias = graph.constant(node.input[index]) if len(node.input) > index and node.input[index] else None
    return bias if bias is not None and bias.ndim == 1 else None


def fold_conv_bias_into_layernorm(model: onnx.ModelProto) -> int:
    """IN PLACE: every Conv / NhwcConv whose output reaches one LayerNormalization over its channels through
    channel-preserving views (the window partition) loses its bias, and the norm becomes

        SkipLayerNormalization(z, zeros (S, C), scale, beta, bias) -> (norm, -, -, z + bias)

    with the other readers of z reading z + bias. The norm's input must be 3-D (rows, S, C) with S static (the
    window), as SkipLayerNormalization broadcasts a 2-D skip only there. Returns the number of folds."""
    graph = _Graph(model)
    folds = 0
    for conv in list(model.graph.node):
        if not ((conv.op_type == "Conv" and conv.domain in ("", "ai.onnx"))
                or (conv.op_type == "NhwcConv" and conv.domain == MS_DOMAIN)):
            continue
        bias = _bias_of(graph, conv, 2)
        if bias is None:
            continue
        found = graph.channels_last_path(conv.output[0], bias.size, 1 if conv.op_type == "Conv" else 3, 4,
                                         {"LayerNormalization"})
        if found is None or not found[0]:
            continue
        views, norm, shape = found
        if views[-1].op_type != "Reshape" or len(shape) != 3 or shape[1] <= 0:     # to (rows, S, C), S static
            continue
        if not _fold_into_norm(graph, model, conv, norm, views[-1].output[0], shape[1], bias):
            continue
        del conv.input[2]
        folds += 1
    return folds


def _fold_into_norm(graph: _Graph, model: onnx.ModelProto, conv: onnx.NodeProto, norm: onnx.NodeProto,
                    z: str, rows: int, bias: np.ndarray) -> bool:
    """Replace LayerNormalization `norm` of tensor z by the SkipLayerNormalization of fold_conv_bias_into_layernorm."""
    attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    if attrs.get("axis", -1) not in (-1, 2) or len(norm.input) < 3 or norm.input[0] != z:
        return False
    readers = [n for n in graph.readers[z] if n is not norm]
    if any(graph.position[id(n)] < graph.position[id(norm)] for n in readers) or z in graph.outputs:
        return False
    base = norm.name or norm.output[0]
    skip = numpy_helper.from_array(np.zeros((rows, bias.size), dtype=bias.dtype), f"{base}/zero_skip")
    total = f"{base}/biased_input"
    fused = helper.make_node("SkipLayerNormalization", [z, skip.name, norm.input[1], norm.input[2], conv.input[2]],
                             [norm.output[0], "", "", total], name=f"{base}/SkipLayerNorm_bias", domain=MS_DOMAIN,
                             epsilon=float(attrs.get("epsilon", 1e-5)))
    for reader in readers:
        for i, name in enumerate(reader.input):
            if name == z:
                reader.input[i] = total
    nodes = model.graph.node
    index = graph.position[id(norm)]
    nodes.remove(norm)
    nodes.insert(index, fused)
    graph.position[id(fused)] = index
    model.graph.initializer.append(skip)
    return True


def fold_bias_into_skip_group_norm(model: onnx.ModelProto) -> int:
    """IN PLACE: Add(MatMul(...), bias) -> Add(residual) -> channel-preserving views (the window merge) -> input 0
    of a SkipGroupNorm without a bias becomes  Add(MatMul(...), residual) -> ... -> SkipGroupNorm(..., bias).
    The SkipGroupNorm's sum output then holds the bias as the residual stream did. Returns the number of folds."""
    graph = _Graph(model)
    folds = 0
    for add in list(model.graph.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        index, bias = next(((i, b) for i in (0, 1) if (b := _bias_of(graph, add, i)) is not None), (None, None))
        if bias is None:
            continue
        source = graph.producers.get(add.input[1 - index])
        residual = graph.only_reader(add.output[0])
        if source is None or source.op_type != "MatMul" or residual is None or residual.op_type != "Add":
            continue
        found = graph.channels_last_path(residual.output[0], bias.size, 2, 3, {"SkipGroupNorm"})
        if found is None or not found[0]:
            continue
        views, norm, _ = found
        if norm.input[0] != views[-1].output[0] or len(norm.input) != 4 or not norm.input[3]:
            continue
        residual.input[list(residual.input).index(add.output[0])] = source.output[0]
        norm.input.append(add.input[index])
        model.graph.node.remove(add)
        folds += 1
    return folds


def fold_conv_bias_into_skip_group_norm(model: onnx.ModelProto) -> int:
    """IN PLACE: an NhwcConv whose output only a SkipGroupNorm without a bias reads, as its input or its skip,
    hands its bias to that SkipGroupNorm (whose sum output is input + skip + bias either way). Returns the
    number of folds."""
    graph = _Graph(model)
    folds = 0
    for conv in model.graph.node:
        if conv.op_type != "NhwcConv" or conv.domain != MS_DOMAIN or _bias_of(graph, conv, 2) is None:
            continue
        norm = graph.only_reader(conv.output[0])
        if (norm is None or norm.op_type != "SkipGroupNorm" or len(norm.input) != 4
                or conv.output[0] not in (norm.input[0], norm.input[3])):
            continue
        norm.input.append(conv.input[2])
        del conv.input[2]
        folds += 1
    return folds
