"""Short attention windows packed several to one attention sequence for ONNX Runtime's fused attention kernels,
a load-time rewrite of the MultiHeadAttention nodes that ort_graph.rewrite_to_mha makes (in memory, IN PLACE)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ort_graph import MS_DOMAIN

# The tile of query rows onnxruntime's fused attention kernels work in (cuDNN flash: 64 x 128 x head dim on
# sm90); pack_windows fills it with several short windows.
ATTENTION_TILE = 64
MASKED = -10000.0   # a logit that softmax turns into exactly 0 in float32 and float16 (and fp16 holds exactly)


def window_groups(model_cfg: Any, tile: int = ATTENTION_TILE) -> dict[int, int]:
    """{tokens per window: windows per packed sequence} for pack_windows, from an image model's config: per
    stage, the largest power of two g with g * tokens <= `tile` that divides the stage's windows per image
    (so that every batch's windows split evenly), the smallest over stages of one window size; sizes whose
    group would be 1 are left out ({} for latent models and windows of >= `tile` tokens)."""
    if model_cfg.kind != "image":
        return {}
    groups: dict[int, int] = {}
    for i in range(len(model_cfg.channels)):
        res = model_cfg.image_size // 2 ** i
        w = min(model_cfg.window_size, res)
        tokens, windows = w * w, (res // w) ** 2
        g = 1
        while 2 * g * tokens <= tile and windows % (2 * g) == 0:
            g *= 2
        groups[tokens] = min(groups.get(tokens, g), g)
    return {k: g for k, g in groups.items() if g > 1}


def pack_windows(model: onnx.ModelProto, groups: dict[int, int]) -> onnx.ModelProto:
    """IN PLACE: run every com.microsoft.MultiHeadAttention of `model` whose attention bias is a constant
    (1, h, S, S) (rewrite_to_mha's Unsqueeze of the TMSA node's relative bias) with S in `groups` on g =
    groups[S] consecutive windows at once: query, key and value (N, S, C) are viewed as (N / g, g * S, C), the
    bias becomes the block-diagonal (1, h, g * S, g * S) with the window's bias on the diagonal blocks and
    MASKED elsewhere, so each token still attends to its own window only, and the output is viewed back as
    (N, S, C). Both views are free (consecutive windows are adjacent rows); the attention kernels see g times
    fewer sequences, each filling more of a tile. N must be a multiple of g (window_groups picks groups that
    divide every stage's windows per image); otherwise the session fails at the Reshape. Returns `model`."""
    if any(g < 1 for g in groups.values()):
        raise ValueError(f"groups must be >= 1, got {groups}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    shapes: dict[int, str] = {}     # rows -> the name of the Reshape shape [-1, rows, 0]
    added: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()      # the biases no packed node reads any more

    def view(rows: int) -> str:
        if rows not in shapes:
            shapes[rows] = f"tmsa_pack_shape_{rows}"
            added.append(numpy_helper.from_array(np.array([-1, rows, 0], dtype=np.int64), shapes[rows]))
        return shapes[rows]

    for node in graph.node:
        bias = _constant_bias(node, inits, producers) if node.op_type == "MultiHeadAttention" else None
        g = groups.get(bias.shape[2], 1) if bias is not None else 1
        if g == 1:
            nodes.append(node)
            continue
        s, base = bias.shape[2], node.name or node.output[0]
        packed = np.full((1, bias.shape[1], g * s, g * s), MASKED, dtype=bias.dtype)
        for j in range(g):
            packed[:, :, j * s:(j + 1) * s, j * s:(j + 1) * s] = bias
        added.append(numpy_helper.from_array(packed, f"{base}/packed_bias"))
        for i in (0, 1, 2):
            nodes.append(helper.make_node("Reshape", [node.input[i], view(g * s)], [f"{base}/packed_in{i}"],
                                          name=f"{base}/Reshape_in{i}"))
            node.input[i] = f"{base}/packed_in{i}"
        replaced.add(node.input[5])
        node.input[5] = f"{base}/packed_bias"
        out, node.output[0] = node.output[0], f"{base}/packed_out"
        nodes += [node, helper.make_node("Reshape", [node.output[0], view(s)], [out], name=f"{base}/Reshape_out")]
    read = {i for n in nodes for i in n.input}
    dead = [n for n in nodes if len(n.output) == 1 and n.output[0] in replaced and n.output[0] not in read]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n not in dead)   # the Unsqueezes that made the replaced biases
    read = {i for n in graph.node for i in n.input}
    stale = [t for t in graph.initializer if t.name not in read and t.name in
             replaced.union(*(n.input for n in dead))]
    for t in stale:
        graph.initializer.remove(t)
    graph.initializer.extend(added)
    return model


def _constant_bias(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                   producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The (1, h, S, S) attention bias of a MultiHeadAttention node with query, key and value given
    separately and no key padding mask or past state (which packing would mix across windows), when it is a
    constant: an initializer, or an Unsqueeze of one on axis 0; else None."""
    if (node.domain != MS_DOMAIN or len(node.input) < 6 or not node.input[5] or not all(node.input[:3])
            or node.input[4] or any(node.input[6:])):
        return None
    name = node.input[5]
    if name in inits:
        bias = numpy_helper.to_array(inits[name])
    elif name in producers and producers[name].op_type == "Unsqueeze" and producers[name].input[0] in inits:
        axes = producers[name].input[1] if len(producers[name].input) > 1 else ""
        if axes not in inits or numpy_helper.to_array(inits[axes]).tolist() != [0]:
            return None
        bias = numpy_helper.to_array(inits[producers[name].input[0]])[None]
    else:
        return None
    if bias.ndim != 4 or bias.shape[0] != 1 or bias.shape[2] != bias.shape[3]:
        return None
    return bias
