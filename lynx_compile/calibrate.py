"""Calibration: per-layer LoRA factors for ``compensation="lora"`` and measured sensitivities.

    comp = lynx_compile.calibrate(model, batches, LynxConfig())   # batches: forward-call args
    print(comp.table())                                           # error: none / norm / norm+LoRA
    compiled = torch.compile(model, backend=lynx_compile.backend(comp.config(dense_flop_budget=0.3)))
    comp.save("dit.lynx.safetensors"); comp = Compensation.load("dit.lynx.safetensors")

Method. The layers are exactly those the backend sparsifies (``explain()`` on the first batch).
Forward hooks stream each layer's input tokens into a bounded reservoir (uniform sample of all
rows seen, ``max_rows`` per layer), so memory does not grow with the number of batches. Per layer,
on a random training split of the rows, the LoRA product ``A^T B^T`` (``lora_down`` A (r, K),
``lora_up`` B (N, r)) is fitted to the residual ``R = X W^T - s * S(X) W^T`` by reduced-rank ridge
regression, the exact rank-r minimiser of ``||X A^T B^T - R||^2`` for ridge-regularised X^T X:

    C = (X^T X + lam I)^-1 X^T R          full-rank ridge solution (K, N)
    V = top-r right singular vectors of X C (the fitted outputs), (N, r)
    A = (C V)^T, B = V

Why: it is one K x K eigendecomposition (shared by every ridge tried) and one small SVD per
layer, seconds in all, deterministic, and it is the optimum that gradient descent on the same
loss could only approach. The ridge matters: with a few thousand rows and K up to 4.6k, an
unregularised fit chases noise (on dit-s-2's fc2 its held-out error was worse than norm alone), so it
is picked per layer from ``RIDGES`` on a validation fifth of the training rows. The residual is
not exactly linear in X, so ``steps`` Adam iterations on the same loss can follow; default 0,
as they did not lower the held-out error in our runs. Errors are relative output errors
``||Y - Y'|| / ||Y||`` (Y the dense output, bias included) on the held-out rows.

A layer's own error does not say what it costs the model: on the trained digits DiT the first
block's MLP up-projection has an ordinary layer error but causes most of the whole-model error.
So calibration also makes each layer sparse alone on a few batches and records the whole
model's output error (``Compensation.model_sensitivity``), the measure to rank layers by when a
budget keeps some dense.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from tabulate import tabulate
from torch import Tensor, nn

from .config import LynxConfig
from .ops import sparse_linear_reference
from .progress import progress as show_progress

log = logging.getLogger("lynx_compile.calibrate")

_SELECTION_FIELDS = ("pattern", "eps", "include", "exclude", "sparse_roles", "min_features")
"""Config fields that decide which layers are sparse and how: saved with the factors."""


@dataclass
class LayerCalibration:
    """What calibration measured and fitted for one linear layer."""

    name: str
    in_features: int
    out_features: int
    rank: int
    """Rank of the fitted factors (the requested rank, capped by K, N and the training rows)."""
    pattern: str
    ridge: float
    """Ridge strength of the fit, relative to mean(diag(x^T x)) (chosen per layer by default)."""
    rows_train: int
    rows_heldout: int
    error_none: float
    """Relative output error on held-out rows of plain N:M sparsity."""
    error_norm: float
    """... with norm compensation (``Compensation.layer_sensitivity``)."""
    error_lora: float
    """... with norm compensation and the fitted LoRA."""
    lora_down: Tensor
    """(rank, in_features), fp32."""
    lora_up: Tensor
    """(out_features, rank), fp32."""
    model_error_norm: float | None = None
    """Relative error of the whole model's output when this layer alone is sparse (norm
    compensation), mean over the first ``model_batches`` batches; None when not measured."""
    model_error_lora: float | None = None
    """... with norm compensation and the fitted LoRA."""

    def metadata(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lora_down", "lora_up")}


class Compensation(Mapping):
    """Calibrated LoRA factors, as a mapping ``module name -> (lora_down, lora_up)``.

    Use it as ``LynxConfig(compensation="lora", compensation_state=comp)`` (and
    ``sensitivity=comp`` for sensitivity-driven selection, ranked by ``comp.sensitivity()``),
    or just ``comp.config(...)``.
    ``layers[name]`` holds the per-layer metadata and errors.
    """

    def __init__(self, layers: Mapping[str, LayerCalibration], selection: Mapping[str, Any]):
        self.layers = dict(layers)
        self.selection = {k: (sorted(v) if k == "sparse_roles" else v) for k, v in selection.items()}
        """The config fields (``_SELECTION_FIELDS``) calibration selected layers with, as JSON values."""

    @property
    def pattern(self) -> str:
        return self.selection["pattern"]

    def __getitem__(self, name: str) -> tuple[Tensor, Tensor]:
        layer = self.layers[name]
        return layer.lora_down, layer.lora_up

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"Compensation({len(self)} layers, pattern {self.pattern}, rank {sorted({l.rank for l in self.layers.values()})})"

    @property
    def layer_sensitivity(self) -> dict[str, float]:
        """Relative error of each layer's own output under sparsification with norm compensation."""
        return {name: layer.error_norm for name, layer in self.layers.items()}

    def model_sensitivity(self, compensation: str = "lora") -> dict[str, float]:
        """Whole-model relative output error with only that layer sparse (``compensation``
        ``"norm"`` or ``"lora"``): what a layer costs the model, where ``layer_sensitivity`` is
        what it costs its own output."""
        if compensation not in ("norm", "lora"):
            raise ValueError(f"model_sensitivity: compensation must be 'norm' or 'lora', got {compensation!r}")
        errors = {name: getattr(layer, f"model_error_{compensation}") for name, layer in self.layers.items()}
        if None in errors.values():
            raise ValueError("model_sensitivity: not measured; calibrate with model_batches > 0")
        return errors

    def sensitivity(self, compensation: str = "lora") -> dict[str, float]:
        """The errors selection ranks layers by (``LynxConfig(sensitivity=comp)`` calls this with
        its compensation): the whole-model errors when measured, else each layer's own error.
        On the trained digits DiT only the whole-model ranking found the layer that mattered."""
        if all(layer.model_error_norm is not None for layer in self.layers.values()):
            return self.model_sensitivity("lora" if compensation == "lora" else "norm")
        return self.layer_sensitivity

    def mean_errors(self) -> dict[str, float]:
        """Mean over layers of the held-out relative error: ``none``, ``norm``, ``lora``."""
        count = max(len(self.layers), 1)
        return {
            kind: sum(getattr(layer, f"error_{kind}") for layer in self.layers.values()) / count
            for kind in ("none", "norm", "lora")
        }

    def config(self, **overrides: Any) -> LynxConfig:
        """A ``LynxConfig`` running these factors on the layers they were calibrated for."""
        return LynxConfig(**{**self.selection, "compensation": "lora", "compensation_state": self, "sensitivity": self, **overrides})

    def table(self, tablefmt: str = "simple") -> str:
        whole = all(l.model_error_norm is not None for l in self.layers.values())
        rows = [
            (l.name, f"{l.in_features} -> {l.out_features}", l.rank, l.error_none, l.error_norm, l.error_lora)
            + ((l.model_error_norm, l.model_error_lora) if whole else ())
            for l in self.layers.values()
        ]
        mean = self.mean_errors()
        rows.append(("mean", "", "", mean["none"], mean["norm"], mean["lora"]))
        headers = ("layer", "K -> N", "rank", "error none", "error norm", "error norm+LoRA") + (
            ("model error norm", "model error norm+LoRA") if whole else ())
        return tabulate(rows, headers=headers, tablefmt=tablefmt, floatfmt=".4f")

    def save(self, path: str | os.PathLike) -> None:
        """safetensors when installed (tensors ``<name>.lora_down``/``.lora_up``, metadata as JSON), else torch.save."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.lora_down"] = layer.lora_down.detach().cpu().float().contiguous()
            tensors[f"{name}.lora_up"] = layer.lora_up.detach().cpu().float().contiguous()
        metadata = json.dumps({
            "format": "lynx-compensation/1",
            "selection": self.selection,
            "layers": [layer.metadata() for layer in self.layers.values()],
        })
        try:
            from safetensors.torch import save_file
        except ImportError:
            torch.save({"metadata": metadata, "tensors": tensors}, path)
        else:
            save_file(tensors, str(path), metadata={"lynx": metadata})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Compensation:
        with open(path, "rb") as file:
            is_zip = file.read(4) == b"PK\x03\x04"  # torch.save's format
        if is_zip:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            metadata, tensors = payload["metadata"], payload["tensors"]
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as file:
                metadata = (file.metadata() or {}).get("lynx")
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        if metadata is None:
            raise ValueError(f"Compensation.load: {path} holds no lynx compensation metadata")
        metadata = json.loads(metadata)
        layers = {
            meta["name"]: LayerCalibration(
                **meta, lora_down=tensors[f"{meta['name']}.lora_down"], lora_up=tensors[f"{meta['name']}.lora_up"]
            )
            for meta in metadata["layers"]
        }
        return cls(layers, metadata["selection"])


class _Reservoir:
    """A uniform sample of at most ``capacity`` of all the rows ever added (Algorithm R, batched)."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.rows: Tensor | None = None
        self.filled = self.seen = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1])
        if self.rows is None:
            self.rows = rows.new_empty(self.capacity, rows.shape[-1])
        take = min(self.capacity - self.filled, rows.shape[0])
        self.rows[self.filled : self.filled + take] = rows[:take]
        self.filled += take
        self.seen += take
        rest = rows[take:]
        if rest.shape[0]:
            # Row j (0-based over all rows seen) replaces a random slot with probability capacity / (j + 1).
            index = torch.arange(self.seen, self.seen + rest.shape[0], dtype=torch.float64)
            draw = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            accepted = (draw < self.capacity).nonzero().squeeze(1)
            slots = draw[accepted]
            # Sequential Algorithm R lets the later of two rows drawn for one slot win.
            slots, last = _last_per_slot(slots)
            self.rows[slots.to(self.rows.device)] = rest[accepted[last].to(rest.device)]
            self.seen += rest.shape[0]

    def sample(self) -> Tensor | None:
        """The kept rows; None when the layer saw none."""
        return None if self.rows is None else self.rows[: self.filled]


