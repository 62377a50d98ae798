"""The device loop (its plans: test_loop_plan.py): the loop on the CPU EP against the host loop on the shipped digits
package, a learned-variance latent package and an EDM package, the update graph's forms, the capture gate's wiring and
the generate()/diffit-run hook (the non-finite stop and CUDA: test_device_loop_nonfinite.py, test_device_loop_cuda.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffit_port import samplers
from diffit_port.package import default_package_path, load_package
from diffit_port.runtimes import create_denoiser
from diffit_port.runtimes.device_loop import DeviceLoop
from diffit_port.runtimes.generate import SamplingConfig, check_config, default_labels, generate
from diffit_port.runtimes.loop_graph import LoopSpec, _write_outputs, attached
from diffit_port.runtimes.loop_plan import make_plan
from loop_helpers import EDM_SAMPLERS, LOOP_TOL, SHIPPED_SAMPLERS, host_and_device, poisoned_edm_loop
from runtime_helpers import package_path

# --------------------------------------------------------------------------------------------------
# The loop on the CPU EP against the host loop
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    package = load_package(default_package_path())
    return package, create_denoiser("onnx-cpu", package)


@pytest.mark.parametrize("sampler", SHIPPED_SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_device_loop_matches_host_loop_on_the_shipped_package(digits, sampler, guidance):
    package, d = digits
    y = np.array([1, 4, 7])
    clip = package.diffusion.prediction == "eps"      # the eps package's samplers clip x0; EDM's D is not clipped
    host, dev = host_and_device(d, package, sampler, 6, y, null_label=package.model.null_label, guidance=guidance,
                                clip_denoised=clip)
    assert dev.dtype == np.float32 and dev.shape == host.shape
    # real digit samples, not a constant (unclipped EDM samples overshoot [-1, 1] a little at 6 steps)
    assert float(host.std()) > 0.3 and np.abs(host).max() <= (1.0 + 1e-6 if clip else 2.0)
    err = float(np.abs(dev - host).max())
    print(f"\n{sampler} guidance {guidance}: device vs host loop max|diff| {err:.2e}")
    assert err <= LOOP_TOL


def test_device_loop_learned_variance_and_partial_guidance(tmp_path_factory):
    """tiny-latent: 2C outputs (learned variance in ddpm's noise scale), 3 of 4 channels guided, no clipping;
    ddim with eta > 0 takes the per-step noise path too."""
    package = load_package(package_path("tiny-latent", tmp_path_factory))
    d = create_denoiser("onnx-cpu", package)
    y = np.array([0, 5])
    kw = dict(null_label=package.model.null_label, guidance=2.0, guide_channels=3, clip_denoised=False)
    schedule = samplers.Schedule.from_config(package.diffusion)
    for sampler, extra in (("ddpm", {}), ("ddim", dict(eta=0.5))):
        host, dev = host_and_device(d, package, sampler, 5, y, **kw, **extra)
        scale = max(1.0, float(np.abs(host).max()))
        err = float(np.abs(dev - host).max())
        print(f"\ntiny-latent {sampler}: device vs host {err:.2e} (|x| up to {scale:.1f})")
        assert err <= LOOP_TOL * scale, sampler
        # the per-step noise is used: the same x_T (stream 0 of seed 7) with the deterministic ddim differs
        ddim = d.device_loop.sample("ddim", samplers.NoiseSource(7, 2), (2, 4, 8, 8), y, schedule, 5, **kw)
        assert np.abs(ddim - dev).max() > 1e-2 * scale


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
def test_device_loop_matches_host_loop_on_an_edm_package(sampler, tmp_path_factory):
    """tiny-edm (x, sigma, y -> D): every EDM sampler, guidance off and on, D clipped and not; edm-stochastic
    also with a churn from the first step on (the first state's noise) and its per-step noise path."""
    package = load_package(package_path("tiny-edm", tmp_path_factory))
    # One session, so that the host loop's calls see the rows the device loop's do: split over two streams a row
    # moves at float32 rounding level with the rows beside it, which the churn grows to 0.7-1.4e-5 here.
    d = create_denoiser("onnx-cpu", package, streams=1)
    y = np.array([2, 5, 9])
    cases = [dict(guidance=1.0), dict(guidance=1.5), dict(guidance=1.5, clip_denoised=True)]
    if sampler == "edm-stochastic":
        cases.append(dict(guidance=1.5, churn=samplers.Churn(s_churn=30.0, s_max=100.0)))
    for kw in [*cases, dict(guidance=1.0, steps=1)]:   # one step: every used column of dpmpp-2m is 1
        kw = dict(kw)
        host, dev = host_and_device(d, package, sampler, kw.pop("steps", 6), y, null_label=package.model.null_label,
                                    **kw)
        assert float(host.std()) > 0.1
        err = float(np.abs(dev - host).max())
        print(f"\ntiny-edm {sampler} {kw}: device vs host loop max|diff| {err:.2e}")
        assert err <= LOOP_TOL, kw


@pytest.mark.parametrize("kind", ["tiny", "shipped"])
def test_matrix_update_matches_the_host_loop_bit_for_bit(kind, tmp_path_factory):
    """One session (no row split, so host and device run the same rows): the matrix update feeds the denoiser the
    very inputs the host loop does, guided or not, so the samples agree to the last bit or two (the float64 sums
    may round apart in rare elements). Without the float32 rounding of the guided output they were 2e-6 to 8e-6
    apart. eps (tiny, unclipped) and EDM (the shipped package) samplers; the column update as the reference."""
    package = load_package(default_package_path() if kind == "shipped" else package_path("tiny", tmp_path_factory))
    d = create_denoiser("onnx-cpu", package, streams=1)
    names = samplers.SAMPLERS_BY_PREDICTION[package.diffusion.prediction]
    y = np.array([1, 4, 7])
    for sampler in sorted(names):
        for guidance in (1.0, 1.5):
            kw = dict(null_label=package.model.null_label, guidance=guidance, clip_denoised=False)
            host, dev = host_and_device(d, package, sampler, 5, y, **kw)
            assert any(s.matrix() for s in d.device_loop._sessions), "the matrix update did not run"
            err = float(np.abs(dev - host).max())
            print(f"\n{kind} {sampler} guidance {guidance}: matrix update vs host loop {err:.2e}")
            assert err <= 3e-7 * max(1.0, float(np.abs(host).max())), (sampler, guidance)
    d.device_loop.fused_update = False
    host, dev = host_and_device(d, package, sorted(names)[0], 5, y, null_label=package.model.null_label, guidance=1.5)
    assert not any(s.matrix() for s in d.device_loop._sessions if not s.fused)
    assert float(np.abs(dev - host).max()) <= 3e-7 * max(1.0, float(np.abs(host).max()))


def test_updates_write_their_outputs_without_copies():
    """The shipped package's default sampling (EDM DPM-Solver++(2M), guided), both forms of the update attached to
    the same graph: each graph output of the update is written by the node that computes it (an Identity onto a
    graph output is a device copy on CUDA), and the matrix form runs fewer kernel nodes (Reshape and Squeeze are
    views on CUDA): 25 against 30 (32 before the column update's sums of three terms became one Sum node and its
    codes were made from n + 1; 38 while it copied its outputs)."""
    plan = make_plan("dpmpp-2m", samplers.EDMSchedule(), 10, clip=False, guidance=1.5)
    model = onnx.load(str(default_package_path() / "denoiser.onnx"))
    counts = {}
    for fused in (True, False):
        spec = LoopSpec(plan.used(), False, False, True, 1, 1, 1, fused=fused)
        with attached(model, spec) as merged:
            assert spec.matrix() == fused
            nodes = [nd for nd in merged.graph.node if nd.name.startswith("loop/")]
            counts[fused] = sum(nd.op_type not in ("Reshape", "Squeeze") for nd in nodes)
            assert not any(nd.op_type == "Identity" for nd in nodes)
            outs = {o.name for o in merged.graph.output}
            assert outs >= {"loop/x_in", "loop/t_in", "loop/n_out", "loop/bad_out", "loop/x_out", "loop/hist_out"}
            assert sorted(o for nd in nodes for o in nd.output if o in outs) == sorted(outs)
    print(f"\nupdate nodes: matrix {counts[True]}, columns {counts[False]}")
    assert counts[True] < counts[False] == 30


def test_outputs_that_are_not_the_updates_own_are_copied():
    """_write_outputs renames an update node's tensor to the graph output it holds, and copies (Identity) where it
    should not: a graph input, a view (a Reshape's output), a tensor that already holds another output. The graph
    runs and gives each output."""
    import onnxruntime as ort

    f = TensorProto.FLOAT
    shape = numpy_helper.from_array(np.array([2], np.int64), "shape")
    nodes = [helper.make_node("Add", ["a", "a"], ["loop/sum"], name="loop/Add"),
             helper.make_node("Mul", ["loop/sum", "a"], ["loop/prod"], name="loop/Mul"),
             helper.make_node("Reshape", ["loop/prod", "shape"], ["loop/view"], name="loop/Reshape")]
    names = ("loop/s_out", "loop/t_out", "loop/p_out", "loop/v_out", "loop/a_out")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", f, [2])],
                          [helper.make_tensor_value_info(n, f, [2]) for n in names], [shape])
    _write_outputs(g, dict(zip(names, ("loop/sum", "loop/sum", "loop/prod", "loop/view", "a"))))
    assert [nd.op_type for nd in g.node] == ["Add", "Mul", "Reshape", "Identity", "Identity", "Identity"]
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.array([1.0, 3.0], np.float32)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"a": a})))
    for name, want in zip(names, (2 * a, 2 * a, 2 * a * a, 2 * a * a, a)):
        np.testing.assert_array_equal(got[name], want)


