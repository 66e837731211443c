"""The ``lynx`` torch.compile backend: lynx graph passes, then Inductor for everything else."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (defines torch.ops.lynx.*)
from .config import LynxConfig
from .diagnostics import graph_warnings, warn_once
from .passes import DUMP_DIR_ENV, PassContext, run_pipeline
from .passes.graph import tensor_rank
from .report import LayerDecision, Report
from .steps import SWITCH
from .types import Decision

log = logging.getLogger("lynx_compile")
_graph_counter = itertools.count()

INFERENCE_ONLY = (
    "lynx: inference only; the lynx ops have no backward (run under torch.no_grad() / torch.inference_mode(), "
    "or compile without lynx for training)"
)


class _NoBackward(torch.autograd.Function):
    """Gives the outputs of a lynx graph, computed without autograd, a backward that says why there is none."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Not views of the inputs: a view made in a custom Function cannot be modified in place.
        return tuple(output.detach() for output in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(INFERENCE_ONLY)


def _inference_only(run: Callable) -> Callable:
    """``run`` without autograd. Where grad mode is on and an input requires grad, a backward
    through the floating-point outputs raises ``INFERENCE_ONLY`` instead of torch's "does not
    require grad", or instead of silently leaving out the layers before them."""

    def compiled(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return run(*args)
        with torch.no_grad():
            outputs = run(*args)
        anchor = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None)
        if anchor is None or not isinstance(outputs, (list, tuple)):
            return outputs
        index = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor) and out.is_floating_point()]
        result = list(outputs)
        for i, out in zip(index, _NoBackward.apply(anchor, *(outputs[i] for i in index)) if index else ()):
            result[i] = out
        return result if isinstance(outputs, list) else tuple(result)

    return compiled


def _switched(sparse: Callable, dense: Callable) -> Callable:
    """One callable for a graph compiled twice: its dense twin while ``steps.SWITCH.dense`` is set (a dense
    step of a ``StepSchedule``), else the lynx graph. Read per call in plain Python, so the step is in no
    Dynamo guard and switching never recompiles."""
    switch = SWITCH

    def compiled(*args: Any) -> Any:
        if switch.dense:
            switch.twin_ran = True
            return dense(*args)
        return sparse(*args)

    return compiled


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph the lynx passes can rewrite apart: new nodes (their ``meta`` dicts
    copied, the recorded fake values shared), the same parameters and submodules, and the attributes
    Dynamo set on ``gm`` and its nodes (sources, graph-break reason) for the passes and AOT autograd."""
    twin = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    twin.meta = dict(gm.meta)
    for node, copied in zip(gm.graph.nodes, twin.graph.nodes):
        # Dynamo marks each placeholder with its source (_dynamo_source), which AOT autograd reads.
        for key, value in vars(node).items():
            vars(copied).setdefault(key, value)
    for key, value in vars(gm).items():
        if key not in vars(twin):
            # The passes register the constants they add in _param_name_to_source: one dict per graph.
            twin.__dict__[key] = copy.copy(value) if isinstance(value, (dict, list)) else value
    return twin


def _dense_config(config: LynxConfig) -> LynxConfig:
    """``config`` with no layer sparse: what a dense step runs (in the config's precision)."""
    return dataclasses.replace(config, include=None, exclude=None, sparse_roles=frozenset(), compensation="none",
                               compensation_state=None, sensitivity=None, max_layer_error=None, dense_flop_budget=None,
                               step_schedule=None)


class LynxBackend:
    """A Dynamo backend callable; ``report`` collects the decisions of every graph it compiled."""

    def __init__(self, config: LynxConfig | None = None, *, inductor: bool = True, dump_dir: str | None = None,
                 warn: bool = True):
        if config is not None and not isinstance(config, LynxConfig):
            raise ValueError(f"lynx backend: config must be a LynxConfig, got {type(config).__name__}")
        self.config = config or LynxConfig()
        self.inductor = inductor
        self.dump_dir = dump_dir
        self.warn = warn
        """Emit a ``LynxWarning`` (once per cause) for a graph left with no sparse layer, or with layers
        kept dense by a graph break; ``trace()`` and ``explain()`` report instead."""
        self.report = Report()
        self.graph_modules: list[fx.GraphModule] = []
        """The rewritten graphs, kept when Inductor is skipped (explain, lynx-dump)."""

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                 mode: str | None = None) -> Callable:
        """``options`` override config fields; ``mode`` is torch.compile's, applied to Inductor
        (``"reduce-overhead"``: CUDA graphs; ``"max-autotune"``...). With a ``step_schedule`` in the
        config, a graph with sparse layers is compiled twice (see ``_switched``)."""
        config = self.config.with_options(options)
        from . import kernels

        kernels.load()  # once: builds/loads the CUDA kernels of the lynx ops where a GPU takes them; False elsewhere
        graph_index = next(_graph_counter)
        # Taken before the passes rewrite gm: the graph a dense step runs.
        twin = _graph_copy(gm) if config.step_schedule is not None else None
        ctx = PassContext(gm, list(example_inputs), config, graph_index=graph_index)
        run_pipeline(gm, ctx, self.dump_dir)
        compiled = self._compile(gm, example_inputs, mode)
        if not self.inductor:
            self.graph_modules.append(gm)
        if twin is not None and any(d.decision == Decision.SPARSE for d in ctx.decisions):
            # Its decisions (all dense) are not reported: the report describes the lynx graph.
            dense_ctx = PassContext(twin, list(example_inputs), _dense_config(config), graph_index=graph_index,
                                    breaks=ctx.breaks)
            dump_dir = self.dump_dir or os.environ.get(DUMP_DIR_ENV)
            run_pipeline(twin, dense_ctx, os.path.join(dump_dir, "dense-twin") if dump_dir else None)
            compiled = _switched(compiled, self._compile(twin, example_inputs, mode))
        # Recorded only now: Inductor may raise to make Dynamo restart the trace, and the
        # retried graph then comes through here again.
        self._record(ctx.decisions, graph_index)
        if self.warn:
            has_token_dim = any((tensor_rank(node) or 0) > 2 for node in gm.graph.nodes)
            warn_once(graph_warnings(ctx.decisions, config, has_token_dim))
        return _inference_only(compiled)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable:
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        # Inference only: compiling under no_grad gives Inductor an inference graph, and
        # the lynx ops have no backward.
        mode_options = torch._inductor.list_mode_options(mode) if mode else {}
        with torch.no_grad(), torch._inductor.config.patch(mode_options):
            return compile_fx(gm, list(example_inputs))

    def _record(self, decisions: list[LayerDecision], graph_index: int) -> None:
        for decision in decisions:
            decision.graph = self.report.graphs
        self.report.graphs += 1
        self.report.layers.extend(decisions)
        sparse = sum(d.decision == Decision.SPARSE for d in decisions)
        log.info("lynx graph %d: %d of %d linear layers sparse", graph_index, sparse, len(decisions))


