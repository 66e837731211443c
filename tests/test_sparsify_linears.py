"""passes/sparsify_linears.py: one lynx op per sparse layer, LoRA factors folded in, factors checked against the layer."""

import pytest
import torch
import torch.nn as nn
from conftest import D, relative_error

import lynx_compile
from lynx_compile import LynxConfig


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D), nn.LayerNorm(D)).eval()


def lynx_ops(backend):
    return [str(node.target) for gm in backend.graph_modules for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lynx.")]


def compile_and_run(model, config, x):
    """The graph as sparsify_linears leaves it: fuse_producers off (its rewrite is test_fuse_producers.py's)."""
    torch._dynamo.reset()  # nn.Sequential.forward is compiled by other test files too: no recompile limit here
    backend = lynx_compile.LynxBackend(config.with_options({"fuse_producers": False}), inductor=False)
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(x), backend


def test_each_sparse_layer_becomes_one_lynx_op_and_dense_ones_stay_linear():
    x = torch.randn(2, 5, D)
    out, backend = compile_and_run(mlp(), LynxConfig(exclude="^3$"), x)
    assert [(l.name, l.decision, l.reason) for l in backend.report.layers][1] == ("3", "dense", "matched by exclude")
    assert backend.report.layers[0].decision == "sparse"
    assert lynx_ops(backend) == ["lynx.sparse_linear.default"]
    model = mlp()
    with torch.no_grad():
        hidden = torch.ops.lynx.sparse_linear(model[0](x), model[1].weight, model[1].bias, 2, 4, True)
        expected = model[4](model[3](model[2](hidden)))
    assert relative_error(out, expected) < 1e-6


def test_lora_factors_ride_in_the_sparse_op_and_layers_without_them_fall_back_to_norm():
    model, x = mlp(), torch.randn(2, 5, D)
    down, up = torch.randn(8, D) / D, torch.randn(4 * D, 8) / 8
    config = LynxConfig(compensation="lora", compensation_state={"1": (down, up)})
    out, backend = compile_and_run(model, config, x)
    assert lynx_ops(backend) == ["lynx.sparse_linear_lora.default", "lynx.sparse_linear.default"]
    fc1, fc2 = backend.report.layers
    assert fc1.compensation == "lora"
    assert fc2.compensation == "norm" and fc2.reason.endswith("; no LoRA factors for this layer, norm compensation only")
    with torch.no_grad():
        hidden = torch.ops.lynx.sparse_linear(model[0](x), model[1].weight, model[1].bias, 2, 4, True, 1e-12, down, up)
        expected = model[4](torch.ops.lynx.sparse_linear(model[2](hidden), model[3].weight, model[3].bias, 2, 4, True))
    assert relative_error(out, expected) < 1e-5


def test_lora_factors_that_do_not_fit_the_layer_name_it():
    config = LynxConfig(compensation="lora", compensation_state={"1": (torch.randn(8, D + 4), torch.randn(4 * D, 8))})
    with pytest.raises(Exception, match=r"LoRA factors of layer '1' do not fit its weight \(1024, 256\): lora_down \(8, 260\)"):
        compile_and_run(mlp(), config, torch.randn(2, 5, D))


def test_precision_fp8_gives_the_e4m3_op_with_the_weight_quantized_once():
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    model = mlp().to(torch.bfloat16)
    out, backend = compile_and_run(model, LynxConfig(include="^1$", precision="fp8"), x)
    # The sparse layer on the e4m3 sparse GEMM, the dense one on FP8 dense.
    assert lynx_ops(backend) == ["lynx.sparse_linear_e4m3.default", "lynx.e4m3_linear.default"]
    sparse = backend.report.layers[0]
    assert (sparse.decision, sparse.precision) == ("sparse", "e4m3")
    constants = {name: t for gm in backend.graph_modules for name, t in gm.named_buffers()}
    weight8 = next(t for name, t in constants.items() if name.endswith("weight_e4m3") and t.shape == (4 * D, D))
    w8, _ = lynx_compile.ops.quantize_weight_e4m3(model[1].weight)
    assert torch.equal(weight8.view(torch.uint8), w8.view(torch.uint8))
    with torch.no_grad():
        reference, _ = compile_and_run(model, LynxConfig(include="^1$"), x)
    assert relative_error(out, reference) < 0.08
