"""Move the kernel that produces a sparse layer's input into the layer's sparsify step.

Matches:
    ``lynx.sparse_linear(y, W, b, n, m, norm_compensation, eps)`` or ``lynx.sparse_linear_e4m3(y, W, w_scale, ...)``
    (no LoRA) whose input ``y`` is
    * ``layer_norm(h, (K,), w, b, eps)`` followed by ``*``, ``+`` and ``-`` with operands constant over the tokens
      (scalars, ``(K,)`` vectors, per-sample ``(B, 1, K)`` rows): adaLN's ``LN(h) * (1 + scale) + shift``; or
    * ``gelu(h)`` (exact or tanh) or ``silu(h)``;
    where every node from ``h`` to ``y`` is used only on that path, and ``y`` only by lynx sparse layers.
Replaces with:
    ``lynx.producer_sparse_linear(h, producer, mul, add, producer_eps, W, b, n, m, norm_compensation, eps, w_scale)``, one
    per sparse layer that read ``y``: the layer norm's affine and the chain fold into fp32 per-sample ``mul``/``add``
    rows of shape (S, K), computed in the graph from the small operands. The kernel reads ``h`` once and writes only
    the compressed operand of the sparse GEMM, so ``y`` is never written and read back. The producer that stays is
    recorded in each layer's ``LayerDecision.producer``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops
from .graph import PassContext, fake_value, op_name, set_fake_value

_ACTIVATIONS = {"gelu": {"none": "gelu", "tanh": "gelu_tanh"}, "silu": {None: "silu"}}
_ADD, _MUL, _SUB = {"add", "__add__", "__radd__", "iadd"}, {"mul", "__mul__", "__rmul__", "imul"}, {"sub", "__sub__"}
_RSUB = {"rsub", "__rsub__"}


def _layer_args(sparse: fx.Node) -> tuple[Any, ...] | None:
    """``(x, weight, bias, n, m, norm_compensation, eps, weight_scale)`` of a lynx layer a producer can fuse into (a
    16-bit or e4m3 one without LoRA), or None."""
    if sparse.op != "call_function" or sparse.kwargs:
        return None
    if sparse.target is torch.ops.lynx.sparse_linear.default and len(sparse.args) <= 7:
        x, weight, bias, n, m, norm, eps = (*sparse.args, ops.NORM_EPS)[:7]
        return x, weight, bias, n, m, norm, eps, None
    if sparse.target is torch.ops.lynx.sparse_linear_e4m3.default and (len(sparse.args) < 9 or sparse.args[8] is None):
        x, weight, weight_scale, bias, n, m, norm, eps = sparse.args[:8]
        return x, weight, bias, n, m, norm, eps, weight_scale
    return None


def _sparse_linear_users(node: fx.Node) -> list[fx.Node] | None:
    users = list(node.users)
    if users and all((args := _layer_args(u)) is not None and args[0] is node for u in users):
        return users
    return None


def _same(a: Any, b: Any) -> bool:
    """Whether two sizes are equal for every value of their symbols (no guard is added)."""
    return statically_known_true(a == b)


def _same_shape(node: Any, out: torch.Tensor) -> bool:
    value = fake_value(node)
    return (isinstance(value, torch.Tensor) and value.dim() == out.dim()
            and all(_same(a, b) for a, b in zip(value.shape, out.shape)))


def _token_constant(operand: Any, out: torch.Tensor, features: int) -> bool:
    """Whether ``operand`` is the same for every token of ``out`` (B, ..., K): a number, or a tensor broadcast over
    every dim but the first (samples) and the last (``features``, the layer's static K: ``out``'s may be symbolic)."""
    if isinstance(operand, (int, float)) and not isinstance(operand, bool):
        return True
    value = fake_value(operand)
    if not isinstance(value, torch.Tensor) or value.dim() > out.dim() or not value.is_floating_point():
        return False
    shape = [1] * (out.dim() - value.dim()) + list(value.shape)
    per_sample = out.dim() > 2 and _same(shape[0], out.shape[0])  # (B, T, K): the first dim counts samples
    return (all(_same(size, 1) for size in shape[int(per_sample):-1])
            and any(_same(shape[-1], size) for size in (1, features, out.shape[-1])))


def _affine_step(node: fx.Node, out: torch.Tensor, features: int) -> tuple[fx.Node, str, Any] | None:
    """(the token-varying input, the step, the token-constant operand) of one ``*``/``+``/``-`` node, or None."""
    name = op_name(node)
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if name in _MUL | _ADD:
        step = "mul" if name in _MUL else "add"
        for main, other in ((a, b), (b, a)):
            if _same_shape(main, out) and _token_constant(other, out, features):
                return main, step, other
        return None
    # a - b is "sub" from a, or "rsub" from b; rsub(a, b) is b - a.
    minuend, subtrahend = (a, b) if name in _SUB else (b, a) if name in _RSUB else (None, None)
    if minuend is not None:
        if _same_shape(minuend, out) and _token_constant(subtrahend, out, features):
            return minuend, "sub", subtrahend
        if _same_shape(subtrahend, out) and _token_constant(minuend, out, features):
            return subtrahend, "rsub", minuend
    return None


class _Builder:
    """Inserts small fp32 nodes before ``anchor``, with fake values in the fake mode of the graph's tensors."""

    def __init__(self, ctx: PassContext, anchor: fx.Node, like: torch.Tensor):
        self.ctx, self.anchor, self.fake_mode = ctx, anchor, like.fake_mode

    def call(self, fn, *args: Any) -> fx.Node:
        with self.ctx.gm.graph.inserting_before(self.anchor):
            node = self.ctx.gm.graph.call_function(fn, args)
        set_fake_value(node, fn(*(fake_value(a) if isinstance(a, fx.Node) else a for a in args)))
        return node

    def constant(self, tensor: torch.Tensor) -> fx.Node:
        node = self.ctx.add_constant("producer_row", tensor, self.anchor)
        set_fake_value(node, self.fake_mode.from_tensor(tensor, static_shapes=True))
        return node

    def f32(self, operand: Any) -> Any:
        return operand if not isinstance(operand, fx.Node) else self.call(torch.Tensor.float, operand)