def backend(config: LynxConfig | None = None, **options: Any) -> LynxBackend:
    """A backend for ``torch.compile(model, backend=lynx_compile.backend(config))``.

    Keyword options, if given, override fields of ``config`` (``backend(pattern="4:8")``).
    """
    return LynxBackend((config or LynxConfig()).with_options(options))


def lynx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                 mode: str | None = None) -> Callable:
    """The backend registered as ``"lynx"`` (entry point ``torch_dynamo_backends``)."""
    return LynxBackend(LynxConfig.from_options(options))(gm, example_inputs, mode=mode)


def trace(model: torch.nn.Module | Callable, args: Sequence[Any], kwargs: dict, recorder: LynxBackend,
          dynamic: bool | None = False) -> Report:
    """Run ``model(*args, **kwargs)`` once under ``torch.compile(backend=recorder)``; its report."""
    breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
    recorder.warn = False  # the report says it all
    compiled = torch.compile(model, backend=recorder, dynamic=dynamic)
    # A fresh backend object is a new cache entry for every traced frame: lift the limit so
    # Dynamo does not silently fall back to eager on models traced many times already.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
        compiled(*args, **kwargs)
    if recorder.report.graphs == 0:
        raise RuntimeError("lynx: Dynamo traced no graph of this model (it ran eagerly)")
    breaks_after = torch._dynamo.utils.counters["graph_break"]
    recorder.report.graph_breaks = [
        reason for reason, count in breaks_after.items() if count > breaks_before.get(reason, 0)
    ]
    return recorder.report


def explain(model: torch.nn.Module | Callable, *example_inputs: Any, config: LynxConfig | None = None,
            **example_kwargs: Any) -> Report:
    """Trace ``model`` on the example inputs and report, per linear layer, what lynx would do.

    Runs the lynx passes exactly as ``torch.compile(model, backend="lynx")`` would, but skips
    Inductor, so it is quick. Graph breaks show up in the report.
    """
    return trace(model, example_inputs, example_kwargs, LynxBackend(config, inductor=False))


__all__ = ["LayerDecision", "LynxBackend", "Report", "backend", "explain", "lynx_backend", "trace"]