def test_defaults_follow_the_measurements():
    """The matrix update is the default on the CPU EP, the column update on CUDA (no faster there, round 11); the
    next batch is prepared ahead by default only with CUDA graphs (measured there; a worker thread would take a
    core from the denoiser on a small CPU host). Either is the caller's to choose."""
    opened = []

    def loop(device, **kw):
        return DeviceLoop(opened.append, device=device, out_channels=1, **kw)
    assert loop("cpu").fused_update and not loop("cuda").fused_update
    assert loop("cuda", fused_update=True).fused_update and not loop("cpu", fused_update=False).fused_update
    assert loop("cuda", cuda_graph=True).ahead
    assert not loop("cuda").ahead and not loop("cpu").ahead
    assert not loop("cuda", cuda_graph=True, ahead=False).ahead and loop("cpu", ahead=True).ahead
    assert not opened     # nothing opened a session


def test_columns_of_ones_leave_the_table():
    """EDM's a_o (and DPM-Solver++'s h_d) are 1 in every call: the update adds their terms without a multiply and
    the coefficient table drops them; the device loop matches the host loop on them (the tests above)."""
    schedule = samplers.EDMSchedule()
    heun, dpm = (make_plan(s, schedule, 5, clip=False) for s in ("heun", "dpmpp-2m"))
    assert heun.ones() == ("a_o",) and dpm.ones() == ("a_o", "h_d")
    model = onnx.load(str(default_package_path() / "denoiser.onnx"))
    cols = tuple(c for c in dpm.used() if c not in dpm.ones())
    muls = {}
    for ones in ((), dpm.ones()):
        spec = LoopSpec(cols if ones else dpm.used(), False, False, False, 1, 1, 1, ones, fused=False)
        with attached(model, spec) as merged:
            coef = next(i for i in merged.graph.input if i.name == "loop/coef")
            assert coef.type.tensor_type.shape.dim[1].dim_value == len(spec.columns)
            muls[ones] = sum(nd.op_type == "Mul" for nd in merged.graph.node if nd.name.startswith("loop/"))
    assert muls[dpm.ones()] == muls[()] - 2


