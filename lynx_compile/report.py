"""What the lynx passes decided for each linear layer, and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from .types import CompensationMode, Decision, Role


@dataclass
class LayerDecision:
    """One linear layer of one compiled graph."""

    name: str
    """Module qualified name, as in ``model.named_modules()`` (``blocks.3.mlp.fc2``)."""
    in_features: int
    out_features: int
    tokens: int | str | None
    """Rows the layer multiplies (M) in the traced example; a string when it is symbolic."""
    role: Role
    """Structural role (``attn_qkv``, ``mlp_up``, ``conditioning``...); see passes/roles.py."""
    decision: Decision
    reason: str
    """Why it stays dense, or which sparse path runs it."""
    pattern: str | None = None
    compensation: CompensationMode | None = None
    graph: int = 0
    """Index of the compiled graph (more than one only when Dynamo broke the graph)."""
    error: float | None = None
    """Measured relative error of this layer when sparsified, from ``LynxConfig.sensitivity``
    (the whole model's or the layer's own, see there); None when not measured."""
    precision: str | None = None
    """What the layer's GEMM runs in: the model's dtype (``bfloat16``...) or ``e4m3``."""
    producer: str | None = None
    """For a sparse layer: the kernel producing its input that runs inside its sparsify step
    (``fused layer_norm``...), or why none does (``not fused: ...``)."""

    @property
    def flops(self) -> int | None:
        return 2 * self.tokens * self.in_features * self.out_features if isinstance(self.tokens, int) else None


def _shape(layer: LayerDecision) -> tuple[str, str, str]:
    return layer.name, f"{layer.tokens} x {layer.in_features} -> {layer.out_features}", layer.role


@dataclass
class Report:
    """Per-layer decisions of the lynx backend on one model, as ``explain()`` returns them."""

    layers: list[LayerDecision] = field(default_factory=list)
    graphs: int = 0
    """Graphs Dynamo produced: 1 means no graph break."""
    graph_breaks: list[str] = field(default_factory=list)

    @property
    def sparse(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.decision == Decision.SPARSE]

    @property
    def dense(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.decision == Decision.DENSE]

    def sparse_flop_share(self) -> float | None:
        """Share of linear-layer FLOPs in the example that run on the sparse path."""
        flops = [(layer.flops, layer.decision) for layer in self.layers]
        if not flops or any(f is None for f, _ in flops):
            return None
        total = sum(f for f, _ in flops)
        return sum(f for f, d in flops if d == Decision.SPARSE) / total if total else 0.0

    def table(self, tablefmt: str = "simple", detailed: bool = False) -> str:
        """The per-layer table. ``detailed`` (lynx-dump) adds compensation, precision, measured error
        and the GFLOP each layer moves to the sparse path; otherwise the error column only appears
        once sensitivities were given, and the precision column once a layer runs in e4m3, as most
        reports have neither."""
        errors = any(layer.error is not None for layer in self.layers)
        precisions = any(layer.precision == "e4m3" for layer in self.layers)

        def error(layer: LayerDecision) -> str:
            return "-" if layer.error is None else f"{layer.error:.3f}"

        if detailed:
            headers = ("layer", "M x K -> N", "role", "decision", "reason", "producer", "compensation", "precision",
                       "error", "sparse GFLOP")
            rows = [
                (*_shape(layer), layer.decision, layer.reason, layer.producer or "-", layer.compensation or "-",
                 layer.precision or "-", error(layer),
                 f"{(layer.flops or 0) / 1e9 if layer.decision == Decision.SPARSE else 0.0:.3f}")
                for layer in self.layers
            ]
        else:
            headers = ("layer", "M x K -> N", "role", *(("error",) if errors else ()), "decision",
                       *(("precision",) if precisions else ()), "reason")
            rows = [
                (*_shape(layer), *((error(layer),) if errors else ()), layer.decision,
                 *((layer.precision or "-",) if precisions else ()), layer.reason)
                for layer in self.layers
            ]
        return tabulate(rows, headers=headers, tablefmt=tablefmt)

    def summary(self) -> str:
        share = self.sparse_flop_share()
        share_text = f", {share:.1%} of linear FLOPs" if share is not None else ""
        breaks = f", {len(self.graph_breaks)} graph break(s)" if self.graph_breaks else ", no graph breaks"
        return (
            f"{len(self.sparse)} of {len(self.layers)} linear layers sparse{share_text}; "
            f"{self.graphs} graph(s){breaks}"
        )

    def to_json(self) -> str:
        payload: dict[str, Any] = {
            "graphs": self.graphs,
            "graph_breaks": self.graph_breaks,
            "sparse_flop_share": self.sparse_flop_share(),
            "layers": [asdict(layer) | {"flops": layer.flops} for layer in self.layers],
        }
        return json.dumps(payload, indent=2)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"
