"""Timestep-adaptive sparsity: which steps of a sampling loop run the lynx graphs sparse, and which dense.

A sampler calls the transformer once per step (``calls_per_step`` times with unbatched guidance), and some steps
tolerate activation sparsity worse than others. A ``StepSchedule`` keeps those dense:

    schedule = StepSchedule(num_steps=25, dense_steps={0, 1, 2, 3, 4})
    compiled = torch.compile(model, backend="lynx", options={"step_schedule": schedule})
    with schedule.apply(compiled):
        ddim_sample(compiled, noise_schedule, noise, labels, steps=25)

With a schedule in its config, ``LynxBackend`` compiles every graph that has sparse layers twice, the lynx graph and
a dense twin, and picks one per call from ``SWITCH.dense``: a thread-local flag read in plain Python, outside Dynamo,
so the step is in no guard and no step recompiles. ``schedule.apply`` sets the flag per forward call from hooks on
the compiled module (hooks on a ``torch.compile``'d module run outside Dynamo); ``dense_forward()`` sets it for a
block of code. Outside both, every call runs sparse.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .metrics import output_error


class _Switch(threading.local):
    """Per thread: whether the lynx graphs compiled with a step schedule run their dense twin."""

    dense: bool = False
    twin_ran: bool = False
    """Set when a dense twin served a call: ``apply`` warns when dense steps found none to run."""


SWITCH = _Switch()
"""The one switch every twin-compiled lynx graph reads per call."""


@contextlib.contextmanager
def dense_forward(dense: bool = True) -> Iterator[None]:
    """Run the lynx graphs compiled with a step schedule dense (or, ``dense=False``, sparse) inside the block,
    for hand-written sampling loops: ``with lynx_compile.dense_forward(): eps = compiled(x, t, y)``."""
    previous = SWITCH.dense
    SWITCH.dense = bool(dense)
    try:
        yield
    finally:
        SWITCH.dense = previous


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StepSchedule:
    """Which sampling steps run dense; the others run the lynx graphs sparse."""

    num_steps: int
    """Steps of one sampling run (``num_inference_steps``)."""

    dense_steps: frozenset[int] = frozenset()
    """Indices in [0, num_steps) of the steps that run dense; step 0 is the first (the noisiest)."""

    calls_per_step: int = 1
    """Transformer calls one step makes: 1 with batched classifier-free guidance, 2 with unbatched."""

    def __post_init__(self) -> None:
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"StepSchedule.num_steps: expected an int >= 1, got {self.num_steps!r}")
        if not _is_int(self.calls_per_step) or self.calls_per_step < 1:
            raise ValueError(f"StepSchedule.calls_per_step: expected an int >= 1, got {self.calls_per_step!r}")
        steps = self.dense_steps
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable) or not all(_is_int(s) for s in steps):
            raise ValueError(f"StepSchedule.dense_steps: expected a set of step indices, got {steps!r}")
        outside = sorted(s for s in steps if not 0 <= s < self.num_steps)
        if outside:
            raise ValueError(f"StepSchedule.dense_steps: steps {outside} are outside [0, {self.num_steps}) "
                             f"(num_steps={self.num_steps}; step 0 is the first)")
        object.__setattr__(self, "dense_steps", frozenset(steps))

    @property
    def sparse_steps(self) -> str:
        """How many of the steps run sparse, as ``"20/25"``."""
        return f"{self.num_steps - len(self.dense_steps)}/{self.num_steps}"

    @property
    def sparse_fraction(self) -> float:
        """The share of steps that run sparse."""
        return 1 - len(self.dense_steps) / self.num_steps

    def __str__(self) -> str:
        dense = ",".join(map(str, sorted(self.dense_steps))) or "none"
        return f"{self.sparse_steps} steps sparse (dense: {dense})"

    @classmethod
    def from_costs(cls, costs: Sequence[float], *, sparse_fraction: float | None = None, num_dense: int | None = None,
                   calls_per_step: int = 1) -> StepSchedule:
        """The schedule over ``len(costs)`` steps that keeps the most costly steps dense: enough of them that
        ``sparse_fraction`` of the steps run sparse (rounded to a whole step), or ``num_dense`` of them.
        ``costs[i]``: what running step i sparse costs, e.g. from ``measure_step_costs``; ties keep the earlier step."""
        if not costs or not all(isinstance(c, Real) and not isinstance(c, bool) and c == c for c in costs):
            raise ValueError(f"StepSchedule.from_costs: expected one real cost per step, got {list(costs)!r}")
        if (sparse_fraction is None) == (num_dense is None):
            raise ValueError("StepSchedule.from_costs: give exactly one of sparse_fraction and num_dense")
        num_steps = len(costs)
        if num_dense is None:
            if isinstance(sparse_fraction, bool) or not isinstance(sparse_fraction, Real) or not 0 <= sparse_fraction <= 1:
                raise ValueError(f"StepSchedule.from_costs: sparse_fraction must be in [0, 1], got {sparse_fraction!r}")
            num_dense = num_steps - int(sparse_fraction * num_steps + 0.5)
        if not _is_int(num_dense) or not 0 <= num_dense <= num_steps:
            raise ValueError(f"StepSchedule.from_costs: num_dense must be an int in [0, {num_steps}], got {num_dense!r}")
        ranked = sorted(range(num_steps), key=lambda step: (-float(costs[step]), step))
        return cls(num_steps, frozenset(ranked[:num_dense]), calls_per_step)

    def apply(self, target: Any) -> ScheduledSampling:
        """A context manager that runs ``target``'s forward calls dense or sparse by this schedule: the
        ``torch.compile``'d transformer, or a pipeline whose ``.transformer`` is one. Each ``num_steps *
        calls_per_step`` calls are one sampling run, so several runs can share one context."""
        return ScheduledSampling(self, target)


class ScheduledSampling:
    """``StepSchedule.apply``'s context: counts the module's forward calls and sets ``SWITCH`` for each.

    ``calls``: forward calls seen; ``dense_calls``: those that ran dense."""

    def __init__(self, schedule: StepSchedule, target: Any):
        module = target if isinstance(target, nn.Module) else getattr(target, "transformer", None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"StepSchedule.apply: expected the compiled transformer (an nn.Module) or a pipeline with a "
                             f".transformer, got {type(target).__name__}")
        if getattr(module, "_compiled_call_impl", None) is not None:
            # module.compile() runs the module's hooks inside the compiled code, where the call count would be guarded.
            raise ValueError("StepSchedule.apply: this module was compiled with module.compile(), whose hooks Dynamo "
                             "traces; compile it as compiled = torch.compile(module, ...) and apply the schedule to compiled")
        self.schedule, self.module = schedule, module
        # One flag per call of a sampling run: the hook's work is an index and an attribute write.
        self._dense_by_call = tuple(step in schedule.dense_steps for step in range(schedule.num_steps)
                                    for _ in range(schedule.calls_per_step))
        self.calls = self.dense_calls = 0
        self._handles: list[Any] = []
        self._outer: tuple[bool, bool] = (False, False)
        self._before_call = False

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self._before_call = SWITCH.dense
        dense = self._dense_by_call[self.calls % len(self._dense_by_call)]
        self.calls += 1
        self.dense_calls += dense
        SWITCH.dense = dense

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        SWITCH.dense = self._before_call

    def __enter__(self) -> ScheduledSampling:
        self._outer = (SWITCH.dense, SWITCH.twin_ran)
        SWITCH.twin_ran = False
        self._handles = [self.module.register_forward_pre_hook(self._pre_hook),
                         # First of the post hooks: a context nested on the same module restores before the outer one.
                         self.module.register_forward_hook(self._post_hook, prepend=True, always_call=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        twin_ran = SWITCH.twin_ran
        SWITCH.dense, SWITCH.twin_ran = self._outer[0], self._outer[1] or twin_ran
        if exc[0] is not None:
            return
        from .diagnostics import LynxWarning

        per_run = len(self._dense_by_call)
        if self.calls % per_run:
            warnings.warn(f"lynx: {self.calls} forward calls under {self.schedule}, not a whole number of runs of "
                          f"{per_run} calls (num_steps * calls_per_step): the schedule does not match the sampler",
                          LynxWarning, stacklevel=2)
        if self.dense_calls and not twin_ran:
            warnings.warn("lynx: the dense steps found no lynx graph with a dense twin and ran sparse; compile with the "
                          "schedule in the config (torch.compile(model, backend='lynx', options={'step_schedule': schedule}))",
                          LynxWarning, stacklevel=2)


def measure_step_costs(sample: Callable[[], Any], model: Any, num_steps: int, *, calls_per_step: int = 1,
                       isolate: str = "sparse", progress: bool = False) -> list[float]:
    """What running each step sparse costs the final sample, one value per step (higher: keep it dense).

    ``sample()`` runs one whole sampling loop through ``model`` (compiled with a ``step_schedule`` in its lynx config)
    from fixed noise and returns the sample; it runs ``num_steps + 1`` times (``+ 2`` with ``isolate="dense"``).

    ``isolate="sparse"`` (default): ``costs[i]`` is the relative error of the sample with step i alone sparse against
    the all-dense sample. Each step's damage is measured from the dense trajectory, where the deviations are small
    and add up nearly linearly, so the ranking holds for schedules with few sparse steps and, as the
    per-layer model sensitivity of ``calibrate`` does, ranks by the error a step causes on its own.
    ``isolate="dense"``: ``costs[i]`` is how much making step i alone dense lowers the all-sparse sample's error: the
    ranking for schedules that keep only a few steps dense, where the steps interact with a trajectory that is
    already off."""
    if isolate not in ("sparse", "dense"):
        raise ValueError(f"measure_step_costs: isolate must be 'sparse' or 'dense', got {isolate!r}")
    StepSchedule(num_steps, calls_per_step=calls_per_step)  # checks both
    everything = frozenset(range(num_steps))

    def run(dense_steps: frozenset[int]) -> Any:
        with StepSchedule(num_steps, dense_steps, calls_per_step).apply(model):
            return _detached(sample())

    from .progress import progress as bar

    reference = run(everything)
    if isolate == "sparse":
        return [output_error(run(everything - {step}), reference)
                for step in bar(range(num_steps), progress, desc="lynx step costs", unit="step")]
    baseline = output_error(run(frozenset()), reference)
    return [baseline - output_error(run(frozenset({step})), reference)
            for step in bar(range(num_steps), progress, desc="lynx step costs", unit="step")]


def _detached(output: Any) -> Any:
    """A sample kept past the next run (a CUDA-graph output is overwritten by the next replay)."""
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, output)


__all__ = ["SWITCH", "ScheduledSampling", "StepSchedule", "dense_forward", "measure_step_costs"]
