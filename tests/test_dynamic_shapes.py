"""dynamic=True: a whole sampling loop over changing batch, resolution and text length compiles once."""

import pytest
import torch

import lynx_compile
from lynx_compile.models import build, example_inputs


@pytest.mark.parametrize(
    "name,overrides,shapes",
    [
        # The first shapes avoid sizes equal to a weight dim: Dynamo's duck shaping would give
        # them one symbol and specialise both (README, limits).
        ("mmdit-tiny", dict(depth=1, single_depth=1), [(2, 192, 16), (3, 256, 16), (2, 128, 24), (4, 320, 40)]),
        ("pixart-xl-2", dict(depth=1, hidden=256, caption_channels=64), [(2, 192, 8), (3, 128, 8), (2, 256, 12), (4, 320, 20)]),
        ("dit-s-2", dict(depth=1, hidden=256), [(2, None, None), (3, None, None), (5, None, None)]),
    ],
)
def test_changing_batch_resolution_and_text_length_does_not_recompile(name, overrides, shapes):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, **overrides).eval()
    backend = lynx_compile.LynxBackend(lynx_compile.LynxConfig(min_features=0), inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for step, (batch, resolution, text) in enumerate(shapes):
            inputs = example_inputs(model, batch=batch, resolution=resolution, text_tokens=text, seed=step)
            out = compiled(*inputs)
            assert out.shape[0] == batch
    assert backend.report.graphs == 1
    assert backend.report.sparse
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
