"""Run the linear layers that stay dense on FP8 dense GEMMs (``LynxConfig.precision="fp8"``).

Matches:
    ``torch.nn.functional.linear(x, W, b)`` left dense by ``select_linears``, with ``W`` and ``b``
    constants, ``x`` and ``W`` of one float dtype, in and out features multiples of 16, on a device
    whose ``torch._scaled_mm`` takes e4m3 with rowwise scales and gives that dtype (on CUDA: bf16,
    fp16; on CPU also fp32).
Replaces with:
    ``torch.ops.lynx.e4m3_linear(x, W_e4m3, W_scale, b)``, which decomposes into the per-token
    quantization of ``x`` as plain torch ops (Inductor fuses it into the kernel producing ``x``)
    and one rowwise-scaled ``_scaled_mm``; ``W`` quantized here once, per output channel. A layer
    left in its dtype says why in its decision's reason. Layers already holding e4m3 weights
    (``lynx_compile.convert_to_fp8``) are ``lynx.e4m3_linear`` calls from the start.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from .. import ops
from ..types import Decision, Precision
from .graph import PassContext, fake_value, set_fake_value
from .select_linears import is_linear, linear_operands

_FEATURE_MULTIPLE = 16  # _scaled_mm's operand dims


@functools.cache
def _scaled_mm_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``torch._scaled_mm`` cannot run a rowwise-scaled e4m3 GEMM with ``dtype`` output on ``device`` (None: it
    can); tried once."""
    try:
        a = torch.zeros((16, 16), device=device).to(ops.E4M3)
        ones = torch.ones((16, 1), device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=dtype, use_fast_accum=True)
    except (RuntimeError, NotImplementedError) as exc:
        return f"no rowwise FP8 GEMM with {str(dtype).removeprefix('torch.')} output on {device}: " \
               f"{str(exc).splitlines()[0][:120]}"
    return None


def _reason(ctx: PassContext, x: fx.Node, weight: fx.Node, bias: fx.Node | None) -> str | None:
    """Why this dense linear stays in its dtype (None: it runs FP8)."""
    x_fake, w_fake = fake_value(x), fake_value(weight)
    if ctx.constant(weight) is None or (bias is not None and ctx.constant(bias) is None):
        return "weight or bias not a constant"
    dtype = x_fake.dtype if isinstance(x_fake, torch.Tensor) else None
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or w_fake.dtype != dtype:
        return f"dtype {dtype} (weight {w_fake.dtype})"
    n_out, k = w_fake.shape
    if k % _FEATURE_MULTIPLE or n_out % _FEATURE_MULTIPLE:
        return f"{k} -> {n_out} features not multiples of {_FEATURE_MULTIPLE}"
    return _scaled_mm_error(w_fake.device, dtype)


def quantize_dense_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.config.precision != Precision.FP8:
        return
    graph = gm.graph
    for node in list(graph.nodes):
        decision = node.meta.get("lynx")
        if not is_linear(node) or decision is None or decision.decision != Decision.DENSE or decision.precision == "e4m3":
            continue
        x, weight, bias, _ = linear_operands(node)
        reason = _reason(ctx, x, weight, bias)
        if reason is not None:
            decision.reason += f"; not FP8: {reason}"
            continue
        weight_e4m3, weight_scale = ops.quantize_weight_e4m3(ctx.constant(weight))
        args = (x, ctx.add_constant(f"{decision.name}_weight_e4m3", weight_e4m3, node),
                ctx.add_constant(f"{decision.name}_weight_scale", weight_scale, node), bias)
        with graph.inserting_before(node):
            linear = graph.call_function(torch.ops.lynx.e4m3_linear.default, args)
        linear.meta.update(node.meta)
        set_fake_value(linear, fake_value(node))
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        decision.precision = "e4m3"
