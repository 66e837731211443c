"""What every lynx pass needs to read a Dynamo FX graph: op names, constants, qualified names.

The passes run on the graph Dynamo hands the backend (torch-level IR, before AOT autograd), so
an op shows up as ``call_function`` on a torch/operator callable or as ``call_method`` on a
tensor. ``op_name`` folds all those spellings (``F.linear``, ``torch._C._nn.linear``,
``x.matmul``, ``operator.matmul``...) into one lowercase name.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..config import LynxConfig
from ..report import LayerDecision


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        # An aten overload is named "op.overload" (``_scaled_dot_product_cudnn_attention.default``).
        return getattr(node.target, "__name__", str(node.target)).split(".")[0].lower()
    return node.op


def fake_value(node: Any) -> Any:
    """The FakeTensor (or SymInt) Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def set_fake_value(node: fx.Node, value: Any) -> None:
    node.meta["example_value"] = value
    node.meta["val"] = value


def tensor_rank(node: Any) -> int | None:
    value = fake_value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


_ROOT = re.compile(r"^[A-Z]\[['\"][^'\"]*['\"]\]\.?")
_PART = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]|\[['\"]?([^'\"\]]+)['\"]?\]|\.(\w+)")


def qualified_name(source_name: str) -> str:
    """``L['self']._modules['blocks']._modules['0']._parameters['weight']`` -> ``blocks.0.weight``.

    Also takes the ``L['self'].blocks[0].fc1`` spelling of ``nn_module_stack``. A compiled
    wrapper's ``_orig_mod`` level and ``__dict__['_modules']`` spellings are dropped, so names match ``model.named_modules()``.
    """
    rest = _ROOT.sub("", source_name.strip(), count=1)
    if rest and rest[0] not in ".[":
        rest = "." + rest
    parts = [next(p for p in match.groups() if p is not None) for match in _PART.finditer(rest)]
    return ".".join(p for p in parts if p not in _NOT_MODULE_LEVELS)


_NOT_MODULE_LEVELS = {"_orig_mod", "__dict__", "_modules", "_parameters", "_buffers"}
_TRANSPOSES = {"t", "T", "mT", "transpose", "permute", "swapaxes", "swapdims"}


def submodule_names_hint(names: list[str], keys: Any) -> str:
    """Why layer ``names`` may all miss a mapping keyed by ``keys`` (empty if no reason is seen).

    Regional compilation (diffusers' ``compile_repeated_blocks``, ``block.compile()``) gives
    lynx one graph per block class, named from the block down ("attn.to_q"), and runs it for
    every instance of the block: settings keyed by the whole model's names cannot apply there.
    """
    keys = list(keys)
    if any(name in keys for name in names) or not any(key.endswith("." + name) for name in names for key in keys):
        return ""
    return ("This graph's layer names are the tail of those keys: it is a submodule compiled on its own (regional "
            "compilation, e.g. diffusers' compile_repeated_blocks), one graph shared by every instance of the block, so "
            "per-layer settings of the whole model cannot apply; compile the whole model (torch.compile(model, ...)).")


@dataclass(frozen=True)
class GraphBreaks:
    """Where a graph Dynamo hands the backend borders on a graph break, so that what lies across
    it (the normalisation before a layer, the model output after it) is not in the graph."""

    inputs: bool = False
    """Its inputs come from a graph break: code Dynamo rewrote around a break called this frame
    (the rest of a function after the break, or a function Dynamo could not inline)."""
    outputs: bool = False
    """Its outputs go to a graph break rather than to the model's output."""


def graph_breaks(gm: fx.GraphModule) -> GraphBreaks:
    """The graph breaks around ``gm``, read while Dynamo is compiling it (none outside Dynamo)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    ends_at_break = bool(getattr(reason, "graph_break", False))
    try:
        from torch._dynamo.convert_frame import output_codes
        from torch._dynamo.resume_execution import TORCH_DYNAMO_RESUME_IN_PREFIX
        from torch._dynamo.symbolic_convert import InstructionTranslator

        own = InstructionTranslator.current_tx().f_code.co_name
    except (ImportError, AttributeError):
        return GraphBreaks(outputs=ends_at_break)
    # Frames running code that Dynamo rewrote, innermost first: the callers of the frame being compiled.
    callers, frame = [], sys._getframe()
    while frame is not None:
        if frame.f_code in output_codes:
            callers.append(frame.f_code.co_name)
        frame = frame.f_back
    # A resume function is tail-called (its result is its caller's); any other call returns into
    # the caller's eager code. The result reaches the model's output only through tail calls.
    chain = [own, *callers]
    returns_to_model = all(name.startswith(TORCH_DYNAMO_RESUME_IN_PREFIX) for name in chain[:-1])
    return GraphBreaks(inputs=bool(callers), outputs=ends_at_break or not returns_to_model)


@dataclass
class PassContext:
    """State shared by the passes of one compiled graph."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    config: LynxConfig
    decisions: list[LayerDecision] = field(default_factory=list)
    fake_mode: Any = None
    graph_index: int = 0
    """Position of this graph among those compiled in this process (names dump folders)."""
    breaks: GraphBreaks | None = None
    """The graph breaks around this graph; read from Dynamo when not given."""

    def __post_init__(self) -> None:
        if self.breaks is None:
            self.breaks = graph_breaks(self.gm)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self._placeholder_values = dict(zip(placeholders, self.example_inputs))
        if self.fake_mode is None:
            self.fake_mode = torch._guards.detect_fake_mode()
        if self.fake_mode is None:
            values = [fake_value(n) for n in placeholders]
            self.fake_mode = torch._guards.detect_fake_mode([v for v in values if v is not None])

    def parameter_name(self, node: fx.Node) -> str | None:
        """Qualified name of the parameter/buffer a node stands for, or None if it is not one."""
        if node.op == "get_attr":
            return str(node.target)
        if node.op != "placeholder":
            return None
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        source_name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
        example = self._placeholder_values.get(node)
        is_param = isinstance(example, torch.nn.Parameter) or (
            isinstance(source_name, str) and re.search(r"_(parameters|buffers)\[", source_name) is not None
        )
        if not is_param or not isinstance(source_name, str):
            return None
        return qualified_name(source_name)

    def constant(self, node: Any) -> torch.Tensor | None:
        """The real tensor behind a parameter/buffer node, or a transpose view of one; else None.

        Inference only: weights are read once, at compile time, and treated as constants.
        """
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            value = self.gm
            for atom in str(node.target).split("."):
                value = getattr(value, atom, None)
            return value if isinstance(value, torch.Tensor) else None
        if node.op == "placeholder":
            if self.parameter_name(node) is None:
                return None
            value = self._placeholder_values.get(node)
            return value if isinstance(value, torch.Tensor) else None
        name = op_name(node)
        if name in _TRANSPOSES and node.args:
            base = self.constant(node.args[0])
            if base is None or base.dim() != 2:
                return None
            if name == "permute":
                dims = node.args[1:] if len(node.args) > 2 else node.args[1]
                return base.permute(*dims)
            if name in ("transpose", "swapaxes", "swapdims"):
                return base.transpose(*node.args[1:3])
            return base.t()
        if name == "getattr" and len(node.args) == 2 and node.args[1] in _TRANSPOSES:
            base = self.constant(node.args[0])
            return base.t() if base is not None and base.dim() == 2 else None
        return None

    def constant_root(self, node: fx.Node) -> fx.Node:
        """The parameter node under any transpose views (for naming the layer)."""
        while node.op not in ("placeholder", "get_attr") and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def fake(self, tensor: torch.Tensor) -> Any:
        # Static: a constant made here has no Dynamo source, so a symbolic size of it could not be guarded.
        return self.fake_mode.from_tensor(tensor, static_shapes=True) if self.fake_mode is not None else None

    def add_constant(self, name_hint: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        """Attach ``tensor`` to the graph module as a constant and return its get_attr node."""
        base = re.sub(r"\W", "_", f"_lynx_{name_hint}")
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_buffer(name, tensor, persistent=False)
        # AOT autograd lifts the graph module's buffers to inputs and wants the Dynamo source of
        # each one (for guards and dedup): a tensor made here gets a constant source of its own.
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            from torch._dynamo.source import ConstantSource

            sources[name] = ConstantSource(name)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        set_fake_value(node, self.fake(tensor))
        return node
