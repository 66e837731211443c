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
    LoRA factors that do not fit the layer's weight raise ValueError naming the layer.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..config import check_lora_factors
from ..types import CompensationMode, Decision
from .graph import PassContext, fake_value, set_fake_value, submodule_names_hint
from .select_linears import is_linear


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
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        common = (bias, config.n, config.m, config.norm_compensation, config.eps)
        factors = lora_factors.get(decision.name) if lora else None
        if lora and factors is None:
            decision.compensation = CompensationMode.NORM
            decision.reason += "; no LoRA factors for this layer, norm compensation only"
        if factors is not None:
            weight_value = ctx.constant(weight)
            check_lora_factors(decision.name, factors, tuple(weight_value.shape))
            down, up = factors
            device, dtype = fake_value(x).device, fake_value(x).dtype
            weight_lora, down = ops.pack_lora(*(t.detach().to(device, dtype) for t in (weight_value, down, up)))
            op = torch.ops.lynx.sparse_linear_lora.default
            args = (x, ctx.add_constant(f"{decision.name}_weight_lora", weight_lora, node), *common,
                    ctx.add_constant(f"{decision.name}_lora_down", down, node))
        else:
            op, args = torch.ops.lynx.sparse_linear.default, (x, weight, *common)
        with graph.inserting_before(node):
            sparse = graph.call_function(op, args)
        sparse.meta.update(node.meta)
        set_fake_value(sparse, fake_value(node))
        node.replace_all_uses_with(sparse)
        graph.erase_node(node)
