"""Does switching between two captured CUDA graphs cost time per call, against replaying one? The device loop
alternates two graphs (its ping-pong state buffers); this times the plain denoiser (onnx-cuda fp16 default graph,
512 rows per call) on one binding against two bindings with their own buffers and graph ids, in bursts as long
as a 50-step loop's calls (digits 50, image-cifar10 99), four times each, interleaved. Needs onnxruntime-gpu.

    python benchmarks/graph_alternation.py
"""

from __future__ import annotations

import contextlib
import statistics
import time

from sampling import bound_run, preset_package

from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser


def main() -> None:
    for name, calls in (("digits", 50), ("image-cifar10", 99)):
        ctx = contextlib.nullcontext(default_package_path()) if name == "digits" else preset_package(name)
        with ctx as pkg_dir:
            package = load_package(pkg_dir)
            d = create_denoiser("onnx-cuda", package, precision="fp16", cuda_graph=True, fusions="unet",
                                qkv="separate")
            m = package.model
            shape = (512, m.in_channels, m.image_size, m.image_size)
            a, b = bound_run(d, shape, 3000), bound_run(d, shape, 3001)
            for binding, options, *_ in (a, b, a, b):       # captures both graphs, then replays each once
                d.session.run_with_iobinding(binding, options)
            ms: dict[str, list[float]] = {"one graph": [], "two graphs alternating": []}
            for _ in range(4):
                for label, seq in (("one graph", [a] * calls), ("two graphs alternating", [a, b] * (calls // 2))):
                    t0 = time.perf_counter()
                    for binding, options, *_ in seq:
                        d.session.run_with_iobinding(binding, options)
                    ms[label].append(1000 * (time.perf_counter() - t0) / len(seq))
            print(name, {k: [round(v, 3) for v in vs] for k, vs in ms.items()},
                  {k: round(statistics.median(v), 3) for k, v in ms.items()}, flush=True)
            d.close()


if __name__ == "__main__":
    main()
