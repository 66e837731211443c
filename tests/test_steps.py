"""Timestep-adaptive sparsity: the step schedule, its runtime switch, the dense twins, step costs, lynx-bench --steps."""

import json
import re
import warnings

import pytest
import torch
from conftest import relative_error
from torch._dynamo.utils import counters

import lynx_compile
from lynx_compile import LynxBackend, LynxConfig, LynxWarning, StepSchedule, dense_forward, measure_step_costs
from lynx_compile.diffusion import NoiseSchedule, ddim_sample
from lynx_compile.models import build
from lynx_compile.steps import SWITCH
from lynx_compile.tools import bench


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build("dit-s-2", depth=1, hidden=256, heads=4, input_size=8, in_channels=1, num_classes=10,
                 learn_sigma=False).eval()


class CountingBackend(LynxBackend):
    """Counts Dynamo's calls of the backend and the graphs it hands Inductor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend_calls = self.compiles = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.backend_calls += 1
        return super().__call__(gm, example_inputs, **kwargs)

    def _compile(self, gm, example_inputs, mode):
        self.compiles += 1
        return super()._compile(gm, example_inputs, mode)


class SwitchProbe(torch.nn.Module):
    """Records, per call, whether the switch asks for dense; stands in for a twin-compiled graph."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(SWITCH.dense)
        SWITCH.twin_ran = SWITCH.twin_ran or SWITCH.dense
        return x


def test_a_sampling_loop_switches_per_step_in_one_compile_without_recompiles(tiny):
    torch._dynamo.reset()
    counters.clear()
    schedule = StepSchedule(5, {0, 3})
    backend = CountingBackend(LynxConfig(step_schedule=schedule))
    compiled = torch.compile(tiny, backend=backend)
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([900, 400]), torch.tensor([1, 7])
    inputs, outputs = [], []
    with torch.no_grad(), schedule.apply(compiled) as sampling:
        for step in range(schedule.num_steps):
            inputs.append(x)
            outputs.append(compiled(x, t - 100 * step, y))
            x = x - 0.2 * outputs[-1]
    assert (sampling.calls, sampling.dense_calls) == (5, 2)
    # One Dynamo frame, compiled once: the lynx graph and its dense twin, both through Inductor.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert (backend.backend_calls, backend.compiles) == (1, 2)
    # The report describes the lynx graph once; the twin's all-dense decisions are not in it.
    assert backend.report.graphs == 1 and len(backend.report.sparse) == 3
    with torch.no_grad():
        for step, (x, out) in enumerate(zip(inputs, outputs)):
            dense = tiny(x, t - 100 * step, y)
            sparse = compiled(x, t - 100 * step, y)  # outside the context: sparse
            if step in schedule.dense_steps:
                assert relative_error(out, dense) < 1e-5, step
            else:
                assert relative_error(out, sparse) < 1e-6 and relative_error(out, dense) > 1e-2, step
            with dense_forward():
                assert relative_error(compiled(x, t - 100 * step, y), dense) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_without_a_schedule_nothing_is_compiled_twice(tiny):
    torch._dynamo.reset()
    backend = CountingBackend(LynxConfig(), inductor=False)
    compiled = torch.compile(tiny, backend=backend)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([900, 400]), torch.tensor([1, 7])
    with torch.no_grad():
        sparse = compiled(x, t, y)
        with dense_forward():
            assert torch.equal(compiled(x, t, y), sparse)  # no twin: the switch has nothing to pick
    assert backend.compiles == 1 and len(backend.graph_modules) == 1


def test_options_carry_the_schedule_and_the_sampler_runs_it(tiny):
    torch._dynamo.reset()
    schedule = StepSchedule(4, {0, 1})
    compiled = torch.compile(tiny, backend=lynx_compile.backend(step_schedule=schedule))
    noise, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 5])
    noise_schedule = NoiseSchedule.linear()

    def sample(model):
        return ddim_sample(model, noise_schedule, noise, labels, steps=4, guidance_scale=2.0, null_class=10)

    with torch.no_grad():
        dense, sparse = sample(tiny), sample(compiled)
    with schedule.apply(compiled) as sampling:
        scheduled = sample(compiled)
    assert sampling.calls == 4 and sampling.dense_calls == 2
    assert 0 < relative_error(scheduled, dense) < relative_error(sparse, dense)