def _fold_chain(b: _Builder, chain: list[tuple[str, Any]], weight: Any, bias: Any) -> tuple[Any, Any]:
    """(A, B) with ``y = normalized * A + B``: start from the layer norm's affine, apply the steps outward."""
    mul, add = (1.0 if weight is None else b.f32(weight)), (0.0 if bias is None else b.f32(bias))

    def combine(fn, p, q):
        if not isinstance(p, fx.Node) and not isinstance(q, fx.Node):
            return fn(p, q)
        return b.call(fn, p, q)

    for step, operand in chain:
        operand = b.f32(operand)
        if step == "mul":
            mul, add = combine(operator.mul, mul, operand), combine(operator.mul, add, operand)
        elif step == "add":
            add = combine(operator.add, add, operand)
        elif step == "sub":
            add = combine(operator.sub, add, operand)
        else:  # rsub: operand - y
            mul, add = combine(operator.mul, mul, -1.0), combine(operator.sub, operand, add)
    return mul, add


def _rows(b: _Builder, mul: Any, add: Any, features: int, device: torch.device) -> tuple[fx.Node | None, fx.Node | None]:
    """``mul`` and ``add`` (numbers or token-constant tensors) as contiguous fp32 (S, K) rows with one S, S being the
    number of samples when either varies per sample, else 1; None for an identity (1 and 0)."""
    values = [None if not isinstance(mul, fx.Node) and mul == 1.0 else mul,
              None if not isinstance(add, fx.Node) and add == 0.0 else add]

    def constant(number: float) -> fx.Node:
        return b.constant(torch.full((1, features), float(number), dtype=torch.float32, device=device))

    values = [constant(v) if v is not None and not isinstance(v, fx.Node) else v for v in values]
    if all(v is not None for v in values):
        pair = b.call(torch.broadcast_tensors, *values)
        values = [b.call(operator.getitem, pair, i) for i in range(2)]
    zeros = constant(0.0)
    rows = []
    for value in values:
        if value is None:
            rows.append(None)
            continue
        full = b.call(operator.add, value, zeros)  # a (.., 1) operand broadcast over the features
        rows.append(b.call(torch.Tensor.contiguous, b.call(torch.reshape, full, (-1, features))))
    return rows[0], rows[1]


def _match_layer_norm(y: fx.Node, features: int) -> tuple[fx.Node, list[tuple[str, Any]], list[fx.Node]] | None:
    """(the layer norm node, the affine steps from it outward, every matched node) for ``y``, or None."""
    out = fake_value(y)
    chain, nodes, node = [], [], y
    while op_name(node) != "layer_norm":
        step = _affine_step(node, out, features) if node.op in ("call_function", "call_method") else None
        if step is None:
            return None
        nodes.append(node)
        node, kind, operand = step
        chain.append((kind, operand))
        if len(node.users) != 1:
            return None
    nodes.append(node)
    chain.reverse()
    return node, chain, nodes


