"""Bring every spelling of a linear layer to one ``F.linear`` call.

Matches:
    ``x @ W.T``, ``torch.matmul(x, W.t())``, ``x.matmul(W.transpose(0, 1))``, ``torch.mm(x, W.T)``
    and ``x @ V`` for a (K, N) constant ``V``, each optionally followed by ``+ b`` for a constant
    1-D ``b`` of N features; and ``torch.addmm(b, x, W.T)`` with ``beta = alpha = 1``.
    ``W``, ``V`` and ``b`` must be parameters or buffers (constants at compile time).
Replaces with:
    ``torch.nn.functional.linear(x, W, b)``; for a (K, N) ``V`` the weight is ``V.t()``.
    Leading batch/token dims of ``x`` and reshapes around the product are left as they are:
    ``linear`` takes any leading dims, so nothing needs to be flattened.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import PassContext, fake_value, op_name, set_fake_value

_MATMULS = {"matmul", "mm", "__matmul__"}


def _weight_node(ctx: PassContext, node: fx.Node, rhs: fx.Node, rhs_value: torch.Tensor) -> fx.Node:
    """The (N, K) weight for ``x @ rhs``: the parameter itself when ``rhs`` is its transpose
    view (``W.T``, ``W.t()``, ``W.transpose(0, 1)``...), else a new ``rhs.t()`` node."""
    root = ctx.constant_root(rhs)
    root_value = ctx.constant(root)
    if rhs is not root and root_value is not None and root_value.dim() == 2:
        transposed = root_value.t()
        if rhs_value.shape == transposed.shape and rhs_value.stride() == transposed.stride():
            return root
    with ctx.gm.graph.inserting_before(node):
        weight = ctx.gm.graph.call_method("t", (rhs,))
    set_fake_value(weight, fake_value(rhs).t())
    return weight


def _constant_bias(ctx: PassContext, node: fx.Node, out_features: int) -> fx.Node | None:
    """The ``b`` of a sole ``node + b`` user with constant 1-D ``b``, else None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if op_name(user) not in ("add", "__add__", "iadd") or user.kwargs:
        return None
    others = [a for a in user.args if a is not node]
    if len(others) != 1 or len(user.args) != 2:
        return None
    bias = ctx.constant(others[0])
    if bias is None or tuple(bias.shape) != (out_features,):
        return None
    return others[0]


def normalize_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        name = op_name(node)
        if node.op not in ("call_function", "call_method"):
            continue
        if name in _MATMULS and len(node.args) == 2 and not node.kwargs:
            x, rhs = node.args
            bias_input = None
            replaced = node
        elif name == "addmm" and len(node.args) == 3 and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):
            bias_input, x, rhs = node.args
            replaced = node
        else:
            continue
        x_fake = fake_value(x)
        if not isinstance(x, fx.Node) or not isinstance(x_fake, torch.Tensor) or x_fake.dim() < 1:
            continue
        rhs_value = ctx.constant(rhs)
        if rhs_value is None or rhs_value.dim() != 2:
            continue
        out_features = rhs_value.shape[1]
        if bias_input is not None:
            bias_value = ctx.constant(bias_input)
            if bias_value is None or tuple(bias_value.shape) != (out_features,):
                continue
        else:
            bias_input = _constant_bias(ctx, node, out_features)
            if bias_input is not None:
                (replaced,) = node.users
        weight = _weight_node(ctx, node, rhs, rhs_value)
        with graph.inserting_before(replaced):
            linear = graph.call_function(F.linear, (x, weight, bias_input))
        linear.meta.update({k: v for k, v in replaced.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        set_fake_value(linear, fake_value(replaced))
        replaced.replace_all_uses_with(linear)
        graph.erase_node(replaced)
        if replaced is not node and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
