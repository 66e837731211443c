"""passes/fuse_producers.py: the kernel producing a sparse layer's input moves into the layer's sparsify step."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Block, D, block_inputs, relative_error

import lynx_compile
from lynx_compile import LynxConfig


def lynx_ops(backend):
    return [str(node.target) for gm in backend.graph_modules for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lynx.")]


FUSED = LynxConfig(fuse_producers=True)


def run(model, args, config=FUSED, dynamic=False):
    torch._dynamo.reset()
    backend = lynx_compile.LynxBackend(config, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return out, backend


def producers(backend):
    return {layer.name: layer.producer for layer in backend.report.sparse}


def test_adaln_layer_norm_and_gelu_run_inside_the_sparsify_step_with_the_unfused_result(block):
    args = block_inputs()
    out, backend = run(block, args)
    assert producers(backend) == {"qkv": "fused layer_norm", "fc1": "fused layer_norm", "fc2": "fused gelu_tanh"}
    assert lynx_ops(backend) == ["lynx.producer_sparse_linear.default"] * 3
    graph_ops = {str(node.target) for gm in backend.graph_modules for node in gm.graph.nodes}
    assert "<built-in function gelu>" not in graph_ops, "the fused GELU's own node is gone"
    unfused, _ = run(block, args, LynxConfig(fuse_producers=False))
    assert relative_error(out, unfused) < 1e-5


class SharedInput(nn.Module):
    """q, k and v read one modulated LayerNorm output; ``keep`` also returns it (then it must be written)."""

    def __init__(self, keep=False):
        super().__init__()
        self.keep = keep
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, scale):
        h = 2.0 - self.norm(x) * (1 + scale[:, None]) * 0.5
        a = F.scaled_dot_product_attention(*(p(h).unflatten(-1, (4, -1)).transpose(1, 2) for p in (self.q, self.k, self.v)))
        y = self.out(a.transpose(1, 2).flatten(2))
        return (y, h) if self.keep else y


def test_every_lynx_layer_reading_the_producer_fuses_it_and_the_chain_folds_into_rows():
    torch.manual_seed(0)
    model, args = SharedInput().eval(), (torch.randn(3, 8, D), torch.randn(3, D))
    out, backend = run(model, args)
    assert producers(backend) == {"q": "fused layer_norm", "k": "fused layer_norm", "v": "fused layer_norm"}
    unfused, _ = run(model, args, LynxConfig(fuse_producers=False))
    assert relative_error(out, unfused) < 1e-5


def test_a_producer_output_used_elsewhere_stays_a_kernel_of_its_own():
    torch.manual_seed(0)
    model, args = SharedInput(keep=True).eval(), (torch.randn(2, 8, D), torch.randn(2, D))
    (out, h), backend = run(model, args)
    assert set(producers(backend).values()) == {"not fused: the layer_norm output is used outside lynx layers too"}
    assert lynx_ops(backend) == ["lynx.sparse_linear.default"] * 3


@pytest.mark.parametrize("activation,producer", [(nn.GELU(), "gelu"), (nn.SiLU(), "silu")])
def test_exact_gelu_and_silu(activation, producer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), activation, nn.Linear(2 * D, D), nn.LayerNorm(D)).eval()
    x = torch.randn(2, 6, D)
    config = LynxConfig(include="^[13]$", fuse_producers=True)
    out, backend = run(model, (x,), config)
    assert producers(backend) == {"1": "fused layer_norm", "3": f"fused {producer}"}
    unfused, _ = run(model, (x,), config.with_options({"fuse_producers": False}))
    assert relative_error(out, unfused) < 1e-5


def test_two_dimensional_tokens_use_one_row_for_every_token():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D)).eval()
    x = torch.randn(12, D)
    out, backend = run(model, (x,), LynxConfig(include="1", fuse_producers=True))
    assert producers(backend) == {"1": "fused layer_norm"}
    unfused, _ = run(model, (x,), LynxConfig(include="1", fuse_producers=False))
    assert relative_error(out, unfused) < 1e-5


def test_layers_left_unfused_say_why():
    torch.manual_seed(0)
    block = Block().eval()
    _, off = run(block, block_inputs(), LynxConfig(fuse_producers=False))
    assert set(producers(off).values()) == {"not fused: fuse_producers is off"}
    assert LynxConfig().fuse_producers, "on by default"
    factors = {"qkv": (torch.randn(8, D) / D, torch.randn(3 * D, 8) / 8)}
    _, lora = run(block, block_inputs(), LynxConfig(compensation="lora", compensation_state=factors, fuse_producers=True))
    assert producers(lora)["qkv"] == "not fused: the folded LoRA reads the producer's output"
    assert producers(lora)["fc2"] == "fused gelu_tanh"


def test_dynamic_batch_keeps_one_graph_with_per_sample_rows(block):
    inputs = [block_inputs(batch=batch) for batch in (2, 3, 5)]
    expected = [run(block, args, LynxConfig(fuse_producers=False))[0] for args in inputs]
    torch._dynamo.reset()
    backend = lynx_compile.LynxBackend(FUSED, inductor=False)
    compiled = torch.compile(block, backend=backend, dynamic=True)
    with torch.no_grad():
        for args, unfused in zip(inputs, expected):
            assert relative_error(compiled(*args), unfused) < 1e-5
    assert backend.report.graphs == 1 and set(producers(backend).values()) == {"fused layer_norm", "fused gelu_tanh"}


class PatchTokens(nn.Module):
    """A DiT's first LayerNorm producer: tokens from a patch convolution, so eager strides put the token dim innermost."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(4, D, 2, stride=2)
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.linear = nn.Linear(D, D)

    def forward(self, image, position):
        tokens = self.patch(image).flatten(2).transpose(1, 2) + position
        return self.linear(self.norm(tokens)) + tokens


