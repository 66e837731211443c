"""Error measures shared by calibration, the benchmarks and the tests."""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor


def relative_error(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||``, in float64."""
    reference = reference.double()
    return ((output.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _tensors(output: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def output_error(output: Any, reference: Any) -> float:
    """``||Y' - Y|| / ||Y||`` over every tensor a model returns (any nesting of tuples, lists, dicts)."""
    pairs = list(zip(_tensors(output), _tensors(reference)))
    diff = sum(float((o.float() - r.float()).square().sum()) for o, r in pairs)
    norm = sum(float(r.float().square().sum()) for _, r in pairs)
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


__all__ = ["output_error", "relative_error"]
