"""Non-finite values stop the device loop (both update forms) at the call where the host loop stops, with the same
error, however often the loop reads the device's code."""

from __future__ import annotations

import numpy as np
import pytest

from diffit_port import samplers
from loop_helpers import poisoned_edm_loop, poisoned_loop, poisoned_model


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("contract, value, what, call", [
    ("eps", np.inf, "denoiser output", 2), ("eps", np.nan, "denoiser output", 2), ("eps", 3e38, "sampler state x", 3),
    ("edm", np.inf, "denoiser output", 2), ("edm", np.nan, "denoiser output", 2)])
@pytest.mark.parametrize("fused", [True, False])     # the matrix update and the column update
def test_nonfinite_stops_the_device_loop_where_the_host_loop_stops(contract, value, what, call, fused):
    import onnxruntime as ort

    steps = 6
    if contract == "eps":   # ddim on the training index t
        sampler, schedule, time_input = "ddim", samplers.Schedule(samplers.beta_schedule("linear", 1000)), "t"
        times = samplers.respace(1000, steps)[::-1].astype(np.float64)
    else:                   # EDM's DPM-Solver++(2M) on sigma (one call per grid level)
        sampler, schedule, time_input = "dpmpp-2m", samplers.EDMSchedule(), "sigma"
        times = schedule.sigmas(steps)[:-1]
    t_bad = float(np.float32(times[2]))                          # the time input of call 2 (0-based)
    model = poisoned_model(t_bad, value, time_input)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def denoise(x, t, y):
        return plain.run(None, {"x": x, time_input: t, "y": y})[0]

    loop = poisoned_loop(model, time_input, fused_update=fused)
    y = np.zeros(2, np.int64)
    errors = []
    shape = (2, 1, 4, 4)
    for run in (lambda: samplers.sample(sampler, denoise, samplers.NoiseSource(0, 2), shape, y, schedule, steps),
                lambda: loop.sample(sampler, samplers.NoiseSource(0, 2), shape, y, schedule, steps)):
        with pytest.raises(samplers.NonFiniteError) as e:
            run()
        errors.append((e.value.what, e.value.step, e.value.t))
    assert errors[0][:2] == errors[1][:2] == (what, call)
    assert errors[0][2] == pytest.approx(times[call]) and errors[1][2] == pytest.approx(times[call])


def test_reading_the_code_less_often_names_the_same_call():
    """The device keeps the first bad call's code: read after every call the loop stops right after call 2;
    read only at the end it runs all calls and raises the same error."""
    steps, schedule = 6, samplers.EDMSchedule()
    loop = poisoned_edm_loop(steps)
    seen = {}
    for every in (0.0, 1e9):
        calls = []
        with pytest.raises(samplers.NonFiniteError) as e:
            loop.sample("dpmpp-2m", samplers.NoiseSource(0, 2), (2, 1, 4, 4), np.zeros(2, np.int64), schedule, steps,
                        callback=lambda n, total: calls.append(n), check_seconds=every)
        seen[every] = (str(e.value), e.value.step, len(calls))
    assert seen[0.0][:2] == seen[1e9][:2] and seen[0.0][1] == 2
    assert seen[0.0][2] == 3 and seen[1e9][2] == steps