def test_batches_prepared_ahead_match_batches_one_by_one():
    """iter_batches with `ahead`: the next batch's host inputs drawn and uploaded by the worker into the other set
    of buffers while a batch runs. Three batches (3, 3, 1 images: the last one's buffers are made by the worker)
    give exactly the samples of batches run one after another, and the host loop's."""
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cpu", package, streams=1)
    schedule = samplers.schedule_from_config(package.diffusion)
    y = np.arange(7) % 10
    kw = dict(null_label=package.model.null_label, guidance=1.5)
    runs = {}
    for ahead in (False, True):
        d.device_loop.ahead = ahead
        got = list(d.device_loop.iter_batches("dpmpp-2m", samplers.NoiseSource(3, 7), (1, 32, 32), y, schedule, 4,
                                              batch_size=3, **kw))
        assert [a for a, _ in got] == [0, 3, 6]
        runs[ahead] = np.concatenate([x for _, x in got])
    assert {k[3] for k in d.device_loop._buffers} == {0, 1}
    assert {"ahead_s", "waited_s"} <= set(d.device_loop.timings)
    assert np.array_equal(runs[True], runs[False])
    host = samplers.sample_batches("dpmpp-2m", d, samplers.NoiseSource(3, 7), (1, 32, 32), y, schedule, 4,
                                   batch_size=3, **kw)
    assert np.abs(runs[True] - host).max() <= LOOP_TOL
    d.close()


