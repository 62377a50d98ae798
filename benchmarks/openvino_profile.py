"""Where an OpenVINO CPU call of a package's denoiser spends its time: OpenVINO's own per-node counters (PERF_COUNT)
summed by node type and by kernel, on one stream and one thread (what each of the runtime's CPU streams runs), and
the slowest nodes of the kinds that move data rather than compute (Reorder, Transpose, Subgraph, MVN).

`--group-norm-op` also times the graph with each GroupNorm pattern (Reshape, InstanceNormalization, Reshape, Mul,
Add, as torch exports it) written as one ONNX GroupNormalization node, beside the shipped graph in the same run:
whether OpenVINO's reorders around the GroupNorms go away with its own GroupNormalization op. `--channel-norms`
times and profiles the graph as openvino runs it in fp32 by default, its GroupNorms from per-channel statistics.
`--head-matmuls` also times and profiles the graph with q, k and v as per-head products (runtimes/head_matmuls.py,
with the GroupNorms as exported: beside the shipped graph it shows that rewrite alone).

    python benchmarks/openvino_profile.py --rows 8 --precision f32
    python benchmarks/openvino_profile.py --rows 8 --precision f32 --group-norm-op
    python benchmarks/openvino_profile.py --rows 8 --precision f32 --channel-norms
    python benchmarks/openvino_profile.py --rows 16 --precision f32 --head-matmuls
"""

from __future__ import annotations

import collections
import statistics
import time

import click
import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes.group_norm import find_group_norms, per_channel_group_norms
from diffit_port.runtimes.head_matmuls import head_matmuls
from diffit_port.runtimes.openvino_rt import read_onnx

DATA_MOVING = ("Reorder", "Transpose", "Subgraph", "MVN")


def write_group_norm_ops(model: onnx.ModelProto) -> int:
    """IN PLACE: each GroupNorm of torch's export pattern (runtimes/group_norm.py's find_group_norms) as one
    GroupNormalization (opset 21: per-channel scale and bias); the model's default opset becomes 21. Returns how many
    were written."""
    g = model.graph
    replaced, drop = {}, set()
    for k, gn in enumerate(find_group_norms(g)):
        g.initializer.extend([numpy_helper.from_array(gn.gamma, f"gn{k}/scale"),
                              numpy_helper.from_array(gn.beta, f"gn{k}/bias")])
        replaced[gn.add.output[0]] = helper.make_node(
            "GroupNormalization", [gn.first.input[0], f"gn{k}/scale", f"gn{k}/bias"], [gn.add.output[0]],
            num_groups=gn.groups, epsilon=gn.eps)
        drop.update(n.output[0] for n in gn.nodes if n is not gn.add)
    nodes = [replaced.get(n.output[0], n) for n in g.node if n.output[0] not in drop]
    del g.node[:]
    g.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 21
    return len(replaced)


def compiled(core, model: onnx.ModelProto, rows: int, precision: str, profile: bool):
    ov_model = read_onnx(core, model)
    ov_model.reshape({p: [rows, *list(p.get_partial_shape())[1:]] for p in ov_model.inputs})
    cfg = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERF_COUNT": profile}
    return core.compile_model(ov_model, "CPU", cfg).create_infer_request()


def report(request) -> None:
    """The counters of the request's last call, by node type and by kernel, and the slowest data-moving nodes."""
    by_type, count, by_kernel = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    for p in request.profiling_info:
        ms = p.real_time.total_seconds() * 1e3
        by_type[p.node_type] += ms
        count[p.node_type] += 1
        by_kernel[p.exec_type] += ms
    total = sum(by_type.values())
    click.echo(f"\n| node type | ms | share | nodes |\n|---|---:|---:|---:|   (total {total:.2f} ms)")
    for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]):
        if v >= 0.05:
            click.echo(f"| {k} | {v:.2f} | {100 * v / total:.1f}% | {count[k]} |")
    click.echo("\n| kernel | ms |\n|---|---:|")
    for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10]:
        click.echo(f"| {k} | {v:.2f} |")
    slow = sorted((p for p in request.profiling_info if p.node_type in DATA_MOVING),
                  key=lambda p: -p.real_time.total_seconds())[:12]
    click.echo("\nslowest data-moving nodes:")
    for p in slow:
        ms = p.real_time.total_seconds() * 1e3
        click.echo(f"  {p.node_type:9s} {ms:6.3f} ms  {p.exec_type:22s} {p.node_name[:80]}")


