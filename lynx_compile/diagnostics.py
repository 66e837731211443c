"""Compile-time warnings for graphs where lynx sparsifies less than a user would expect.

Each cause warns once per process (a model split by graph breaks, or compiled block by block,
hands the backend many graphs of the same cause); ``explain()`` lists every layer instead.
Silence them with ``warnings.filterwarnings("ignore", category=lynx_compile.LynxWarning)``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Hashable

from .config import LynxConfig
from .report import LayerDecision
from .types import INPUT_FROM_GRAPH_BREAK, NOT_MATCHED_BY_INCLUDE, OUTPUT_TO_GRAPH_BREAK, Decision, Role

_EXPLAIN = "lynx_compile.explain(model, *example_inputs) lists every layer and why"

_warned: set[Hashable] = set()
"""Causes already warned about in this process."""


class LynxWarning(UserWarning):
    """A compiled graph runs fewer layers sparse than its configuration suggests (see ``explain()``)."""


def graph_warnings(decisions: list[LayerDecision], config: LynxConfig, has_token_dim: bool) -> dict[Hashable, str]:
    """The causes of concern in one compiled graph, each keyed by what makes it the same cause.

    ``has_token_dim``: whether any tensor of the graph has rank > 2; without one, every layer
    reads as per-sample conditioning.
    """
    found: dict[Hashable, str] = {}
    at_break = [d for d in decisions if d.reason in (INPUT_FROM_GRAPH_BREAK, OUTPUT_TO_GRAPH_BREAK)]
    if at_break:
        found["graph_break"] = (
            f"lynx: linear layers next to a graph break stay dense (e.g. {at_break[0].name!r}: {at_break[0].reason}): "
            "their role cannot be read across the break. Remove the break (torch.compile(..., fullgraph=True) shows "
            f"where) or select layers with include=...; {_EXPLAIN}."
        )
    if not decisions or any(d.decision == Decision.SPARSE for d in decisions):
        return found
    if config.include is not None and all(d.reason == NOT_MATCHED_BY_INCLUDE for d in decisions):
        found["include", config.include] = (
            f"lynx: include={config.include!r} matches none of the {len(decisions)} linear layers of a compiled graph "
            f"(e.g. {decisions[0].name!r}), so none runs sparse; {_EXPLAIN}."
        )
    elif not has_token_dim and all(d.role == Role.CONDITIONING for d in decisions):
        found["2-D input"] = (
            "lynx: no tensor of a compiled graph has a token dimension (2-D input, (tokens, features)?), so every linear "
            "layer reads as per-sample conditioning and stays dense; select the layers to sparsify with include=... "
            f"(a regex over module names); {_EXPLAIN}."
        )
    elif len(at_break) < len(decisions):
        reasons = Counter(d.reason for d in decisions)
        listed = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
        found["no sparse layer", frozenset(reasons)] = (
            f"lynx: none of the {len(decisions)} linear layers of a compiled graph runs sparse ({listed}); {_EXPLAIN}."
        )
    return found


def warn_once(causes: dict[Hashable, str]) -> None:
    for key, message in causes.items():
        if key not in _warned:
            _warned.add(key)
            warnings.warn(message, LynxWarning, stacklevel=2)
