"""The sampler update of a `LoopPlan` as ONNX nodes appended to the denoiser graph, so that one session run is
one sampler step: denoiser call n, then the update that writes the state and the input of call n + 1."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_edit import NodeBuilder, has_subgraphs

P = "loop/"          # prefix of every name the update adds to the graph
NOT_FOUND = 2**62    # the "no non-finite value yet" code
ONE = ""             # the coefficient of a column that is 1 in every call: no multiply (falsy, as an unset scale)
VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")   # ops whose output may share the input's buffer

# Loop inputs (their outputs carry the same name with "_out"): the state, the call index and the code of the
# first non-finite value (2n: state x of call n, 2n + 1: output of call n).
STATE = ("x", "base", "hist")


@dataclass(frozen=True)
class LoopSpec:
    """What the update graph is built for (one session per distinct spec)."""

    columns: tuple[str, ...]     # the coefficient columns in the table, in order (LoopPlan.used())
    clip: bool
    noise: bool                  # some call adds fresh noise (a noise table input)
    guided: bool                 # the denoiser batch is [cond; uncond], twice the state batch
    guide_channels: int          # guided eps channels (the first k), when guided
    channels: int                # C of the state (the eps channels)
    out_channels: int            # C or 2C (learned variance) of the denoiser output
    ones: tuple[str, ...] = ()   # the columns that are 1 in every call (LoopPlan.ones): terms without a multiply
    fused: bool = True           # the update as one matrix product where it is affine (see `matrix`)
    steps: int = 1               # denoiser calls (each with its update) per session run (see chain_steps)

    def present(self) -> set[str]:
        return set(self.columns) | set(self.ones)

    def matrix(self) -> bool:
        """Whether the update runs as one matrix product of the stacked rows [*state, E, z] (LoopPlan.matrix): it
        is affine in them unless D is clipped, the noise is scaled by the learned variance or only some channels
        are guided. 25 kernel nodes a call instead of 30 on the shipped sampling (docs/BENCHMARKS_GPU.md, round 11)."""
        return (self.fused and not self.clip and "g1" not in self.present() and self.out_channels == self.channels
                and (not self.guided or self.guide_channels == self.channels))

    def input_rows(self) -> int:
        """Rows of the denoiser input per state row: 2 when guided ([cond; uncond] share x), else 1."""
        return 2 if self.guided else 1

    def state(self) -> tuple[str, ...]:
        """The state tensors the spec needs besides x (base for Heun, hist for multistep)."""
        need = {"base": {"c_b", "k_b", "k_x", "k_n"}, "hist": {"c_h", "h_d", "h_s"}}
        return ("x",) + tuple(s for s in ("base", "hist") if need[s] & self.present())


def _affine(b: NodeBuilder, terms: list[tuple[str, str | None]]) -> str | None:
    """sum(coef * tensor) over (tensor, coef or None / ONE for 1); None when there are no terms. Three or more
    terms are added by one Sum node: one kernel that reads each term once instead of a kernel per Add (its float64
    additions in any order stay far inside the tests' 3e-7 of the host loop)."""
    parts = [t if not c else b.one("Mul", c, t) for t, c in terms]
    if len(parts) <= 1:
        return parts[0] if parts else None
    return b.one("Add" if len(parts) == 2 else "Sum", *parts)


def _nonfinite_rows(b: NodeBuilder, tensor: str, chw: int, code: str) -> str:
    """int64 (1,): `code` when the float32 `tensor` (N, C', H, W), C' a multiple of the C in `chw`, holds NaN or inf,
    else NOT_FOUND. Its rows times a zero vector are NaN then (0 * inf is NaN), else 0: one matrix-vector product
    instead of a multiply and a sum."""
    rows = b.one("Reshape", tensor, b.const(np.array([-1, chw], np.int64)))
    zeros = b.const(np.zeros((chw, 1), np.float32), "zeros")
    bad = b.one("IsNaN", b.one("ReduceSum", b.one("MatMul", rows, zeros), keepdims=0))
    return b.one("Where", bad, code, b.const(np.array(NOT_FOUND, np.int64), "not_found"))


def attach_update(model: onnx.ModelProto, spec: LoopSpec, *, x_name: str = "x", out_name: str = "out") -> None:
    """IN PLACE: append the update of `spec` to a denoiser `model` (inputs x, t or sigma, y, output out). Afterwards
    the graph takes `x`, `t` (or `sigma`), `y` (call n's input) plus loop/x, [loop/base, loop/hist,] loop/n
    (int64 (1,)), loop/bad (int64 (1,)), loop/coef (n_calls, K, 1, 1), or (n_calls, rows, K) when spec.matrix(),
    loop/t_table (n_calls + 1, batch) [, loop/noise (n_calls, B, C, H, W)] [, loop/guide (n_calls, 1, 2): [s, 1 - s]
    of each call, for a guided matrix update], and returns loop/x_in and loop/t_in
    (call n + 1's x and t) and loop/<state>_out, loop/n_out, loop/bad_out; `out` is no longer a graph output."""
    g = model.graph
    b = NodeBuilder(g, P)
    x_vi = next(i for i in g.input if i.name == x_name)
    dims = [d.dim_value for d in x_vi.type.tensor_type.shape.dim[1:]]
    state = spec.state()
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    coef_shape = (["calls", len(state) + spec.input_rows(), matrix_width(spec)] if spec.matrix() else
                  ["calls", len(spec.columns), 1, 1])
    new_inputs = [helper.make_tensor_value_info(f"{P}{s}", f64, ["loop_batch", *dims]) for s in state]
    new_inputs += [helper.make_tensor_value_info(f"{P}n", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info(f"{P}bad", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info(f"{P}coef", f64, coef_shape),
                   helper.make_tensor_value_info(f"{P}t_table", f32, ["calls_1", "batch"])]
    if spec.noise:   # float64, as the host sampler adds it
        new_inputs.append(helper.make_tensor_value_info(f"{P}noise", f64, ["calls", "loop_batch", *dims]))
    if spec.matrix() and spec.guided:   # each call's guidance row [s, 1 - s]
        new_inputs.append(helper.make_tensor_value_info(f"{P}guide", f64, ["calls", 1, 2]))
    g.input.extend(new_inputs)
    build = _matrix_update if spec.matrix() else _column_update
    finals = build(b, spec, dims, x_name, out_name)

    for o in list(g.output):
        if o.name == out_name:
            g.output.remove(o)
    _write_outputs(g, finals)
    g.output.extend([helper.make_tensor_value_info(f"{P}x_in", f32, ["batch", *dims]),
                     helper.make_tensor_value_info(f"{P}t_in", f32, ["batch"]),
                     helper.make_tensor_value_info(f"{P}n_out", TensorProto.INT64, [1]),
                     helper.make_tensor_value_info(f"{P}bad_out", TensorProto.INT64, [1]),
                     *[helper.make_tensor_value_info(f"{P}{k}_out", f64, ["loop_batch", *dims]) for k in state]])


def _write_outputs(g: onnx.GraphProto, finals: dict[str, str]) -> None:
    """Make each graph output `name` of `finals` (name -> the tensor that holds it) the output of the update node
    that computes it, renaming that tensor in the update's nodes (the denoiser's never read them); an Identity (a
    device copy on CUDA) only where the tensor is not the update's own, is a view of another tensor (VIEWS:
    onnxruntime may alias their buffers) or already holds another output. The column update's copies were 5 us
    (digits) to 7.5 us (image-cifar10) of its ~90 us a call on an H100 (docs/BENCHMARKS_GPU.md, rounds 12 and
    13)."""
    update = [nd for nd in g.node if nd.name.startswith(P)]
    made = {o for nd in update if nd.op_type not in VIEWS for o in nd.output}
    renamed: dict[str, str] = {}     # tensor -> the graph output it becomes
    copies = []
    for name, src in finals.items():
        if src in made and src not in renamed:
            renamed[src] = name
        elif src != name:
            copies.append((src, name))
    for nd in update:
        for field in (nd.input, nd.output):
            field[:] = [renamed.get(t, t) for t in field]
    g.node.extend(helper.make_node("Identity", [renamed.get(src, src)], [name], name=f"{name}/Identity")
                  for src, name in copies)


def matrix_width(spec: LoopSpec) -> int:
    """K, the rows of the stack a matrix update multiplies: the state, the (guided) output, the noise."""
    return len(spec.state()) + 1 + int(spec.noise)


def _output_row(b: NodeBuilder, spec: LoopSpec, out: str, n0: str) -> str:
    """float64 (1, B * C * H * W): the denoiser output of call n0, guided when spec.guided: s cond + (1 - s) uncond
    of out = [cond; uncond] as one product with that call's row [s, 1 - s] (loop/guide), rounded to float32 as the
    host rounds its guided output (the host's u + s (c - u) and this sum agree after the rounding but for rare
    values half-way between two float32)."""
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    rows = b.one("Reshape", b.one("Cast", out, to=f64), b.const(np.array([spec.input_rows(), -1], np.int64)))
    if not spec.guided:
        return rows
    guided = b.one("MatMul", b.one("Gather", f"{P}guide", n0, axis=0), rows)
    return b.one("Cast", b.one("Cast", guided, to=f32), to=f64)


def _matrix_update(b: NodeBuilder, spec: LoopSpec, dims: list[int], x_name: str, out_name: str) -> dict[str, str]:
    """The update as LoopPlan.matrix's product: the state, the output (guided as `_output_row` says) and the call's
    noise stacked as rows of B*C*H*W values, one MatMul for the new state and one for the next input. Checks each
    call's input x (code 2n) and output (2n + 1)."""
    f32 = TensorProto.FLOAT
    state, rows_in = spec.state(), spec.input_rows()
    i64 = lambda *v: b.const(np.array(v, np.int64))  # noqa: E731
    n0 = b.one("Squeeze", f"{P}n", i64(0))                                           # the call index, a scalar
    c_state, c_in = b.op("Split", [b.one("Gather", f"{P}coef", n0, axis=0), i64(len(state), rows_in)], n_out=2,
                         axis=0)
    flat = lambda t, rows: b.one("Reshape", t, i64(rows, -1))  # noqa: E731
    stack = [flat(f"{P}{s}", 1) for s in state] + [_output_row(b, spec, out_name, n0)]
    if spec.noise:
        stack.append(flat(b.one("Gather", f"{P}noise", n0, axis=0), 1))
    stack = b.one("Concat", *stack, axis=0)                                          # (K, B * C * H * W)
    images = lambda t: b.one("Reshape", t, i64(-1, *dims))  # noqa: E731
    new_state = images(b.one("MatMul", c_state, stack))                              # (len(state) * B, C, H, W)
    parts = b.op("Split", [new_state], n_out=len(state), axis=0) if len(state) > 1 else [new_state]
    n_out = b.one("Add", f"{P}n", i64(1))
    chw = int(np.prod(dims))
    code_x = b.one("Mul", f"{P}n", i64(2))
    checks = [_nonfinite_rows(b, x_name, chw, code_x), _nonfinite_rows(b, out_name, chw, b.one("Add", code_x, i64(1)))]
    return {f"{P}x_in": b.one("Cast", images(b.one("MatMul", c_in, stack)), to=f32), f"{P}n_out": n_out,
            f"{P}t_in": b.one("Gather", f"{P}t_table", b.one("Squeeze", n_out, i64(0)), axis=0),
            f"{P}bad_out": b.one("Min", f"{P}bad", *checks), **{f"{P}{s}_out": t for s, t in zip(state, parts)}}


def _column_update(b: NodeBuilder, spec: LoopSpec, dims: list[int], x_name: str, out_name: str) -> dict[str, str]:
    """The update term by term, one coefficient column per term (any plan: clipping, learned variance, guidance of
    some channels). Checks each call's output (code 2n + 1) and the next call's input x (2n + 2)."""
    C, K = spec.channels, len(spec.columns)
    state = spec.state()
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    n = f"{P}n"
    row = b.one("Gather", f"{P}coef", n, axis=0)                                   # (1, K, 1, 1)
    cols = b.op("Split", [row], n_out=K, axis=1) if K > 1 else [row]               # K x (1, 1, 1, 1)
    coef = {**dict.fromkeys(spec.ones, ONE), **dict(zip(spec.columns, cols))}
    c = coef.get

    # The update runs in float64, as the NumPy samplers do: float32 device arithmetic on the VE state of Heun
    # (|x| up to sigma_max ~ 2e4 for the cosine schedule) loses the result. Only the denoiser sees float32.
    out = b.one("Cast", out_name, to=f64)
    i64 = lambda v: b.const(np.array([v], np.int64))  # noqa: E731
    sl = lambda t, a, z: b.one("Slice", t, i64(a), i64(z), i64(1))  # noqa: E731
    if spec.guided:   # out = [cond; uncond]: u + s (c - u) on the first k channels, c on the others
        cond, unc = b.op("Split", [out], n_out=2, axis=0)
        k = spec.guide_channels
        ck, uk = (sl(cond, 0, k), sl(unc, 0, k)) if k < spec.out_channels else (cond, unc)
        diff = b.one("Sub", ck, uk)
        guided = b.one("Add", uk, b.one("Mul", c("s"), diff) if c("s") else diff)
        # rounded to float32 like the host's guided output (a float32 array, as the denoiser's own)
        guided = b.one("Cast", b.one("Cast", guided, to=f32), to=f64)
        out = guided if k == spec.out_channels else b.one("Concat", guided, sl(cond, k, spec.out_channels), axis=1)
    eps = out if spec.out_channels == C else sl(out, 0, C)
    x = f"{P}x"
    need_d = any(k in spec.present() for k in ("b_d", "c_d", "h_d"))
    d_terms = [(t, cc) for t, cc in [(x, c("a_x")), (eps, c("a_o"))] if cc is not None]   # EDM: a_x = 0
    d = _affine(b, d_terms) if need_d else None
    if d is not None and spec.clip:
        d = b.one("Clip", d, b.const(np.array(-1.0, np.float64)), b.const(np.array(1.0, np.float64)))
    need_s = any(k in spec.present() for k in ("c_s", "h_s"))
    s_terms = [(x, c("b_x")), (d, c("b_d")), (eps, c("b_o"))]
    s = _affine(b, [(t, cc) for t, cc in s_terms if cc is not None]) if need_s else None

    terms = [(f"{P}base", c("c_b")), (x, c("c_x")), (d, c("c_d")), (s, c("c_s")), (f"{P}hist", c("c_h"))]
    terms = [(t, cc) for t, cc in terms if cc is not None]
    if spec.noise:
        z = b.one("Squeeze", b.one("Gather", f"{P}noise", n, axis=0), b.const(np.array([0], np.int64)))  # B, C, H, W
        if c("g1") is not None:   # learned variance: the noise scale is exp(g0 + g1 v) elementwise
            v = sl(out, C, 2 * C)
            z = b.one("Mul", z, b.one("Exp", b.one("Mul", c("g1"), v) if c("g1") else v))
        terms.append((z, c("c_z")))
    x_new = _affine(b, terms)
    outputs = {"x": x_new}
    if "hist" in state:
        outputs["hist"] = _affine(b, [(t, cc) for t, cc in [(d, c("h_d")), (s, c("h_s"))] if cc is not None])
    if "base" in state:
        base_terms = [(f"{P}base", c("k_b")), (x, c("k_x")), (x_new, c("k_n"))]
        outputs["base"] = _affine(b, [(t, cc) for t, cc in base_terms if cc is not None])

    x_in32 = b.one("Cast", b.one("Mul", c("i_s"), x_new) if c("i_s") else x_new, to=f32)
    x_in = b.one("Concat", x_in32, x_in32, axis=0) if spec.guided else x_in32
    n_out = b.one("Add", n, b.const(np.array(1, np.int64)))
    t_in = b.one("Gather", f"{P}t_table", b.one("Squeeze", n_out, b.const(np.array([0], np.int64))), axis=0)
    code_out = b.one("Add", n, n_out)                                             # 2n + 1: the output of call n
    code_x = b.one("Add", n_out, n_out)                                           # 2n + 2: the state x of call n + 1
    # x is checked as call n + 1 sees it (float32, as samplers.calls.call checks it): a finite float64 state
    # past the float32 range is an overflow there too.
    chw = int(np.prod(dims))
    bad = b.one("Min", f"{P}bad", _nonfinite_rows(b, out_name, chw, code_out), _nonfinite_rows(b, x_in32, chw, code_x))
    return {f"{P}x_in": x_in, f"{P}t_in": t_in, f"{P}n_out": n_out, f"{P}bad_out": bad,
            **{f"{P}{k}_out": v for k, v in outputs.items()}}


def chain_steps(model: onnx.ModelProto, steps: int) -> onnx.ModelProto:
    """A new model that runs `steps` calls of a step model (a denoiser with its update attached) one after the
    other in one session run: copy j reads the x, time input, state, n and bad that copy j - 1 wrote; weights and
    tables are shared, and the last copy writes the graph outputs. The copy holds the weights again: for small
    models, whose calls are short enough that a run's fixed cost counts."""
    g = model.graph
    if has_subgraphs(g.node):
        raise ValueError("chain_steps needs a graph without subgraphs")
    time_input = next(i.name for i in g.input if i.name not in ("x", "y") and not i.name.startswith(P))
    carried = {"x": f"{P}x_in", time_input: f"{P}t_in", **{o.name.removesuffix("_out"): o.name for o in g.output
                                                             if o.name.endswith("_out")}}
    outputs, produced = {o.name for o in g.output}, {o for nd in g.node for o in nd.output if o}
    nodes = []
    for j in range(steps):
        last = j == steps - 1
        own = lambda name: name if last and name in outputs else f"s{j}/{name}"  # noqa: E731

        def source(name: str) -> str:
            if name in produced:
                return own(name)
            return f"s{j - 1}/{carried[name]}" if j and name in carried else name   # weights, shared tables

        for i, nd in enumerate(g.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(nd)
            copy.name = f"s{j}/{nd.name or i}"
            copy.input[:] = [source(name) if name else name for name in nd.input]
            copy.output[:] = [own(name) if name else name for name in nd.output]
            nodes.append(copy)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.value_info[:]
    out.graph.node.extend(nodes)
    return out


@contextlib.contextmanager
def attached(model: onnx.ModelProto, spec: LoopSpec) -> Iterator[onnx.ModelProto]:
    """`model` with the update of `spec` attached for the duration of the block (to open a session from it),
    restored afterwards: the weights of a large prepared graph are never copied (unless spec.steps > 1: then the
    block gets chain_steps' new model)."""
    outputs = [onnx.ValueInfoProto() for _ in model.graph.output]
    for saved, o in zip(outputs, model.graph.output):
        saved.CopyFrom(o)
    try:
        attach_update(model, spec)           # inside: an attach that fails partway is taken out again too
        yield model if spec.steps == 1 else chain_steps(model, spec.steps)
    finally:
        g = model.graph
        keep = [nd for nd in g.node if not nd.name.startswith(P)]
        del g.node[:]
        g.node.extend(keep)
        for items in (g.initializer, g.input):
            for item in [i for i in items if i.name.startswith(P)]:
                items.remove(item)
        del g.output[:]
        g.output.extend(outputs)
