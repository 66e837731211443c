"""Which role a linear layer plays in a diffusion transformer, read off the graph's structure.

Names differ between DiT, PixArt, diffusers and Flux checkouts (``qkv``, ``to_q``, ``attn.c_attn``,
``fc1``, ``ff.net.0.proj``...), but the dataflow around each role does not. This module is an
analysis used by ``select_linears``; it changes nothing. Roles, checked in this order:

``conditioning``  the input is per-sample: no ancestor of it carries a token dimension (every
                  non-constant ancestor has rank <= 2). adaLN modulation, timestep/class/pooled
                  text embedders.
``attn_qkv``      the output reaches an attention op as query, key or value (also fused qkv,
                  Flux's fused qkv+MLP linear, cross-attention k/v over text tokens, and
                  hand-written softmax attention).
``graph_break``   token-wise, no normalisation upstream, and the graph's inputs come from a
                  graph break: the layer's upstream lies in another graph.
``embedder``      token-wise, but no normalisation lies upstream: patch, context and caption
                  projections that read the raw model inputs.
``graph_break``   the output reaches the graph output through layout ops only, and that output
                  goes to a graph break rather than to the model's output.
``final``         the output reaches the graph output through layout ops only (unpatchify).
``mlp_up``        the output reaches an activation function through layout ops.
``mlp_down``      the input comes from an activation function (through layout ops, gating
                  products and concatenation).
``attn_out``      the input comes from an attention op through layout ops.
``other``         none of the above.
"""

from __future__ import annotations

import torch.fx as fx

from ..types import INPUT_FROM_GRAPH_BREAK, OUTPUT_TO_GRAPH_BREAK, Role
from .graph import PassContext, op_name, tensor_rank

LINEAR_OPS = {"linear", "e4m3_linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d", "conv3d",
              "__matmul__"}