@click.command()
@click.option("--package", "package_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Package directory (default: the embedded package).")
@click.option("--rows", default=8, show_default=True, type=click.IntRange(1), help="Rows of one call.")
@click.option("--precision", default="f32", show_default=True, type=click.Choice(["f32", "bf16"]))
@click.option("--reps", default=15, show_default=True, type=click.IntRange(3))
@click.option("--group-norm-op", is_flag=True, help="Also time the graph with GroupNormalization nodes.")
@click.option("--head-matmuls", "per_head", is_flag=True,
              help="Also time and profile the graph with q, k and v as per-head products.")
@click.option("--channel-norms", is_flag=True,
              help="Also time and profile the graph with its GroupNorms from per-channel statistics "
                   "(runtimes/group_norm.py: what openvino runs in fp32 by default).")
def main(package_dir: str | None, rows: int, precision: str, reps: int, group_norm_op: bool, per_head: bool,
         channel_norms: bool) -> None:
    import openvino as ov

    package = load_package(package_dir or default_package_path())
    core = ov.Core()
    models = {"shipped graph": onnx.inliner.inline_local_functions(onnx.load(str(package.graph_path())))}
    if group_norm_op:
        alt = onnx.inliner.inline_local_functions(onnx.load(str(package.graph_path())))
        click.echo(f"GroupNormalization nodes written: {write_group_norm_ops(alt)}")
        models["GroupNormalization op"] = alt
    if per_head:
        alt = onnx.load(str(package.graph_path()))
        click.echo(f"attention functions with per-head q, k, v products: {head_matmuls(alt)}")
        models["per-head q, k, v"] = onnx.inliner.inline_local_functions(alt)
    if channel_norms:
        alt = onnx.inliner.inline_local_functions(onnx.load(str(package.graph_path())))
        click.echo(f"GroupNorms from per-channel statistics: {per_channel_group_norms(alt)}")
        models["per-channel GroupNorms"] = alt
    rng = np.random.default_rng(0)
    m, names = package.model, [i.name for i in models["shipped graph"].graph.input]
    time_input = next(n for n in names if n not in ("x", "y"))            # sigma (EDM) or t (eps)
    feeds = {"x": rng.standard_normal((rows, m.in_channels, m.image_size, m.image_size), dtype=np.float32),
             time_input: np.full(rows, 1.3, np.float32), "y": np.arange(rows) % max(m.num_classes, 1)}
    profiled = ("shipped graph", "per-channel GroupNorms", "per-head q, k, v")
    requests = {k: compiled(core, m, rows, precision, profile=k in profiled) for k, m in models.items()}
    outs = {k: r.infer(feeds)[0].copy() for k, r in requests.items()}
    for k, out in outs.items():
        click.echo(f"{k}: max abs against the shipped graph {np.abs(out - outs['shipped graph']).max():.2e}")
    times = {k: [] for k in requests}
    for i in range(reps + 3):          # alternating, the first 3 rounds untimed
        for k, r in requests.items():
            t0 = time.perf_counter()
            r.infer(feeds)
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        click.echo(f"{k}: median {1000 * statistics.median(v):.2f} ms, fastest {1000 * min(v):.2f} ms a call "
                   f"({rows} rows, {precision}, one thread)")
    for k in profiled:
        if k in requests:
            click.echo(f"\n## {k}")
            report(requests[k])


if __name__ == "__main__":
    main()
