"""Single-op float16 graphs at latent-xl2-256's shapes on onnxruntime's CUDA EP (one captured CUDA graph each,
inputs and output bound on the device): what the time-token and GELU rewrites trade against each other. Per op
and rows per call B (N = 256 tokens, C = 1152): the median ms of a run over bursts of 50, the bytes it moves
per second (inputs read once, output written once) and, for the MatMuls, TFLOP/s. Needs onnxruntime-gpu.

    python benchmarks/op_probe.py --rows 128 --rows 256
"""

from __future__ import annotations

import statistics
import time

import click
import numpy as np
from onnx import TensorProto, helper, numpy_helper

N, C = 256, 1152
F16 = TensorProto.FLOAT16


def _model(op: str, inputs: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray], out: tuple[int, ...],
           domain: str = "", **attrs: object) -> bytes:
    node = helper.make_node(op, [*inputs, *weights], ["y"], domain=domain, **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(k, F16, s) for k, s in inputs.items()],
                              [helper.make_tensor_value_info("y", F16, out)],
                              [numpy_helper.from_array(w, k) for k, w in weights.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def cases(b: int) -> dict[str, tuple[bytes, dict[str, tuple[int, ...]], tuple[int, ...], float]]:
    """label -> (model, input shapes, output shape, FLOPs)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float16)   # noqa: E731
    h = (b, N, 4 * C)
    return {
        "FastGelu with bias (MLP, 4C)": (_model("FastGelu", {"x": h}, {"b": w(4 * C)}, h, "com.microsoft"),
                                         {"x": h}, h, 0),
        "FastGelu without bias": (_model("FastGelu", {"x": h}, {}, h, "com.microsoft"), {"x": h}, h, 0),
        "Add (B, N, C) + (B, 1, C)": (_model("Add", {"x": (b, N, C), "t": (b, 1, C)}, {}, (b, N, C)),
                                      {"x": (b, N, C), "t": (b, 1, C)}, (b, N, C), 0),
        "Concat (B, N, C) | (B, N, B)": (_model("Concat", {"x": (b, N, C), "e": (b, N, b)}, {}, (b, N, C + b), axis=-1),
                                         {"x": (b, N, C), "e": (b, N, b)}, (b, N, C + b), 0),
        "MatMul K = C": (_model("MatMul", {"x": (b, N, C)}, {"w": w(C, C)}, (b, N, C)), {"x": (b, N, C)}, (b, N, C),
                         2.0 * b * N * C * C),
        "MatMul K = C + B": (_model("MatMul", {"x": (b, N, C + b)}, {"w": w(C + b, C)}, (b, N, C)),
                             {"x": (b, N, C + b)}, (b, N, C), 2.0 * b * N * (C + b) * C),
    }


def time_case(ort: object, model: bytes, inputs: dict[str, tuple[int, ...]], out: tuple[int, ...],
              bursts: int = 7, burst: int = 50) -> float:
    """Median ms of one run, over `bursts` bursts of `burst` replays of the captured graph."""
    so = ort.SessionOptions()
    session = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    rng = np.random.default_rng(1)
    binding = session.io_binding()
    keep = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(s).astype(np.float16), "cuda", 0)
            for s in inputs.values()]
    for name, v in zip(inputs, keep):
        binding.bind_ortvalue_input(name, v)
    y = ort.OrtValue.ortvalue_from_shape_and_type(out, np.float16, "cuda", 0)
    binding.bind_ortvalue_output("y", y)
    for _ in range(3):
        session.run_with_iobinding(binding)
    per_run = []
    for _ in range(bursts):
        t0 = time.perf_counter()
        for _ in range(burst):
            session.run_with_iobinding(binding)
        per_run.append(1000 * (time.perf_counter() - t0) / burst)
    return statistics.median(per_run)


@click.command()
@click.option("--rows", multiple=True, type=click.IntRange(min=1), default=(128,), show_default=True,
              help="Rows per call B (repeatable).")
def main(rows: tuple[int, ...]) -> None:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    for b in rows:
        for label, (model, inputs, out, flops) in cases(b).items():
            ms = time_case(ort, model, inputs, out)
            moved = 2 * (sum(int(np.prod(s)) for s in inputs.values()) + int(np.prod(out)))
            extra = f", {flops / ms / 1e9:.0f} TFLOP/s" if flops else ""
            click.echo(f"B={b:4d}  {label:32s} {ms:7.3f} ms  {moved / ms / 1e6:7.0f} GB/s{extra}")


if __name__ == "__main__":
    main()
