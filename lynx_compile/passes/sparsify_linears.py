"""Replace each linear layer selected for sparsity with one lynx custom-op call.

Matches:
    ``torch.nn.functional.linear(x, W, b)`` whose ``node.meta["lynx"]`` decision is ``sparse``.
Replaces with:
    ``torch.ops.lynx.sparse_linear(x, W, b, n, m, norm_compensation, eps)``: N:M selection and
    norm compensation in one op, so Inductor sees a single extern call per layer and compiles
    everything around it. A layer with calibrated LoRA factors gets
    ``torch.ops.lynx.sparse_linear_lora(x, W_lora, b, n, m, norm_compensation, eps, lora_down)``
    instead: ``W_lora`` is W with lora_up appended as extra 2:4 K columns (``ops.pack_lora``,
    a constant made here once), so the LoRA term rides in the same sparse GEMM.
    With ``precision="fp8"``: ``torch.ops.lynx.sparse_linear_e4m3(x, W_e4m3, W_scale, b, n, m,
    norm_compensation, eps[, lora_down])``, W (or W_lora) quantized here once, per output channel;
    a ``lynx.e4m3_linear`` layer (e4m3 weights from ``convert_to_fp8``) passes its own W_e4m3 and
    W_scale, so no copy is made (with LoRA, W_lora is made from them).
    LoRA factors that do not fit the layer's weight raise ValueError naming the layer.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..config import check_lora_factors
from ..types import CompensationMode, Decision, Precision
from .graph import PassContext, fake_value, set_fake_value, submodule_names_hint
from .select_linears import is_linear, linear_operands


def sparsify_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    config = ctx.config
    lora_factors = config.compensation_state or {}
    graph = gm.graph
    lora = config.compensation == CompensationMode.LORA
    sparse_names = [n.meta["lynx"].name for n in graph.nodes if is_linear(n) and n.meta.get("lynx") is not None
                    and n.meta["lynx"].decision == Decision.SPARSE] if lora and lora_factors else []
    if sparse_names and not set(sparse_names) & set(lora_factors):
        # Factors for none of the layers: a state calibrated on another model, not a partial one.
        raise ValueError(
            f"lynx: compensation_state has LoRA factors for none of this graph's {len(sparse_names)} sparse layer(s) "
            f"(e.g. {sparse_names[0]!r}; the state has {sorted(lora_factors)[:3]!r}...): "
            + (submodule_names_hint(sparse_names, lora_factors) or "calibrated on another model?")
        )
    for node in list(graph.nodes):
        decision = node.meta.get("lynx")
        if not is_linear(node) or decision is None or decision.decision != Decision.SPARSE:
            continue
        x, weight, bias, weight_scale = linear_operands(node)
        common = (bias, config.n, config.m, config.norm_compensation, config.eps)
        factors = lora_factors.get(decision.name) if lora else None
        if lora and factors is None:
            decision.compensation = CompensationMode.NORM
            decision.reason += "; no LoRA factors for this layer, norm compensation only"
        device, dtype = fake_value(x).device, fake_value(x).dtype
        held_e4m3 = weight_scale is not None  # the layer holds e4m3 weights (convert_to_fp8)
        if held_e4m3 and factors is None:
            op, args = torch.ops.lynx.sparse_linear_e4m3.default, (x, weight, weight_scale, *common, None)
        else:
            op, args = _rewritten(ctx, decision.name, node, x, weight, weight_scale, common, factors, device, dtype)
        with graph.inserting_before(node):
            sparse = graph.call_function(op, args)
        sparse.meta.update(node.meta)
        set_fake_value(sparse, fake_value(node))
        node.replace_all_uses_with(sparse)
        graph.erase_node(node)


def _rewritten(ctx: PassContext, name: str, node: fx.Node, x: fx.Node, weight: fx.Node, weight_scale: fx.Node | None,
               common: tuple, factors: tuple | None, device: torch.device, dtype: torch.dtype) -> tuple[object, tuple]:
    """The op and arguments of a sparse layer whose weight is made here: LoRA folded in, and/or quantized to e4m3."""
    weight_value, down = ctx.constant(weight), None
    if weight_scale is not None:  # LoRA widens an e4m3 weight: from its dequantized values
        weight_value = weight_value.float() * ctx.constant(weight_scale)[:, None]
    if factors is not None:
        check_lora_factors(name, factors, tuple(weight_value.shape))
        weight_value, down = ops.pack_lora(*(t.detach().to(device, dtype) for t in (weight_value, *factors)))
    if ctx.config.precision == Precision.FP8 or weight_scale is not None:
        weight_e4m3, scale = ops.quantize_weight_e4m3(weight_value.to(device))
        return torch.ops.lynx.sparse_linear_e4m3.default, (
            x, ctx.add_constant(f"{name}_weight_e4m3", weight_e4m3, node), ctx.add_constant(f"{name}_weight_scale", scale, node),
            *common, None if down is None else ctx.add_constant(f"{name}_lora_down", down, node))
    if down is not None:
        return torch.ops.lynx.sparse_linear_lora.default, (
            x, ctx.add_constant(f"{name}_weight_lora", weight_value, node), *common,
            ctx.add_constant(f"{name}_lora_down", down, node))
    return torch.ops.lynx.sparse_linear.default, (x, weight, *common)