def test_calls_chained_in_one_run_match_one_call_a_run():
    """calls_per_run: several denoiser calls and their updates chained in one session run (loop_graph.chain_steps),
    the calls that do not fill a run made one at a time; the samples equal those of one call a run, and the progress
    callback still ticks once per call."""
    package = load_package(default_package_path())
    d = create_denoiser("onnx-cpu", package, streams=1)
    schedule = samplers.schedule_from_config(package.diffusion)
    y = np.array([3, 8])
    for sampler, steps in (("dpmpp-2m", 10), ("heun", 6)):          # 10 calls: runs of 3, 3, 3, 1; 11: 4, 4, 1, 1, 1
        got = {}
        for k in (1, 3 if sampler == "dpmpp-2m" else 4):
            d.device_loop.calls_per_run = k
            ticks = []
            got[k] = d.device_loop.sample(sampler, samplers.NoiseSource(5, 2), (2, 1, 32, 32), y, schedule, steps,
                                          null_label=10, guidance=1.5, callback=lambda n, total: ticks.append(n))
            assert ticks == list(range(samplers.num_denoiser_calls(sampler, steps)))
        assert any(s.steps > 1 for s in d.device_loop._sessions)
        assert np.array_equal(got[1], list(got.values())[1]), sampler
    d.close()


def test_chained_calls_stop_at_the_same_call():
    schedule, loop = samplers.EDMSchedule(), poisoned_edm_loop(6, calls_per_run=4)
    with pytest.raises(samplers.NonFiniteError) as e:
        loop.sample("dpmpp-2m", samplers.NoiseSource(0, 2), (2, 1, 4, 4), np.zeros(2, np.int64), schedule, 6)
    assert (e.value.what, e.value.step) == ("denoiser output", 2)


def test_a_failed_batch_stops_the_batches_prepared_ahead():
    """A non-finite value in the first of three batches: iter_batches raises it after the worker has finished the
    batch it was preparing, and the same loop then runs again."""
    schedule, loop = samplers.EDMSchedule(), poisoned_edm_loop(6, ahead=True)
    for _ in range(2):
        with pytest.raises(samplers.NonFiniteError) as e:
            for _ in loop.iter_batches("dpmpp-2m", samplers.NoiseSource(0, 6), (1, 4, 4), np.zeros(6, np.int64),
                                       schedule, 6, batch_size=2):
                pass
        assert (e.value.what, e.value.step) == ("denoiser output", 2)
    loop.close()