def test_outside_the_context_every_call_is_sparse_and_contexts_restore_the_switch():
    probe = SwitchProbe()
    probe(0)
    with StepSchedule(3, {1}, calls_per_step=2).apply(probe) as sampling:
        for _ in range(6):
            probe(0)
    probe(0)
    assert probe.seen == [False, False, False, True, True, False, False, False]
    assert (sampling.calls, sampling.dense_calls) == (6, 2)
    assert not probe._forward_pre_hooks and not probe._forward_hooks and SWITCH.dense is False

    probe.seen.clear()
    with dense_forward():
        probe(0)
        with StepSchedule(2, {1}).apply(probe):
            probe(0)  # the schedule decides its own calls...
            assert SWITCH.dense is True  # ...and between them the switch is the enclosing block's
            probe(0)
        with dense_forward(False):
            probe(0)
        probe(0)
    assert probe.seen == [True, False, True, False, True] and SWITCH.dense is False

    # Nested on the same module, the inner schedule decides; each restores what it found.
    probe.seen.clear()
    with StepSchedule(2, {0}).apply(probe), StepSchedule(2, {1}).apply(probe):
        probe(0), probe(0)
    assert probe.seen == [False, True] and SWITCH.dense is False and not probe._forward_pre_hooks


def test_a_schedule_on_a_pipeline_hooks_its_transformer_and_several_runs_repeat_it():
    class Pipeline:
        transformer = SwitchProbe()

    pipe = Pipeline()
    with StepSchedule(3, {0}).apply(pipe):
        for _ in range(6):
            pipe.transformer(0)
    assert pipe.transformer.seen == [True, False, False] * 2


def test_mismatched_runs_and_missing_twins_warn():
    probe = SwitchProbe()
    with pytest.warns(LynxWarning, match="not a whole number of runs"):
        with StepSchedule(4, {0}).apply(probe):
            probe(0)
    plain = torch.nn.Identity()
    with pytest.warns(LynxWarning, match="no lynx graph with a dense twin"):
        with StepSchedule(1, {0}).apply(plain):
            plain(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with StepSchedule(2, {0}).apply(probe):
            probe(0), probe(0)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: StepSchedule(4, {4}), r"StepSchedule.dense_steps: steps \[4\] are outside \[0, 4\)"),
        (lambda: StepSchedule(4, {-1}), r"steps \[-1\] are outside"),
        (lambda: StepSchedule(0), "StepSchedule.num_steps: expected an int >= 1"),
        (lambda: StepSchedule(4, "0,1"), "StepSchedule.dense_steps: expected a set of step indices"),
        (lambda: StepSchedule(4, calls_per_step=0), "StepSchedule.calls_per_step"),
        (lambda: StepSchedule.from_costs([1.0, 2.0], sparse_fraction=1.5), r"sparse_fraction must be in \[0, 1\]"),
        (lambda: StepSchedule.from_costs([1.0, 2.0], sparse_fraction=-0.1), r"sparse_fraction must be in \[0, 1\]"),
        (lambda: StepSchedule.from_costs([1.0, 2.0], num_dense=3), r"num_dense must be an int in \[0, 2\]"),
        (lambda: StepSchedule.from_costs([1.0, 2.0]), "exactly one of"),
        (lambda: StepSchedule.from_costs([], sparse_fraction=0.5), "one real cost per step"),
        (lambda: StepSchedule(2).apply(object()), "StepSchedule.apply: expected the compiled transformer"),
        (lambda: LynxConfig(step_schedule={0, 1}), "LynxConfig.step_schedule"),
    ],
)
def test_a_bad_schedule_is_a_one_line_value_error(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_module_compile_is_refused_as_its_hooks_run_inside_dynamo():
    module = torch.nn.Linear(4, 4)
    module.compile(backend="eager")
    with pytest.raises(ValueError, match=r"module.compile\(\)"):
        StepSchedule(2).apply(module)


def test_from_costs_keeps_the_most_costly_steps_dense():
    costs = [0.5, 0.1, 0.9, 0.1, 0.3]
    assert StepSchedule.from_costs(costs, sparse_fraction=0.6).dense_steps == {0, 2}
    assert StepSchedule.from_costs(costs, num_dense=3).dense_steps == {0, 2, 4}
    assert StepSchedule.from_costs(costs, num_dense=4).dense_steps == {0, 1, 2, 4}  # a tie keeps the earlier step
    assert StepSchedule.from_costs(costs, sparse_fraction=1.0).dense_steps == frozenset()
    everything = StepSchedule.from_costs(costs, sparse_fraction=0.0, calls_per_step=2)
    assert everything.dense_steps == set(range(5)) and everything.calls_per_step == 2 and everything.sparse_fraction == 0
    assert StepSchedule(25, range(5)).sparse_fraction == pytest.approx(0.8)
    assert str(StepSchedule(4, {3, 0})) == "2/4 steps sparse (dense: 0,3)"


def test_step_costs_rank_each_step_by_what_it_costs_the_sample():
    # A toy sampler whose sparse steps each add a known error: step i sparse adds weights[i].
    weights = torch.tensor([0.4, 0.1, 0.0, 0.3])
    model = SwitchProbe()

    def sample():
        calls = len(model.seen)
        for _ in range(4):
            model(0)
        sparse = torch.tensor([not dense for dense in model.seen[calls:]])
        return torch.ones(4) + weights * sparse

    costs = measure_step_costs(sample, model, 4)
    assert costs == pytest.approx((weights / 2).tolist())  # relative error against the all-dense sample ||1|| = 2
    assert StepSchedule.from_costs(costs, num_dense=2).dense_steps == {0, 3}
    gains = measure_step_costs(sample, model, 4, isolate="dense")
    assert StepSchedule.from_costs(gains, num_dense=2).dense_steps == {0, 3}
    with pytest.raises(ValueError, match="isolate must be"):
        measure_step_costs(sample, model, 4, isolate="both")


def test_step_costs_of_a_compiled_sampler(tiny):
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend=LynxBackend(LynxConfig(step_schedule=StepSchedule(3)), inductor=False))
    noise, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 5])
    costs = measure_step_costs(lambda: ddim_sample(compiled, NoiseSchedule.linear(), noise, labels, steps=3), compiled, 3)
    assert len(costs) == 3 and all(cost > 0 for cost in costs)


