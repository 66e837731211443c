"""Decide, for every linear layer, whether it runs sparse, and record why.

Matches:
    ``torch.nn.functional.linear(x, W, b)`` calls (after ``normalize_linears``), and
    ``torch.ops.lynx.e4m3_linear(x, W_e4m3, W_scale, b)`` calls of layers holding e4m3 weights
    (``lynx_compile.convert_to_fp8``), which run in e4m3 whatever ``LynxConfig.precision``.
Replaces with:
    nothing: it annotates each such node with ``node.meta["lynx"]``, a ``LayerDecision`` that
    ``sparsify_linears`` acts on and ``explain()`` reports. With measured sensitivities
    (``LynxConfig.sensitivity``) and a budget, the most sensitive layers of the graph that would
    run sparse are then turned dense (``keep_sensitive_dense``).
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..config import LynxConfig
from ..report import LayerDecision
from ..types import NOT_MATCHED_BY_INCLUDE, Decision, Precision
from .graph import PassContext, fake_value, op_name, qualified_name, submodule_names_hint
from .roles import RoleAnalysis
from .speed_policy import slower_than_dense

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


LINEARS = ("linear", "e4m3_linear")


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in LINEARS


def linear_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, fx.Node | None]:
    """``(x, weight, bias, weight_scale)`` of a linear node; ``weight_scale`` is None for ``F.linear``."""
    if op_name(node) == "e4m3_linear":
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        return node.args[0], node.args[1], bias, node.args[2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias, None


def _layer_name(ctx: PassContext, linear: fx.Node, weight: fx.Node) -> str:
    param = ctx.parameter_name(ctx.constant_root(weight))
    if param is not None:
        return param[: -len(".weight")] if param.endswith(".weight") else param
    stack = linear.meta.get("nn_module_stack")
    if stack:
        return qualified_name(list(stack.values())[-1][0])
    return linear.name


def _kernel_path(device: torch.device, dtype: torch.dtype, k: int, n_out: int, n: int, m: int,
                 speed_guard: bool, e4m3: bool) -> tuple[bool, str]:
    """(runs sparse, how or why not) for the device the weight lives on; ``e4m3``: on the e4m3 GEMM."""
    if device.type != "cuda":
        return True, f"reference path ({device.type})"
    from .. import kernels
    from ..kernels import support

    reason = kernels.unsupported_reason(device, dtype, k, n_out, n, m) or (support.e4m3_reason(k) if e4m3 else None)
    if reason is None:
        slower = slower_than_dense(n_out) if speed_guard else None
        return (False, f"speed_guard: {slower}") if slower else (True, "CUDA sparse kernel" + (" (e4m3)" if e4m3 else ""))
    if not kernels.available() or (n, m) != (2, 4):
        # No kernel for this machine or pattern at all: the reference still computes it.
        return True, f"reference path ({reason})"
    return False, f"kernel cannot take it: {reason}"


def decide(ctx: PassContext, analysis: RoleAnalysis, linear: fx.Node) -> LayerDecision:
    config = ctx.config
    x, weight, bias, weight_scale = linear_operands(linear)
    x_fake, w_fake = fake_value(x), fake_value(weight)
    e4m3_weight = weight_scale is not None
    n_out, k = (int(w_fake.shape[0]), int(w_fake.shape[1])) if isinstance(w_fake, torch.Tensor) else (0, 0)
    tokens = None
    if isinstance(x_fake, torch.Tensor) and k:
        rows = x_fake.numel() // k
        symbolic = not isinstance(rows, int) and getattr(rows, "node", None) is not None and not rows.node.is_constant()
        tokens = str(rows) if symbolic else int(rows)
    role, role_reason = analysis.role(linear)
    layer = LayerDecision(_layer_name(ctx, linear, weight), k, n_out, tokens, role, Decision.DENSE, "")
    if isinstance(w_fake, torch.Tensor):
        layer.precision = "e4m3" if e4m3_weight else str(w_fake.dtype).removeprefix("torch.")

    def dense(reason: str) -> LayerDecision:
        layer.reason = reason
        return layer

    if ctx.constant(weight) is None:
        return dense("weight is not a constant parameter or buffer")
    if bias is not None and ctx.constant(bias) is None:
        return dense("bias is not a constant parameter or buffer")
    if config.include is not None:
        if not re.search(config.include, layer.name):
            return dense(NOT_MATCHED_BY_INCLUDE)
    elif role not in config.sparse_roles:
        return dense(role_reason)
    if config.exclude is not None and re.search(config.exclude, layer.name):
        return dense("matched by exclude")
    if e4m3_weight and (x_fake.dtype not in (torch.bfloat16, torch.float16) or ctx.constant(weight_scale) is None):
        return dense(f"e4m3 weight with input dtype {x_fake.dtype}: the e4m3 sparse GEMM takes bf16/fp16")
    if not e4m3_weight and (x_fake.dtype not in _FLOAT_DTYPES or w_fake.dtype != x_fake.dtype):
        return dense(f"dtype {x_fake.dtype} (weight {w_fake.dtype}): only matching float32/bfloat16/float16 runs sparse")
    if k % config.m:
        return dense(f"in_features {k} is not a multiple of {config.m} (pattern {config.pattern})")
    if min(k, n_out) < config.min_features:
        return dense(f"{k} -> {n_out} is below min_features={config.min_features}")
    e4m3 = config.precision == Precision.FP8 or e4m3_weight
    sparse, how = _kernel_path(w_fake.device, x_fake.dtype, k, n_out, config.n, config.m, config.speed_guard, e4m3)
    if not sparse:
        return dense(how)
    layer.decision, layer.reason = Decision.SPARSE, how
    if e4m3:
        layer.precision = "e4m3"
    layer.pattern, layer.compensation = config.pattern, config.compensation
    return layer


def _flops(layer: LayerDecision) -> int:
    # Per-token FLOPs when the token count is symbolic (dynamic shapes): the layers competing
    # for the budget are token-wise layers of one model, which mostly see the same tokens.
    return layer.flops if layer.flops is not None else 2 * layer.in_features * layer.out_features


def keep_sensitive_dense(layers: list[LayerDecision], config: LynxConfig) -> None:
    """Turn the most sensitive sparse layers dense, as ``max_layer_error``/``dense_flop_budget`` allow.

    Layers go dense in order of decreasing measured error and stop at the first that is below
    the threshold or no longer fits the FLOP budget, so what stays dense is always a prefix of
    the sensitivity ranking: never a less sensitive layer in place of a more sensitive one.
    """
    if config.sensitivity is None:
        return
    for layer in layers:
        layer.error = config.sensitivity.get(layer.name)
    if config.max_layer_error is None and config.dense_flop_budget is None:
        return
    candidates = [layer for layer in layers if layer.decision == Decision.SPARSE]
    hint = submodule_names_hint([layer.name for layer in candidates], config.sensitivity)
    if hint:
        raise ValueError(f"lynx: the sensitivity has no entry for any of this graph's {len(candidates)} sparse "
                         f"candidate layer(s) (e.g. {candidates[0].name!r}). {hint}")
    total = sum(_flops(layer) for layer in candidates)
    budget = None if config.dense_flop_budget is None else config.dense_flop_budget * total
    spent = 0
    for layer in sorted((l for l in candidates if l.error is not None), key=lambda l: -l.error):
        if config.max_layer_error is not None and layer.error <= config.max_layer_error:
            break
        if budget is not None and spent + _flops(layer) > budget:
            break
        spent += _flops(layer)
        if config.max_layer_error is not None:
            layer.reason = f"sensitivity: error {layer.error:.3g} > max_layer_error {config.max_layer_error:g}"
        else:
            layer.reason = (
                f"sensitivity: error {layer.error:.3g}, among the most sensitive "
                f"{spent / total:.0%} of sparse-layer FLOPs (dense_flop_budget {config.dense_flop_budget:g})"
            )
        layer.decision, layer.pattern, layer.compensation = Decision.DENSE, None, None


def select_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    analysis = RoleAnalysis(ctx)
    layers = []
    for node in gm.graph.nodes:
        if is_linear(node):
            node.meta["lynx"] = decide(ctx, analysis, node)
            layers.append(node.meta["lynx"])
    keep_sensitive_dense(layers, ctx.config)
    ctx.decisions.extend(layers)