@pytest.mark.parametrize("steps", [3, 4])
def test_step_seconds_and_timings(digits, steps):
    """The benchmark hooks: per-batch timings, and step_seconds() re-running the last call of the batch (valid
    for an odd and an even number of calls) without changing what the next batch computes."""
    package, d = digits
    schedule = samplers.schedule_from_config(package.diffusion)
    y = np.array([2, 3])
    run = lambda: d.device_loop.sample("dpmpp-2m", samplers.NoiseSource(1, 2), (2, 1, 32, 32), y, schedule,  # noqa: E731
                                       steps)
    first = run()
    assert set(d.device_loop.timings) == {"host_inputs_s", "upload_s", "calls_s", "checks_s", "download_s"}
    assert d.device_loop.step_seconds(reps=2) > 0
    assert np.array_equal(run(), first)


def test_attached_update_leaves_the_model_as_it_was():
    model = onnx.load(str(default_package_path() / "denoiser.onnx"))
    before = model.SerializeToString()
    spec = LoopSpec(("s", "a_x", "a_o", "c_d", "c_x", "c_h", "h_d"), True, True, True, 1, 1, 1)
    with attached(model, spec) as merged:
        assert any(i.name == "loop/coef" for i in merged.graph.input)
        assert [o.name for o in merged.graph.output][0] == "loop/x_in"
    assert model.SerializeToString() == before


def test_attached_update_that_fails_partway_leaves_the_model_as_it_was(monkeypatch):
    """The model is shared by every session of a runtime: an attach that raises after adding inputs and nodes
    takes them out again."""
    from diffit_port.runtimes import loop_graph

    def fail(*args):
        raise RuntimeError("attach failed")

    model = onnx.load(str(default_package_path() / "denoiser.onnx"))
    before = model.SerializeToString()
    monkeypatch.setattr(loop_graph, "_write_outputs", fail)     # after the update's inputs and nodes are added
    spec = LoopSpec(("s",), False, False, False, 1, 1, 1)
    with pytest.raises(RuntimeError, match="attach failed"), attached(model, spec):
        pass
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------------------------------
# The hook in generate() and diffit-run
# --------------------------------------------------------------------------------------------------

def test_generate_with_the_device_loop(digits, tmp_path_factory):
    package, d = digits
    cfg = SamplingConfig.from_package(package, steps=4, num_images=5, batch_size=3)
    labels = default_labels(package, 5)
    calls = []
    host = generate([d], package, cfg, labels)
    dev = generate([d], package, SamplingConfig(**{**cfg.to_dict(), "device_loop": True}), labels,
                   on_call=lambda: calls.append(1))
    assert len(calls) == 2 * 4       # two batches (3 + 2) of 4 calls, ticked from the device loop
    assert np.abs(dev - host).max() <= LOOP_TOL
    torch_like = type("NoLoop", (), {"name": "openvino", "__call__": d.__call__})()
    with pytest.raises(ValueError, match="no device loop"):
        generate([torch_like], package, SamplingConfig(**{**cfg.to_dict(), "device_loop": True}), labels)
    in_graph = SamplingConfig(**{**cfg.to_dict(), "device_loop": True, "cfg": "in-graph"})
    with pytest.raises(ValueError, match="sampler-side guidance only"):
        check_config(load_package(package_path("tiny", tmp_path_factory)), in_graph)


def test_run_cli_device_loop(tmp_path):
    from click.testing import CliRunner

    from diffit_port.runtimes.cli import main

    args = ["--runtime", "onnx-cpu", "--num-images", "2", "--steps", "3", "--no-progress"]
    runner = CliRunner()
    a = runner.invoke(main, [*args, "--device-loop", "--output", str(tmp_path / "a.png"),
                             "--save-npy", str(tmp_path / "a.npy")])
    b = runner.invoke(main, [*args, "--output", str(tmp_path / "b.png"), "--save-npy", str(tmp_path / "b.npy")])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert np.abs(np.load(tmp_path / "a.npy") - np.load(tmp_path / "b.npy")).max() <= LOOP_TOL
    dry = runner.invoke(main, [*args, "--device-loop", "--dry-run"])
    assert dry.exit_code == 0 and json.loads(dry.output)["sampling"]["device_loop"] is True
    bad = runner.invoke(main, ["--runtime", "openvino", "--device-loop", "--output", str(tmp_path / "c.png")])
    assert bad.exit_code == 2 and "--device-loop applies to onnx-cpu and onnx-cuda" in bad.output