def test_the_residual_stream_reaches_the_fused_kernel_row_major_without_a_copy():
    """The lynx ops ask Inductor for contiguous inputs, so Inductor writes the residual stream row-major where it is
    computed, instead of in the traced transposed layout that the op would have to copy."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    torch._dynamo.reset()
    model, args = PatchTokens().eval(), (torch.randn(2, 4, 8, 8), torch.randn(1, 16, D))
    compiled = torch.compile(model, backend=lynx_compile.backend(include="linear", fuse_producers=True), fullgraph=True)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out, (code,) = run_and_get_code(compiled, *args)
    fused_input = re.search(r"torch\.ops\.lynx\.producer_sparse_linear\.default\((\w+),", code).group(1)
    stream_shape = rf"\(2, 16, {D}\), \(([\d, ]+)\)"
    allocation = re.search(rf"{fused_input} = (?:empty_strided_cpu\(|reinterpret_tensor\(\w+, ){stream_shape}", code)
    assert allocation, f"{fused_input} is not a buffer of the stream's shape"
    assert allocation.group(1) == f"{16 * D}, {D}, 1", f"{fused_input} is not row-major"
    unfused, _ = run(model, args, LynxConfig(include="linear"))
    assert relative_error(out, unfused) < 1e-5


def test_fp8_layers_fuse_their_producers_into_the_e4m3_sparsify_step(block):
    args = block_inputs()
    fp8 = LynxConfig(precision="fp8", fuse_producers=True)
    out, backend = run(block, args, fp8)
    assert producers(backend) == {"qkv": "fused layer_norm", "fc1": "fused layer_norm", "fc2": "fused gelu_tanh"}
    assert {layer.precision for layer in backend.report.sparse} == {"e4m3"}
    weight_scales = [gm_node.args[11] for gm in backend.graph_modules for gm_node in gm.graph.nodes
                     if gm_node.target is torch.ops.lynx.producer_sparse_linear.default]
    assert len(weight_scales) == 3 and all(scale is not None for scale in weight_scales)
    unfused, _ = run(block, args, fp8.with_options({"fuse_producers": False}))
    assert relative_error(out, unfused) < 1e-5
