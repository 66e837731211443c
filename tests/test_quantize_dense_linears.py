"""passes/quantize_dense_linears.py: dense layers on FP8 dense GEMMs at precision "fp8", the others say why not."""

import torch
import torch.nn as nn
from conftest import relative_error

import lynx_compile
from lynx_compile import LynxConfig


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 40)).eval().to(torch.bfloat16)


def compile_with(config, x, inductor=False):
    torch._dynamo.reset()  # nn.Sequential.forward is compiled by other test files too: no recompile limit here
    backend = lynx_compile.LynxBackend(config, inductor=inductor, warn=False)
    with torch.no_grad():
        return torch.compile(model(), backend=backend, fullgraph=True)(x), backend


def test_dense_layers_run_fp8_where_the_gemm_takes_them_and_say_why_not_elsewhere():
    x = torch.randn(3, 9, 64, dtype=torch.bfloat16)
    out, backend = compile_with(LynxConfig(precision="fp8"), x)
    up, down = backend.report.layers
    assert (up.decision, up.precision) == ("dense", "e4m3")
    assert down.precision == "bfloat16" and "not FP8: 128 -> 40 features not multiples of 16" in down.reason
    targets = [node.target for gm in backend.graph_modules for node in gm.graph.nodes if node.op == "call_function"]
    assert torch.ops.lynx.e4m3_linear.default in targets
    assert "precision" in backend.report.table()
    with torch.no_grad():
        expected = model()(x)
    assert relative_error(out, expected) < 0.05


def test_native_precision_leaves_dense_layers_alone():
    x = torch.randn(3, 9, 64, dtype=torch.bfloat16)
    out, backend = compile_with(LynxConfig(), x)
    assert [layer.precision for layer in backend.report.layers] == ["bfloat16", "bfloat16"]
    assert "precision" not in backend.report.table()
    with torch.no_grad():
        assert torch.equal(out, model()(x))


def test_fp8_dense_compiles_with_inductor():
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    out, _ = compile_with(LynxConfig(precision="fp8"), x, inductor=True)
    with torch.no_grad():
        expected = model()(x)
    assert relative_error(out, expected) < 0.05
