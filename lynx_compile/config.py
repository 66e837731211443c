"""Every knob of the lynx backend, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from .steps import StepSchedule
from .types import CompensationMode, Precision, Role

DEFAULT_SPARSE_ROLES = frozenset({Role.ATTN_QKV, Role.MLP_UP, Role.MLP_DOWN})

NORM_EPS = 1e-12
"""Default eps of the norm-compensation scale: keeps all-zero tokens at s = 0 instead of NaN."""


@dataclass(frozen=True)
class LynxConfig:
    """Configuration of the lynx backend. Every field is checked when the config is built."""

    pattern: str = "2:4"
    """N:M activation sparsity: keep the N largest |x| in every M consecutive input features of
    each token. The GPU kernels run "2:4"; any "N:M" with 0 < N < M runs on the reference path."""

    compensation: CompensationMode = CompensationMode.NORM
    """"none": plain N:M. "norm": rescale each sparsified token to its dense L2 norm.
    "lora": norm plus a calibrated low-rank correction fed by the dense input (implies norm)."""

    include: str | None = None
    """Regex (``re.search``) over module qualified names such as ``blocks.3.mlp.fc2``. When set,
    the layers it matches are candidates for sparsity whatever their role; when None, the
    candidates are the layers whose role is in ``sparse_roles``."""

    exclude: str | None = None
    """Regex over module qualified names that always stay dense; applied after ``include``."""

    sparse_roles: frozenset[Role] = DEFAULT_SPARSE_ROLES
    """Roles sparsified by default, following RT-Lynx: attention q/k/v projections (fused or
    not) and MLP up/down projections. Modulation, embedders and the final layer stay dense."""

    min_features: int = 256
    """Linears whose in_features or out_features is below this stay dense: too small to gain
    from sparse tensor cores, and the most sensitive to dropped features."""

    precision: Precision = Precision.NATIVE
    """"native": the GEMMs run in the model's dtype. "fp8": every linear layer that the FP8 GEMMs can take (bf16/fp16,
    also fp32 on CPU; in and out features multiples of 16) runs in e4m3 with fp32 scales: activations per token at run time,
    weights per output channel once at compile time; sparse layers on the e4m3 2:4 GEMM (the norm scale folded into
    the token's scale), dense layers on FP8 dense (``torch._scaled_mm``). Hopper and later GPUs; elsewhere the same
    numerics run in plain torch."""

    compensation_state: Mapping[str, tuple[Any, Any]] | None = field(default=None, hash=False, compare=False)
    """Calibrated LoRA factors keyed by module qualified name: ``name -> (lora_down (r, K),
    lora_up (N, r))``; ``comp.config()`` of a ``Compensation`` from ``lynx_compile.calibrate``
    fills it. Required by ``compensation="lora"``; ignored otherwise. Factors that do not fit
    their layer's weight raise ValueError when the model is compiled."""

    speed_guard: bool = True
    """On the CUDA kernel path, keep layers dense where sparsify + sparse GEMM was measured
    slower than dense cuBLAS (``lynx_compile.passes.speed_policy``). Off: every selected
    layer the kernel can take runs sparse, e.g. for quality studies."""

    fuse_producers: bool = True
    """Run the kernel that produces a sparse layer's input (adaLN's LayerNorm and modulation,
    GELU, SiLU) inside the layer's sparsify step, so that the producer's output is never written
    and read back (``lynx_compile.passes.fuse_producers``). A producer the pass cannot take, or a
    layer with folded LoRA, keeps the separate sparsify step, and ``explain()`` says why. Off: the
    producer stays a kernel of its own and the sparsify step reads its output."""

    eps: float = NORM_EPS
    """eps of the norm-compensation scale sqrt(||x||^2 / (||x~||^2 + eps))."""

    sensitivity: Mapping[str, float] | None = field(default=None, hash=False, compare=False)
    """Measured relative error per layer, keyed by module qualified name, e.g.
    ``comp.sensitivity("lora")`` of a ``Compensation`` from ``lynx_compile.calibrate`` (the whole
    model's output error with that layer alone sparse, when measured; else the layer's own output
    error), which ``comp.config()`` passes. Shown by ``explain()``; with ``max_layer_error``
    and/or ``dense_flop_budget`` it keeps the most sensitive layers dense."""

    max_layer_error: float | None = None
    """Layers whose measured error (``sensitivity``) exceeds this stay dense. None: no threshold
    (with ``dense_flop_budget`` alone, the most sensitive layers fill the budget)."""

    dense_flop_budget: float | None = None
    """Fraction in [0, 1] of the FLOPs of the layers that would otherwise run sparse that may be
    kept dense for sensitivity. Layers go dense in order of decreasing measured error, while
    their error exceeds ``max_layer_error`` (if set) and the next one still fits the budget.
    None: no FLOP cap (only ``max_layer_error`` applies). Counted per compiled graph."""

    step_schedule: StepSchedule | None = None
    """Timestep-adaptive sparsity: the sampling steps that run dense (``lynx_compile.StepSchedule``). With one, every
    graph that has sparse layers is compiled twice, sparse and as a dense twin, and ``with schedule.apply(compiled):``
    around the sampling loop picks one per forward call (``lynx_compile.steps``). None: every call runs sparse."""

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
        if self.compensation not in tuple(CompensationMode):
            modes = tuple(mode.value for mode in CompensationMode)
            raise ValueError(f"LynxConfig.compensation: expected one of {modes}, got {self.compensation!r}")
        object.__setattr__(self, "compensation", CompensationMode(self.compensation))
        if self.precision not in tuple(Precision):
            choices = tuple(precision.value for precision in Precision)
            raise ValueError(f"LynxConfig.precision: expected one of {choices}, got {self.precision!r}")
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.compensation == "lora" and self.compensation_state is None:
            raise ValueError(
                "LynxConfig.compensation_state: compensation='lora' needs calibrated LoRA factors "
                "(a mapping 'module name' -> (lora_down, lora_up)); use 'norm' or 'none' without them"
            )
        if self.compensation_state is not None and not isinstance(self.compensation_state, Mapping):
            raise ValueError("LynxConfig.compensation_state: expected a mapping of module name -> (lora_down, lora_up), "
                             f"got {type(self.compensation_state).__name__}")
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
        if isinstance(roles, str) or not all(role in tuple(Role) for role in roles):
            names = tuple(role.value for role in Role)
            raise ValueError(f"LynxConfig.sparse_roles: expected a set drawn from {names}, got {roles!r}")
        object.__setattr__(self, "sparse_roles", frozenset(Role(role) for role in roles))
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise ValueError(f"LynxConfig.min_features: expected an int >= 0, got {self.min_features!r}")
        for flag in ("speed_guard", "fuse_producers"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LynxConfig.{flag}: expected True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 < self.eps < 1:
            raise ValueError(f"LynxConfig.eps: expected a float in (0, 1), got {self.eps!r}")
        for name, factors in (self.compensation_state or {}).items():
            check_lora_factors(name, factors)
        self._check_sensitivity()
        if self.step_schedule is not None and not isinstance(self.step_schedule, StepSchedule):
            raise ValueError("LynxConfig.step_schedule: expected a lynx_compile.StepSchedule or None, "
                             f"got {type(self.step_schedule).__name__}")

    def _check_sensitivity(self) -> None:
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
                    "sensitivity=comp.sensitivity('lora'), or build the config with comp.config(...), "
                    "for comp = lynx_compile.calibrate(...)"
                )
        sensitivity = self.sensitivity
        if sensitivity is None:
            return
        expected = "LynxConfig.sensitivity: expected a mapping of module name -> relative error >= 0"
        if not isinstance(sensitivity, Mapping):
            raise ValueError(f"{expected}, got {type(sensitivity).__name__}")
        for name, error in sensitivity.items():
            if isinstance(error, (tuple, list)):
                # A Compensation is a mapping of LoRA factor pairs, not of errors.
                raise ValueError(f"{expected}, got one of LoRA factor pairs (a Compensation?); pass "
                                 "sensitivity=comp.sensitivity('lora'), or build the whole config with comp.config(...)")
            if not isinstance(name, str) or isinstance(error, bool) or not isinstance(error, Real) or not error >= 0:
                shown = repr(error) if isinstance(error, Real) else type(error).__name__
                raise ValueError(f"{expected}, got {name!r}: {shown}")
        object.__setattr__(self, "sensitivity", {k: float(v) for k, v in sensitivity.items()})

    def with_options(self, options: Mapping[str, Any] | None) -> LynxConfig:
        """This config with ``torch.compile(..., options={...})`` (or ``backend(**options)``) applied
        over its fields; an unknown key raises ValueError naming it and the closest field."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(self)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                fix = f"did you mean {close[0]!r}?" if close else "it is not a LynxConfig field"
                raise ValueError(f"lynx options: unknown key {key!r} ({fix}); accepted keys: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **options) if options else self

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LynxConfig:
        """Build from ``torch.compile(..., options={...})``; unknown keys raise ValueError."""
        return cls().with_options(options)


def check_lora_factors(name: str, factors: Any, weight_shape: tuple[int, int] | None = None) -> None:
    """The one check of a layer's LoRA factors: a pair (lora_down (r, K), lora_up (N, r)) with
    r > 0 and, where the layer's (N, K) weight is known (at compile time), its K and N."""
    pair = isinstance(factors, (tuple, list)) and len(factors) == 2 and all(hasattr(f, "shape") for f in factors)
    if not (pair and all(len(f.shape) == 2 for f in factors) and factors[0].shape[0] == factors[1].shape[1] > 0):
        shapes = [tuple(f.shape) for f in factors] if pair else type(factors).__name__
        raise ValueError(
            f"LynxConfig.compensation_state[{name!r}]: expected (lora_down (r, K), lora_up (N, r)) with r > 0, got {shapes!r}"
        )
    if weight_shape is None:
        return
    (n_out, k), (down, up) = weight_shape, factors
    if down.shape[1] != k or up.shape[0] != n_out:
        raise ValueError(
            f"lynx: LoRA factors of layer {name!r} do not fit its weight {tuple(weight_shape)}: lora_down "
            f"{tuple(down.shape)} must be (r, {k}) and lora_up {tuple(up.shape)} ({n_out}, r); "
            "was the compensation calibrated on another model?"
        )