def test_bench_times_the_sampling_loop_under_a_schedule(tmp_path, capsys):
    rc = bench.main(["--quick", "--model", "dit-s-2", "--backends", "eager,lynx-norm", "--warmup", "1", "--repeat", "1",
                     "--steps", "4", "--dense-steps", "0,1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "steps sparse" in printed and "dense step ms" in printed
    result = json.loads(next(tmp_path.glob("bench-dit-s-2-quick-cpu.json")).read_text())
    assert result["steps"] == 4 and result["step_schedule"] == "2/4 steps sparse (dense: 0,1)"
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["lynx-norm"]["step_schedule"] == "2/4" and rows["lynx-norm"]["dense_step_ms"] > 0
    assert rows["lynx-norm"]["sampling_s"] > 0 and rows["lynx-norm"]["latency_ms"] > 0
    assert rows["eager"]["step_schedule"] is None and rows["eager"]["sampling_s"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dense-steps", "0,1"], "need --steps N"),
        (["--steps", "4", "--dense-steps", "0,9"], r"steps \[9\] are outside \[0, 4\)"),
        (["--steps", "4", "--dense-steps", "first"], "--dense-steps: expected comma-separated step indices"),
        (["--steps", "4", "--sparse-fraction", "2"], r"sparse_fraction must be in \[0, 1\]"),
        (["--steps", "4", "--sparse-fraction", "0.5", "--dense-steps", "0"], "give one of --dense-steps and --sparse-fraction"),
    ],
)
def test_bad_schedule_options_are_one_line_errors(argv, message, capsys):
    assert bench.main(["--quick", "--no-save", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lynx-bench: error: ")
    assert re.search(message, err)


def test_sparse_fraction_keeps_the_first_steps_dense():
    args = bench.build_parser().parse_args(["--steps", "5", "--sparse-fraction", "0.6"])
    assert bench.step_schedule_from_args(args) == StepSchedule(5, {0, 1})
