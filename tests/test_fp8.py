"""fp8.py: convert_to_fp8 puts e4m3 weights in the model, and the passes use those very tensors."""

import torch
import torch.nn as nn
from conftest import relative_error

import lynx_compile
from lynx_compile import E4M3Linear, LynxConfig, convert_to_fp8, models, ops


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 40)).eval()


def test_converts_the_linears_the_fp8_gemms_take_and_frees_their_16bit_weights():
    model = mlp().to(torch.bfloat16)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    assert convert_to_fp8(model) == ["1", "3"]  # 256 -> 40: not a multiple of 16
    assert isinstance(model[1], E4M3Linear) and isinstance(model[4], nn.Linear)
    assert model[1].weight.dtype == ops.E4M3 and model[1].weight_scale.shape == (512,)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert after < 0.6 * before
    assert convert_to_fp8(mlp()) == []  # fp32 layers stay as they are
    assert convert_to_fp8(mlp().to(torch.bfloat16), include="^3$") == ["3"]


def test_a_converted_layer_runs_fp8_dense_eagerly():
    model = mlp().to(torch.bfloat16)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        convert_to_fp8(model)
        assert relative_error(model(x), expected) < 0.06


def test_the_compiled_model_uses_the_models_own_e4m3_weights_and_matches_precision_fp8():
    torch.manual_seed(0)
    model = models.build("dit-s-2", depth=1, input_size=8).eval().to(torch.bfloat16)
    args = models.example_inputs(model, batch=2, dtype=torch.bfloat16)
    config = LynxConfig(precision="fp8")
    torch._dynamo.reset()
    unconverted = lynx_compile.LynxBackend(config, inductor=False)
    with torch.no_grad():
        expected = torch.compile(model, backend=unconverted)(*args)
        convert_to_fp8(model)
        torch._dynamo.reset()
        converted = lynx_compile.LynxBackend(LynxConfig(), inductor=False)  # e4m3 weights run e4m3 at any precision
        out = torch.compile(model, backend=converted)(*args)
    decisions = [(layer.name, layer.role, layer.decision, layer.precision) for layer in converted.report.layers]
    assert decisions == [(layer.name, layer.role, layer.decision, layer.precision) for layer in unconverted.report.layers]
    assert any(decision == "sparse" for _, _, decision, _ in decisions)
    made_here = [name for gm in converted.graph_modules for name, _ in gm.named_buffers() if "e4m3" in name]
    assert made_here == [], "no e4m3 copy of a converted weight"
    torch.testing.assert_close(out, expected)
