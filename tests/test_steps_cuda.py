"""Step schedules on the GPU under CUDA graphs (``mode="reduce-overhead"``): the lynx graph and its dense twin are
each recorded once, a sampling loop switches between their replays without recompiles, and every step returns
what its mode computes."""

import pytest
import torch
from conftest import relative_error
from torch._dynamo.utils import counters

from lynx_compile import LynxBackend, LynxConfig, StepSchedule, dense_forward
from lynx_compile.diffusion import NoiseSchedule, ddim_sample
from lynx_compile.models import build

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build("dit-s-2", depth=2, hidden=256, heads=4, input_size=16, in_channels=4, num_classes=10,
                 learn_sigma=False).eval().to("cuda", torch.bfloat16)


def test_a_sampling_loop_under_cuda_graphs_switches_per_step_without_recompiles(tiny):
    torch._dynamo.reset()
    counters.clear()
    schedule = StepSchedule(6, {0, 4, 5})
    backend = LynxBackend(LynxConfig(step_schedule=schedule, speed_guard=False))
    compiled = torch.compile(tiny, backend=backend, mode="reduce-overhead")
    noise = torch.randn(4, 4, 16, 16, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))
    labels = torch.tensor([1, 3, 5, 7], device="cuda")
    noise_schedule = NoiseSchedule.linear()

    def sample(model):
        return ddim_sample(model, noise_schedule, noise, labels, steps=schedule.num_steps, guidance_scale=1.0,
                           null_class=10)

    with torch.no_grad():
        dense = sample(tiny)
        for _ in range(3):  # warm-up, recording, replays: each run must give the same sample
            with schedule.apply(compiled) as sampling:
                scheduled = sample(compiled).clone()
            assert (sampling.calls, sampling.dense_calls) == (6, 3)
        with schedule.apply(compiled):
            assert torch.equal(sample(compiled), scheduled)
        sparse = sample(compiled).clone()
        with dense_forward():
            all_dense = sample(compiled).clone()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert backend.report.graphs == 1 and backend.report.sparse
    # The dense twin is the model itself (Inductor's bf16 rounding apart); the schedule lies between it and sparse.
    assert relative_error(all_dense, dense) < 2e-2
    assert relative_error(scheduled, dense) < relative_error(sparse, dense)
    assert relative_error(scheduled, sparse) > 1e-2
