"""Calibration: per-layer LoRA factors for ``compensation="lora"`` and measured sensitivities.

    comp = lynx_compile.calibrate(model, batches, LynxConfig())   # batches: forward-call args
    print(comp.table())                                           # error: none / norm / norm+LoRA
    compiled = torch.compile(model, backend=lynx_compile.backend(comp.config(dense_flop_budget=0.3)))
    comp.save("dit.lynx.safetensors"); comp = Compensation.load("dit.lynx.safetensors")

Method. The layers are exactly those the backend sparsifies (``explain()`` on the first batch).
Forward hooks stream each layer's input tokens into a bounded reservoir (uniform sample of all
rows seen, ``max_rows`` per layer), so memory does not grow with the number of batches. Each
layer's factors are then fitted in closed form on its sample (``lynx_compile.fit``).

A layer's own error does not say what it costs the model: on the trained digits DiT the first
block's MLP up-projection has an ordinary layer error but causes most of the whole-model error.
So calibration also makes each layer sparse alone on a few batches and records the whole
model's output error (``Compensation.model_sensitivity``), the measure to rank layers by when a
budget keeps some dense.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .backend import explain
from .compensation import SELECTION_FIELDS, Compensation, LayerCalibration
from .config import LynxConfig
from .fit import Reservoir, fit_layer, fit_lora
from .metrics import output_error
from .ops import sparse_linear_reference
from .progress import progress as show_progress

log = logging.getLogger("lynx_compile.calibrate")


def _call_args(batch: Any) -> tuple[tuple, dict]:
    """A batch as (args, kwargs): a tuple/list of args, (args, kwargs), a dict of kwargs, or one tensor."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], Mapping):
            return tuple(batch[0]), dict(batch[1])
        return tuple(batch), {}
    return (batch,), {}


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    config: LynxConfig | None = None,
    *,
    rank: int = 64,
    max_rows: int = 4096,
    holdout: float = 0.25,
    ridge: float | None = None,
    steps: int = 0,
    lr: float = 1e-4,
    seed: int = 0,
    model_batches: int = 4,
    progress: bool = True,
) -> Compensation:
    """Fit LoRA factors and measure sensitivities for every layer ``config`` makes sparse.

    ``batches``: forward-call arguments of ``model``, each a tuple of args, ``(args, kwargs)``, a
    dict of kwargs or a single tensor (e.g. a few denoising steps at several timesteps). Layers
    are selected as the backend would with ``config`` (its selection fields; its compensation,
    sensitivity and budget are ignored so that every candidate layer is calibrated). Each
    layer keeps a uniform reservoir of at most ``max_rows`` input tokens, in the model's dtype
    on the model's device; ``holdout`` of them are held out for the reported errors. ``rank``
    is capped per layer by K, N and the training rows. ``steps`` > 0 adds Adam refinement.
    On the first ``model_batches`` batches each layer is then made sparse alone, with norm and
    with norm + LoRA compensation, and the whole model's output error is recorded
    (``Compensation.model_sensitivity``): 2 x layers x model_batches extra forwards.
    ``progress`` shows tqdm bars (the results are also logged to ``lynx_compile.calibrate``).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"calibrate: rank must be an int > 0, got {rank!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 8:
        raise ValueError(f"calibrate: max_rows must be an int >= 8, got {max_rows!r}")
    if not 0 < holdout < 1:
        raise ValueError(f"calibrate: holdout must be a fraction in (0, 1), got {holdout!r}")
    if isinstance(model_batches, bool) or not isinstance(model_batches, int) or model_batches < 0:
        raise ValueError(f"calibrate: model_batches must be an int >= 0, got {model_batches!r}")
    if (ridge is not None and not ridge >= 0) or steps < 0:
        raise ValueError(f"calibrate: need ridge >= 0 and steps >= 0, got ridge={ridge!r}, steps={steps!r}")
    if config is not None and not isinstance(config, LynxConfig):
        raise ValueError(f"calibrate: config must be a LynxConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: hook the original modules
    config = replace(
        config or LynxConfig(), compensation="norm", compensation_state=None,
        sensitivity=None, max_layer_error=None, dense_flop_budget=None,
    )

    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("calibrate: batches is empty; pass at least one batch of forward-call arguments") from None

    args, kwargs = _call_args(first)
    report = explain(model, *args, config=config, **kwargs)
    modules = dict(model.named_modules())
    selected: dict[str, nn.Linear] = {}
    for layer in report.sparse:
        module = modules.get(layer.name)
        if isinstance(module, nn.Linear):
            selected[layer.name] = module
        else:
            log.warning("calibrate: sparse layer %s is not an nn.Linear module; it gets no LoRA (norm only)", layer.name)
    if not selected:
        raise ValueError(
            f"calibrate: the backend makes no nn.Linear layer of {type(model).__name__} sparse with this config "
            f"({len(report.layers)} linear layers, all dense); nothing to calibrate"
        )

    generator = torch.Generator().manual_seed(seed)
    reservoirs = {name: Reservoir(max_rows, generator) for name in selected}

    def hook(name: str):
        return lambda module, inputs: reservoirs[name].add(inputs[0])

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in selected.items()]
    batches_seen, kept_batches = 0, []
    try:
        with torch.no_grad():
            for batch in show_progress(_chain(first, iterator), progress, desc="lynx calibrate: capture", unit="batch"):
                args, kwargs = _call_args(batch)
                output = model(*args, **kwargs)  # the pre-hooks only read: this is the dense output
                batches_seen += 1
                if len(kept_batches) < model_batches:
                    kept_batches.append((args, kwargs, output))
    finally:
        for handle in handles:
            handle.remove()
    log.info("calibrate: captured %d batches into %d layers", batches_seen, len(selected))

    layers = {}
    for name in show_progress(list(selected), progress, desc="lynx calibrate: fit", unit="layer"):
        layers[name] = _calibrate_layer(
            name, selected[name], reservoirs.pop(name).sample(), config, rank, holdout, ridge, steps, lr, generator
        )
        l = layers[name]
        log.info("calibrate %s: error none %.4f, norm %.4f, norm+LoRA %.4f (rank %d)",
                 name, l.error_none, l.error_norm, l.error_lora, l.rank)
    if kept_batches:
        layers = _measure_model_errors(model, kept_batches, selected, layers, config, progress)
    return Compensation(layers, {key: getattr(config, key) for key in SELECTION_FIELDS})


def _measure_model_errors(model: nn.Module, batches: list[tuple[tuple, dict, Any]], selected: dict[str, nn.Linear],
                          layers: dict[str, LayerCalibration], config: LynxConfig, progress: bool) -> dict[str, LayerCalibration]:
    """Each layer sparse alone (a forward hook swaps its output): the whole model's error per
    layer, against the dense outputs the capture pass kept with each batch."""
    with torch.no_grad():
        measured = {}
        for name in show_progress(list(selected), progress, desc="lynx calibrate: whole-model error", unit="layer"):
            module, layer = selected[name], layers[name]
            errors = {}
            for compensation in ("norm", "lora"):
                factors = (layer.lora_down, layer.lora_up) if compensation == "lora" else (None, None)

                def sparse_output(module, inputs, output, factors=factors):
                    x = inputs[0]
                    down, up = (None, None) if factors[0] is None else (f.to(x.device, x.dtype) for f in factors)
                    return sparse_linear_reference(x, module.weight, module.bias, config.n, config.m, True, config.eps, down, up)

                handle = module.register_forward_hook(sparse_output)
                try:
                    outputs = [model(*args, **kwargs) for args, kwargs, _ in batches]
                finally:
                    handle.remove()
                errors[compensation] = sum(output_error(o, dense) for o, (_, _, dense) in zip(outputs, batches)) / len(batches)
            measured[name] = replace(layer, model_error_norm=errors["norm"], model_error_lora=errors["lora"])
            log.info("calibrate %s: whole-model error norm %.4f, norm+LoRA %.4f", name, errors["norm"], errors["lora"])
    return measured


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _calibrate_layer(
    name: str, module: nn.Linear, rows: Tensor | None, config: LynxConfig, rank: int,
    holdout: float, ridge: float | None, steps: int, lr: float, generator: torch.Generator,
) -> LayerCalibration:
    if rows is None or rows.shape[0] < 4:
        raise ValueError(f"calibrate: layer {name} saw {0 if rows is None else rows.shape[0]} tokens; need at least 4")
    fit = fit_layer(rows, module.weight, module.bias, config, rank=rank, holdout=holdout, ridge=ridge,
                    steps=steps, lr=lr, generator=generator)
    return LayerCalibration(name=name, in_features=module.in_features, out_features=module.out_features,
                            pattern=config.pattern, **{f.name: getattr(fit, f.name) for f in fields(fit)})


__all__ = ["Compensation", "LayerCalibration", "calibrate", "fit_lora"]
