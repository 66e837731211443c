"""backend="lynx" end to end on a GPU: the CUDA kernels inside a compiled DiT."""

import pytest
import torch
from conftest import relative_error, sparse_kernels_or_skip
from test_backend import reference_forward

import lynx_compile
from lynx_compile.models import build, example_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dit():
    sparse_kernels_or_skip()
    torch.manual_seed(0)
    # hidden 1152 as in DiT-XL: qkv and fc1 have enough output features to gain (speed_guard)
    return build("dit-s-2", depth=2, hidden=1152, heads=16).cuda().to(torch.bfloat16).eval()


def test_compiled_dit_runs_the_kernels_and_matches_the_reference(dit):
    inputs = example_inputs(dit, batch=8, dtype=torch.bfloat16, device="cuda", seed=1)
    backend = lynx_compile.backend()
    with torch.no_grad():
        out = torch.compile(dit, backend=backend, fullgraph=True)(*inputs)
    sparse = [l.name for l in backend.report.sparse]
    assert sparse and {l.reason for l in backend.report.sparse} == {"CUDA sparse kernel"}
    fc2 = next(l for l in backend.report.layers if l.name == "blocks.0.mlp.fc2")
    assert fc2.decision == "dense" and fc2.reason.startswith("speed_guard")
    # The reference: the same model in fp32 with hooks masking each sparse layer's input.
    fp32_inputs = [a.float() if a.is_floating_point() else a for a in inputs]
    reference = reference_forward(dit.float(), fp32_inputs, sparse)
    dense = reference_forward(dit, fp32_inputs, [])
    dit.to(torch.bfloat16)
    assert relative_error(out, reference) < 3e-2
    assert relative_error(out, dense) > 3 * relative_error(out, reference)


def test_reduce_overhead_replays_cuda_graphs_with_the_same_result(dit):
    inputs = example_inputs(dit, batch=4, dtype=torch.bfloat16, device="cuda", seed=2)
    with torch.no_grad():
        default = torch.compile(dit, backend="lynx")(*inputs).clone()
        torch._dynamo.reset()
        graphed = torch.compile(dit, backend="lynx", mode="reduce-overhead")
        runs = [graphed(*inputs).clone() for _ in range(4)]  # warm-up, record, replays
    # Replays repeat the recorded kernels bit for bit; against the separately compiled default
    # mode (its own Inductor kernel choices upstream) they agree to bf16 precision.
    torch.testing.assert_close(runs[-1], runs[-2], rtol=0, atol=0)
    assert relative_error(runs[-1], default) < 2e-2


def _memory_kept_by_compiling(model, backend):
    torch._dynamo.reset()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*example_inputs(model, batch=2, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def test_prepared_weights_do_not_duplicate_the_model_on_the_gpu(dit):
    weights = sum(p.numel() * p.element_size() for p in dit.parameters())
    inductor = _memory_kept_by_compiling(dit, "inductor")
    lynx = _memory_kept_by_compiling(dit, "lynx")
    # Whatever Inductor keeps (its own buffers) lynx may keep too, plus kernel workspace: far
    # below the one extra copy of the weights that a prepared/folded weight would cost.
    assert lynx - inductor < 0.1 * weights