ATTENTION_OPS = {
    "scaled_dot_product_attention", "flash_attn_func", "flex_attention",
    # The aten kernels that diffusers' attention backends (e.g. "_native_cudnn", which ring
    # attention needs) call directly; query, key and value come first in each.
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward",
}
ACTIVATIONS = {
    "gelu", "silu", "relu", "relu_", "mish", "hardswish", "leaky_relu", "sigmoid", "softplus", "elu", "selu", "celu",
    "quick_gelu", "gelu_tanh", "relu6", "glu",
}
NORMS = {"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "rsqrt", "normalize"}
LAYOUT = {
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "getitem", "chunk", "split", "split_with_sizes", "unbind", "tensor_split", "narrow", "select",
    "movedim", "swapaxes", "swapdims", "to", "float", "half", "bfloat16", "type", "type_as", "clone",
    "dropout", "cat", "concat", "concatenate", "stack", "einsum", "identity", "repeat", "view_as",
    # Context parallelism moves tokens between ranks with functional collectives.
    "all_gather_into_tensor", "all_to_all_single", "wait_tensor", "_maybe_view_chunk_cat",
}
# Ring attention merges the partial outputs of each pass by their log-sum-exp.
LSE_MERGE = {"sub", "__sub__", "mul", "__mul__", "add", "__add__", "sigmoid", "exp", "log", "logsigmoid", "neg", "softplus"}
GATING = {"mul", "__mul__", "imul", "add", "__add__", "sub", "tanh", "pow", "div", "truediv"}
_MAX_HOPS = 24


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _inputs(node: fx.Node) -> list[fx.Node]:
    return node.all_input_nodes


def _search(start: fx.Node, step, through: set[str] | None, found, max_hops: int = _MAX_HOPS) -> bool:
    """Breadth-first walk from ``start`` via ``step``; True once ``found(node, came_from)`` holds.

    The walk goes on only through ops named in ``through`` (any op but a linear one when None).
    """
    frontier, seen = [start], {start}
    for _ in range(max_hops):
        next_frontier = []
        for node in frontier:
            for nxt in step(node):
                if nxt in seen:
                    continue
                seen.add(nxt)
                if found(nxt, node):
                    return True
                name = op_name(nxt)
                passable = name not in LINEAR_OPS and (through is None or name in through)
                if passable and nxt.op in ("call_function", "call_method"):
                    next_frontier.append(nxt)
        frontier = next_frontier
        if not frontier:
            break
    return False


def _is_attention_input(node: fx.Node, came_from: fx.Node) -> bool:
    name = op_name(node)
    if name in ATTENTION_OPS:
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
        return came_from in qkv
    if name in ("matmul", "bmm", "__matmul__", "einsum"):
        # Hand-written attention: scores = q @ k^T feed a softmax; out = probs @ v.
        feeds_softmax = _search(node, _users, LAYOUT | GATING, lambda n, _: op_name(n) == "softmax", 4)
        takes_softmax = any(
            _search(a, _inputs, LAYOUT, lambda n, _: op_name(n) == "softmax", 3) or op_name(a) == "softmax"
            for a in node.all_input_nodes
        )
        return feeds_softmax or takes_softmax
    return False


def _is_mlp_activation(node: fx.Node) -> bool:
    """An activation applied to a linear layer's output: the hidden layer of an MLP (not, say,
    the sigmoid with which ring attention merges its partial outputs)."""
    if op_name(node) not in ACTIVATIONS:
        return False
    return any(op_name(a) in LINEAR_OPS or _search(a, _inputs, LAYOUT, lambda n, _: op_name(n) in LINEAR_OPS, 4)
               for a in node.all_input_nodes)


def _is_attention_output(node: fx.Node) -> bool:
    if op_name(node) in ATTENTION_OPS:
        return True
    if op_name(node) in ("matmul", "bmm", "__matmul__", "einsum"):
        return any(op_name(a) == "softmax" for a in node.all_input_nodes)
    return False


class RoleAnalysis:
    """Structural facts about one graph, computed once in topological order."""

    def __init__(self, ctx: PassContext):
        self.breaks = ctx.breaks
        self.max_rank_upstream: dict[fx.Node, int] = {}
        """Largest rank among the non-constant tensors a node is computed from (itself included)."""
        self.norm_upstream: dict[fx.Node, bool] = {}
        """Whether a normalisation op lies upstream of a node (or is the node)."""
        for node in ctx.gm.graph.nodes:
            if ctx.parameter_name(node) is not None:
                self.max_rank_upstream[node], self.norm_upstream[node] = 0, False
                continue
            inputs = node.all_input_nodes
            self.max_rank_upstream[node] = max([tensor_rank(node) or 0] + [self.max_rank_upstream[a] for a in inputs])
            self.norm_upstream[node] = op_name(node) in NORMS or any(self.norm_upstream[a] for a in inputs)

    def role(self, linear: fx.Node) -> tuple[Role, str]:
        """The layer's role, and why a layer of that role stays dense when the role is not selected."""
        role = self._role(linear)
        if role == Role.GRAPH_BREAK:
            return role, INPUT_FROM_GRAPH_BREAK if not self.norm_upstream[linear.args[0]] else OUTPUT_TO_GRAPH_BREAK
        return role, role.dense_reason

    def _role(self, linear: fx.Node) -> Role:
        x = linear.args[0]
        if self.max_rank_upstream[x] <= 2:
            return Role.CONDITIONING
        if _search(linear, _users, None, _is_attention_input):
            return Role.ATTN_QKV
        if not self.norm_upstream[x]:
            return Role.GRAPH_BREAK if self.breaks.inputs else Role.EMBEDDER
        if _search(linear, _users, LAYOUT, lambda n, _: n.op == "output", 12):
            return Role.GRAPH_BREAK if self.breaks.outputs else Role.FINAL
        if _search(linear, _users, LAYOUT, lambda n, _: op_name(n) in ACTIVATIONS, 8):
            return Role.MLP_UP
        if _is_mlp_activation(x) or _search(x, _inputs, LAYOUT | GATING, lambda n, _: _is_mlp_activation(n), 8):
            return Role.MLP_DOWN
        if _is_attention_output(x) or _search(x, _inputs, LAYOUT | LSE_MERGE, lambda n, _: _is_attention_output(n), 12):
            return Role.ATTN_OUT
        return Role.OTHER
