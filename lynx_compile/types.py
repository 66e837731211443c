"""The names lynx decides with: a linear layer's role, its decision, the compensation mode, the GEMM precision.

Each is a string enum, so it compares equal to its plain value (``role == "attn_qkv"``), prints
and formats as that value, and goes into JSON as a string.
"""

from __future__ import annotations

import enum


class _Name(enum.StrEnum):
    def __repr__(self) -> str:
        # Reprs of configs and reports read as they would with plain strings.
        return repr(self.value)


class Role(_Name):
    """The role a linear layer plays in a diffusion transformer, read off the graph's structure
    by ``passes/roles.py`` (which says how each is recognised)."""

    ATTN_QKV = "attn_qkv"
    ATTN_OUT = "attn_out"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    CONDITIONING = "conditioning"
    EMBEDDER = "embedder"
    FINAL = "final"
    OTHER = "other"
    GRAPH_BREAK = "graph_break"
    """Next to a graph break: the layer's input or output lies in another graph, so its role cannot be read."""

    @property
    def dense_reason(self) -> str:
        """Why a layer of this role stays dense when the role is not in ``LynxConfig.sparse_roles``."""
        return ROLE_DENSE_REASONS.get(self, f"role {self.value} not in sparse_roles")


ROLE_DENSE_REASONS = {
    Role.CONDITIONING: "per-sample conditioning (modulation / timestep / class embedding): no token dimension",
    Role.EMBEDDER: "input embedder (no normalisation upstream): reads raw model inputs",
    Role.FINAL: "final projection to the model output",
    Role.ATTN_OUT: "attention output projection: outside RT-Lynx's sparse set",
    Role.OTHER: "role not recognised",
}
"""The roles RT-Lynx keeps dense, and why. ``Role.GRAPH_BREAK`` layers give the side of the break instead."""

INPUT_FROM_GRAPH_BREAK = "input comes from a graph break"
OUTPUT_TO_GRAPH_BREAK = "output goes to a graph break"
NOT_MATCHED_BY_INCLUDE = "not matched by include"
"""Reasons a layer stays dense that the compile-time warnings look for."""


class Decision(_Name):
    SPARSE = "sparse"
    DENSE = "dense"


class CompensationMode(_Name):
    """How a sparsified layer's output is corrected (``LynxConfig.compensation``)."""

    NONE = "none"
    NORM = "norm"
    LORA = "lora"


class Precision(_Name):
    """What the linear layers' GEMMs run in (``LynxConfig.precision``)."""

    NATIVE = "native"
    """The model's own dtype (bf16, fp16 or fp32)."""
    FP8 = "fp8"
    """e4m3 activations and weights with fp32 scales (per token, per output channel), output in the model's dtype:
    the sparse layers on the e4m3 sparse GEMM, the dense layers on FP8 dense (``torch._scaled_mm``)."""


__all__ = [
    "INPUT_FROM_GRAPH_BREAK", "NOT_MATCHED_BY_INCLUDE", "OUTPUT_TO_GRAPH_BREAK", "ROLE_DENSE_REASONS", "CompensationMode",
    "Decision", "Precision", "Role",
]