def _last_per_slot(slots: Tensor) -> tuple[Tensor, Tensor]:
    unique, inverse = torch.unique(slots, return_inverse=True)
    last = torch.full((unique.numel(),), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(slots.numel()), reduce="amax"
    )
    return unique, last


def _call_args(batch: Any) -> tuple[tuple, dict]:
    """A batch as (args, kwargs): a tuple/list of args, (args, kwargs), a dict of kwargs, or one tensor."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], Mapping):
            return tuple(batch[0]), dict(batch[1])
        return tuple(batch), {}
    return (batch,), {}


def relative_error(output: Tensor, reference: Tensor) -> float:
    reference = reference.double()
    return ((output.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


RIDGES = (1e-2, 1e-1, 1.0)
"""Ridge strengths tried per layer when ``calibrate(ridge=None)``, relative to mean(diag(x^T x))."""


def fit_lora(x: Tensor, residual: Tensor, rank: int, ridge: float) -> tuple[Tensor, Tensor]:
    """(lora_down (r, K), lora_up (N, r)) minimising ||x A^T B^T - residual||^2 + ridge, closed form.

    ``ridge`` is relative to the mean diagonal of x^T x: it keeps the solve well posed when there
    are fewer rows than features, and stops the fit from chasing noise in rare directions.
    """
    return next(_reduced_rank_fits(x, residual, rank, [ridge]))


def _reduced_rank_fits(x: Tensor, residual: Tensor, rank: int, ridges: Iterable[float]) -> Iterator[tuple[Tensor, Tensor]]:
    """``fit_lora`` for several ridges, sharing one eigendecomposition of x^T x between them."""
    x64 = x.double()
    evals, evecs = torch.linalg.eigh(x64.t() @ x64)
    evals = evals.clamp_min(0)
    projected = evecs.t() @ (x64.t() @ residual.double())  # x^T R in the eigenbasis of x^T x
    for ridge in ridges:
        coef = projected / (evals + ridge * evals.mean().clamp_min(1e-30)).unsqueeze(1)  # ridge solution C, eigenbasis
        # Top right singular vectors of x C (through the (K, N) matrix sqrt(evals) C, which has
        # the same Gram): the rank-r output subspace that keeps most of the fitted output.
        _, _, vh = torch.linalg.svd(evals.sqrt().unsqueeze(1) * coef, full_matrices=False)
        top = vh[:rank].t()
        yield (evecs @ (coef @ top)).t().float().contiguous(), top.float().contiguous()


def _refine(x: Tensor, residual: Tensor, down: Tensor, up: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor]:
    """A few full-batch Adam steps on the mean squared residual, from the closed-form factors."""
    down, up = down.clone().requires_grad_(True), up.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([down, up], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = ((x @ down.t()) @ up.t() - residual).pow(2).mean()
            loss.backward()
            optimizer.step()
    return down.detach(), up.detach()


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

    from .backend import explain

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
    reservoirs = {name: _Reservoir(max_rows, generator) for name in selected}

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
    return Compensation(layers, {key: getattr(config, key) for key in _SELECTION_FIELDS})


def _tensors(output: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def _output_error(output: Any, reference: Any) -> float:
    """``||Y' - Y|| / ||Y||`` over every tensor the model returns."""
    pairs = list(zip(_tensors(output), _tensors(reference)))
    diff = sum(float((o.float() - r.float()).square().sum()) for o, r in pairs)
    norm = sum(float(r.float().square().sum()) for _, r in pairs)
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


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
                errors[compensation] = sum(_output_error(o, dense) for o, (_, _, dense) in zip(outputs, batches)) / len(batches)
            measured[name] = replace(layer, model_error_norm=errors["norm"], model_error_lora=errors["lora"])
            log.info("calibrate %s: whole-model error norm %.4f, norm+LoRA %.4f", name, errors["norm"], errors["lora"])
    return measured


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _calibrate_layer(
    name: str, module: nn.Linear, rows: Tensor, config: LynxConfig, rank: int,
    holdout: float, ridge: float | None, steps: int, lr: float, generator: torch.Generator,
) -> LayerCalibration:
    if rows is None or rows.shape[0] < 4:
        raise ValueError(f"calibrate: layer {name} saw {0 if rows is None else rows.shape[0]} tokens; need at least 4")
    # Fitting runs in fp32 (fp64 for the solve) whatever the model dtype: bf16 rows are exact in fp32.
    x = rows.float()
    weight = module.weight.detach().to(x.device, torch.float32)
    bias = None if module.bias is None else module.bias.detach().to(x.device, torch.float32)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    n_heldout = max(1, round(holdout * x.shape[0]))
    train, heldout = x[order[n_heldout:]], x[order[:n_heldout]]

    def sparse(x: Tensor, norm: bool, down: Tensor | None = None, up: Tensor | None = None, bias=bias) -> Tensor:
        return sparse_linear_reference(x, weight, bias, config.n, config.m, norm, config.eps, down, up)

    residual = train @ weight.t() - sparse(train, True, bias=None)
    r = min(rank, module.in_features, module.out_features, train.shape[0])
    if ridge is None:
        # Pick the ridge on a validation part of the training rows (never the held-out ones).
        n_val = max(1, train.shape[0] // 5)
        fits = _reduced_rank_fits(train[n_val:], residual[n_val:], r, RIDGES)
        val_errors = [relative_error(train[:n_val] @ d.t() @ u.t(), residual[:n_val]) for d, u in fits]
        ridge = RIDGES[min(range(len(RIDGES)), key=val_errors.__getitem__)]
    down, up = fit_lora(train, residual, r, ridge)
    if steps:
        down, up = _refine(train, residual, down, up, steps, lr)
    reference = torch.nn.functional.linear(heldout, weight, bias)
    return LayerCalibration(
        name=name, in_features=module.in_features, out_features=module.out_features, rank=r,
        pattern=config.pattern, ridge=ridge, rows_train=train.shape[0], rows_heldout=heldout.shape[0],
        error_none=relative_error(sparse(heldout, False), reference),
        error_norm=relative_error(sparse(heldout, True), reference),
        error_lora=relative_error(sparse(heldout, True, down, up), reference),
        lora_down=down.cpu(), lora_up=up.cpu(),
    )


__all__ = ["Compensation", "LayerCalibration", "calibrate", "fit_lora"]
