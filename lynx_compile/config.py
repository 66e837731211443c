"""Every knob of the lynx backend, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMPENSATIONS = ("none", "norm", "lora")

ROLES = ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "conditioning", "embedder", "final", "other")
"""Roles a linear can play, as recognised from the graph's structure (see passes/roles.py)."""

DEFAULT_SPARSE_ROLES = frozenset({"attn_qkv", "mlp_up", "mlp_down"})


@dataclass(frozen=True)
class LynxConfig:
    """Configuration of the lynx backend. Every field is checked when the config is built."""

    pattern: str = "2:4"
    """N:M activation sparsity: keep the N largest |x| in every M consecutive input features of
    each token. The GPU kernels run "2:4"; any "N:M" with 0 < N < M runs on the reference path."""

    compensation: str = "norm"
    """"none": plain N:M. "norm": rescale each sparsified token to its dense L2 norm.
    "lora": norm plus a calibrated low-rank correction fed by the dense input (implies norm)."""

    include: str | None = None
    """Regex (``re.search``) over module qualified names such as ``blocks.3.mlp.fc2``. When set,
    the layers it matches are candidates for sparsity whatever their role; when None, the
    candidates are the layers whose role is in ``sparse_roles``."""

    exclude: str | None = None
    """Regex over module qualified names that always stay dense; applied after ``include``."""

    sparse_roles: frozenset[str] = DEFAULT_SPARSE_ROLES
    """Roles sparsified by default, following RT-Lynx: attention q/k/v projections (fused or
    not) and MLP up/down projections. Modulation, embedders and the final layer stay dense."""

    min_features: int = 256
    """Linears whose in_features or out_features is below this stay dense: too small to gain
    from sparse tensor cores, and the most sensitive to dropped features."""

    compensation_state: Mapping[str, tuple[Any, Any]] | None = field(default=None, hash=False, compare=False)
    """Calibrated LoRA factors keyed by module qualified name: ``name -> (lora_down (r, K),
    lora_up (N, r))``, e.g. the ``Compensation`` returned by ``lynx_compile.calibrate`` (its
    pattern must match). Required by ``compensation="lora"``; ignored otherwise. Factors that
    do not fit their layer's weight raise ValueError when the model is compiled."""

    speed_guard: bool = True
    """On the CUDA kernel path, keep layers dense where sparsify + sparse GEMM was measured
    slower than dense cuBLAS (``lynx_compile.kernels.slower_than_dense``). Off: every selected
    layer the kernel can take runs sparse, e.g. for quality studies."""

    eps: float = 1e-12
    """eps of the norm-compensation scale sqrt(||x||^2 / (||x~||^2 + eps))."""

    sensitivity: Mapping[str, float] | None = field(default=None, hash=False, compare=False)
    """Measured relative error per layer, keyed by module qualified name: a ``Compensation``
    from ``lynx_compile.calibrate`` (its ``sensitivity(compensation)``: the whole model's output
    error with that layer alone sparse, under this config's compensation, when measured; else
    the layer's own output error) or any such mapping. Shown by ``explain()``; with
    ``max_layer_error`` and/or ``dense_flop_budget`` it keeps the most sensitive layers dense."""

    max_layer_error: float | None = None
    """Layers whose measured error (``sensitivity``) exceeds this stay dense. None: no threshold
    (with ``dense_flop_budget`` alone, the most sensitive layers fill the budget)."""

    dense_flop_budget: float | None = None
    """Fraction in [0, 1] of the FLOPs of the layers that would otherwise run sparse that may be
    kept dense for sensitivity. Layers go dense in order of decreasing measured error, while
    their error exceeds ``max_layer_error`` (if set) and the next one still fits the budget.
    None: no FLOP cap (only ``max_layer_error`` applies). Counted per compiled graph."""

    @property
    def n(self) -> int:
        return int(self.pattern.split(":")[0])

    @property
    def m(self) -> int:
        return int(self.pattern.split(":")[1])

    @property
    def norm_compensation(self) -> bool:
        return self.compensation in ("norm", "lora")

    def __post_init__(self) -> None:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.pattern))
        if not isinstance(self.pattern, str) or match is None or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"LynxConfig.pattern: expected 'N:M' with 0 < N < M (e.g. '2:4'), got {self.pattern!r}")
        object.__setattr__(self, "pattern", f"{int(match[1])}:{int(match[2])}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"LynxConfig.compensation: expected one of {COMPENSATIONS}, got {self.compensation!r}")
        if self.compensation == "lora" and self.compensation_state is None:
            raise ValueError(
                "LynxConfig.compensation_state: compensation='lora' needs calibrated LoRA factors "
                "(a mapping 'module name' -> (lora_down, lora_up)); use 'norm' or 'none' without them"
            )
        if self.compensation_state is not None and not isinstance(self.compensation_state, Mapping):
            raise ValueError(f"LynxConfig.compensation_state: expected a mapping of module name -> (lora_down, lora_up), got {type(self.compensation_state).__name__}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"LynxConfig.{name}: expected a regex string or None, got {value!r}")
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"LynxConfig.{name}: invalid regex {value!r}: {err}") from None
        roles = self.sparse_roles
        if isinstance(roles, str) or not all(role in ROLES for role in roles):
            raise ValueError(f"LynxConfig.sparse_roles: expected a set drawn from {ROLES}, got {roles!r}")
        object.__setattr__(self, "sparse_roles", frozenset(roles))
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise ValueError(f"LynxConfig.min_features: expected an int >= 0, got {self.min_features!r}")
        if not isinstance(self.speed_guard, bool):
            raise ValueError(f"LynxConfig.speed_guard: expected True or False, got {self.speed_guard!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 < self.eps < 1:
            raise ValueError(f"LynxConfig.eps: expected a float in (0, 1), got {self.eps!r}")
        self._check_compensation_state()
        self._check_sensitivity()

    def _check_calibrated_pattern(self, field_name: str, calibration: Any) -> None:
        """A Compensation knows the N:M pattern it was calibrated with; it must be this config's."""
        calibrated = getattr(calibration, "pattern", None)
        if calibrated is not None and calibrated != self.pattern:
            raise ValueError(f"LynxConfig.{field_name}: calibrated for pattern {calibrated}, but pattern is {self.pattern}")

    def _check_compensation_state(self) -> None:
        state = self.compensation_state
        if state is None:
            return
        self._check_calibrated_pattern("compensation_state", state)
        for name, factors in state.items():
            ok = isinstance(factors, (tuple, list)) and len(factors) == 2
            down, up = factors if ok else (None, None)
            if not (ok and all(hasattr(f, "shape") and len(f.shape) == 2 for f in factors)
                    and down.shape[0] == up.shape[1] and down.shape[0] > 0):
                shapes = [tuple(f.shape) for f in factors] if ok and all(hasattr(f, "shape") for f in factors) else factors
                raise ValueError(
                    f"LynxConfig.compensation_state[{name!r}]: expected (lora_down (r, K), lora_up (N, r)) "
                    f"with r > 0, got {shapes!r}"
                )

    def _check_sensitivity(self) -> None:
        sensitivity = self.sensitivity
        # A Compensation is a mapping of LoRA factors; its measured errors come from .sensitivity().
        if callable(getattr(sensitivity, "sensitivity", None)):
            self._check_calibrated_pattern("sensitivity", sensitivity)
            sensitivity = sensitivity.sensitivity(self.compensation)
        if sensitivity is not None:
            if not isinstance(sensitivity, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for k, v in sensitivity.items()
            ):
                raise ValueError(
                    "LynxConfig.sensitivity: expected a mapping of module name -> relative error >= 0 "
                    f"(e.g. a Compensation), got {type(sensitivity).__name__}"
                )
            object.__setattr__(self, "sensitivity", {k: float(v) for k, v in sensitivity.items()})
        for name, upper in (("max_layer_error", None), ("dense_flop_budget", 1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= (upper or float("inf")):
                bound = "in [0, 1]" if upper else ">= 0"
                raise ValueError(f"LynxConfig.{name}: expected a float {bound} or None, got {value!r}")
            if self.sensitivity is None:
                raise ValueError(
                    f"LynxConfig.sensitivity: {name} needs measured per-layer errors; pass "
                    "sensitivity=comp with comp = lynx_compile.calibrate(...)"
                )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LynxConfig:
        """Build from ``torch.compile(..., options={...})``; unknown keys raise ValueError."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"lynx options: unknown key(s) {unknown}; accepted keys are {sorted(known)}")
        return cls(**options)