def _layer_norm_args(node: fx.Node) -> tuple[fx.Node, Any, Any, Any] | None:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    h, shape = args.get("input"), args.get("normalized_shape")
    h_fake = fake_value(h)
    # Over the last dim alone (its size is the layer's K, as layer_norm checks at run time).
    if not isinstance(h_fake, torch.Tensor) or len(tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)) != 1:
        return None
    eps = args.get("eps", 1e-5)
    # A number, or a float Dynamo made a graph value (dynamic=True): the op takes either.
    if isinstance(eps, fx.Node):
        return (h, args.get("weight"), args.get("bias"), eps) if isinstance(fake_value(eps), (float, torch.SymFloat)) else None
    return h, args.get("weight"), args.get("bias"), float(eps)


def _replace(ctx: PassContext, users: list[fx.Node], h: fx.Node, producer: str, mul: Any, add: Any, eps: Any) -> None:
    for sparse in users:
        _, weight, bias, n, m, norm, sparse_eps, weight_scale = _layer_args(sparse)
        with ctx.gm.graph.inserting_before(sparse):
            fused = ctx.gm.graph.call_function(
                torch.ops.lynx.producer_sparse_linear.default,
                (h, producer, mul, add, eps, weight, bias, n, m, norm, sparse_eps, weight_scale))
        fused.meta.update(sparse.meta)
        set_fake_value(fused, fake_value(sparse))
        decision = sparse.meta.get("lynx")
        if decision is not None:
            decision.producer = f"fused {producer}"
        sparse.replace_all_uses_with(fused)
        ctx.gm.graph.erase_node(sparse)


_SPARSE_OPS = {"sparse_linear", "sparse_linear_lora", "sparse_linear_e4m3"}


def _not_fused(sparse: fx.Node, enabled: bool) -> str:
    """Why the input of a lynx layer left unfused is written by a kernel of its own."""
    if not enabled:
        return "not fused: fuse_producers is off"
    if _layer_args(sparse) is None:  # sparse_linear_lora, or an e4m3 layer with its LoRA folded
        return "not fused: the folded LoRA reads the producer's output"
    x = sparse.args[0]
    name = op_name(x) if isinstance(x, fx.Node) else "a constant"
    if isinstance(x, fx.Node) and _sparse_linear_users(x) is None:
        features = fake_value(sparse.args[1]).shape[1]
        producer = name if name in _ACTIVATIONS else "layer_norm" if _match_layer_norm(x, features) else None
        if producer is not None:
            return f"not fused: the {producer} output is used outside lynx layers too"
    return f"not fused: input comes from {name}"


def fuse_producers(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.config.fuse_producers:
        _fuse(gm, ctx)
    for node in gm.graph.nodes:
        decision = node.meta.get("lynx")
        if node.op == "call_function" and op_name(node) in _SPARSE_OPS and decision is not None and decision.producer is None:
            decision.producer = _not_fused(node, ctx.config.fuse_producers)


def _fuse(gm: fx.GraphModule, ctx: PassContext) -> None:
    for y in list(gm.graph.nodes):
        users = _sparse_linear_users(y)
        if users is None:
            continue
        name = op_name(y)
        if name in _ACTIVATIONS and y.op == "call_function":
            approximate = y.kwargs.get("approximate", "none") if name == "gelu" else None
            producer = _ACTIVATIONS[name].get(approximate)
            if producer is not None and len(y.args) == 1 and not y.kwargs.get("inplace", False):
                h = y.args[0]
                _replace(ctx, users, h, producer, None, None, 0.0)
                gm.graph.erase_node(y)
            continue
        features = fake_value(users[0].args[1]).shape[1]  # the weight's K: static, where y's may be symbolic
        matched = _match_layer_norm(y, features)
        if matched is None:
            continue
        norm_node, chain, nodes = matched
        parsed = _layer_norm_args(norm_node)
        if parsed is None:
            continue
        h, weight, bias, eps = parsed
        h_fake = fake_value(h)
        if h_fake.dtype != fake_value(y).dtype:
            continue
        builder = _Builder(ctx, users[0], h_fake)
        mul, add = _fold_chain(builder, chain, weight, bias)
        mul_rows, add_rows = _rows(builder, mul, add, features, h_fake.device)
        _replace(ctx, users, h, "layer_norm", mul_rows, add_rows, eps)
        for node in nodes:  # y first: each node's only user is gone once the one after it is
            gm.graph.erase_node(node)
