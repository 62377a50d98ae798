"""What the device-loop tests share: the bound against the host loop, the samplers the shipped package's contract
runs, one host loop and one device loop on the same noise, and a stand-in denoiser that goes non-finite at one call."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from diffit_port import samplers
from diffit_port.package import default_package_path
from diffit_port.runtimes.device_loop import DeviceLoop
from diffit_port.runtimes.loop_graph import attached

LOOP_TOL = 1e-5          # device loop vs host loop, final samples (the bound)
EDM_SAMPLERS = sorted(samplers.EDM_SAMPLERS)
# the shipped package's contract decides which samplers its parity test runs (read at collection)
SHIPPED_PREDICTION = json.loads((default_package_path() / "manifest.json").read_text()).get("prediction", "eps")
SHIPPED_SAMPLERS = sorted(samplers.SAMPLERS_BY_PREDICTION[SHIPPED_PREDICTION])


def host_and_device(denoiser, package, sampler: str, steps: int, y: np.ndarray, **kw):
    schedule = samplers.schedule_from_config(package.diffusion)
    m = package.model
    chw = (m.in_channels, m.image_size, m.image_size)
    host = samplers.sample_batches(sampler, denoiser, samplers.NoiseSource(7, len(y)), chw, y, schedule, steps,
                                   batch_size=len(y), **kw)
    dev = denoiser.device_loop.sample_batches(sampler, samplers.NoiseSource(7, len(y)), chw, y, schedule, steps,
                                              batch_size=len(y), **kw)
    return host, dev


def poisoned_model(t_bad: float, value: float, time_input: str = "t") -> onnx.ModelProto:
    """A stand-in denoiser: out = where(t == t_bad, value, 0.01 x), i.e. `value` (inf, NaN or a float32 value
    that overflows the next state) at the call whose time input (`t` or `sigma`) is t_bad, small elsewhere."""
    nodes = [helper.make_node("Equal", [time_input, "t_bad"], ["hit"]),
             helper.make_node("Reshape", ["hit", "shape"], ["hit4"]),
             helper.make_node("Mul", ["x", "k"], ["small"]),
             helper.make_node("Where", ["hit4", "value", "small"], ["out"])]
    inits = [numpy_helper.from_array(np.array(t_bad, np.float32), "t_bad"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.array(value, np.float32), "value"),
             numpy_helper.from_array(np.array(0.01, np.float32), "k")]
    graph = helper.make_graph(
        nodes, "poisoned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4]),
         helper.make_tensor_value_info(time_input, TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def poisoned_loop(model: onnx.ModelProto, time_input: str, **opts) -> DeviceLoop:
    """A CPU DeviceLoop (`opts` its options) over the stand-in denoiser `model`."""
    import onnxruntime as ort

    def open_session(spec):
        with attached(model, spec) as merged:
            return ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])

    return DeviceLoop(open_session, device="cpu", out_channels=1, time_input=time_input, **opts)


def poisoned_edm_loop(steps: int, **opts) -> DeviceLoop:
    """A CPU DeviceLoop (`opts` its options) over the poisoned model whose output is NaN at the sigma of call 2 of an
    EDM DPM-Solver++(2M) run of `steps` steps."""
    return poisoned_loop(poisoned_model(float(np.float32(samplers.EDMSchedule().sigmas(steps)[2])), np.nan, "sigma"),
                         "sigma", **opts)
