"""The result of calibration: per-layer LoRA factors and measured errors, and their file format.

    comp = lynx_compile.calibrate(model, batches, LynxConfig())
    compiled = torch.compile(model, backend=lynx_compile.backend(comp.config(dense_flop_budget=0.3)))
    comp.save("dit.lynx.safetensors"); comp = Compensation.load("dit.lynx.safetensors")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor

from .config import LynxConfig
from .fit import LayerFit

SELECTION_FIELDS = ("pattern", "eps", "include", "exclude", "sparse_roles", "min_features")
"""Config fields that decide which layers are sparse and how: saved with the factors."""

FORMAT = "lynx-compensation/1"


@dataclass(frozen=True)
class LayerCalibration(LayerFit):
    """What calibration measured and fitted for one linear layer: its fit, and the layer it belongs to."""

    name: str
    in_features: int
    out_features: int
    pattern: str
    model_error_norm: float | None = None
    """Relative error of the whole model's output when this layer alone is sparse (norm
    compensation), mean over the first ``model_batches`` batches; None when not measured."""
    model_error_lora: float | None = None
    """... with norm compensation and the fitted LoRA."""

    def metadata(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lora_down", "lora_up")}


class Compensation(Mapping):
    """Calibrated LoRA factors, as a mapping ``module name -> (lora_down, lora_up)``.

    ``comp.config(...)`` is the ``LynxConfig`` that runs them (``compensation="lora"``, ranked by
    ``comp.sensitivity()``). ``layers[name]`` holds the per-layer metadata and errors.
    """

    def __init__(self, layers: Mapping[str, LayerCalibration], selection: Mapping[str, Any]):
        self.layers = dict(layers)
        self.selection = {k: (sorted(map(str, v)) if k == "sparse_roles" else v) for k, v in selection.items()}
        """The config fields (``SELECTION_FIELDS``) calibration selected layers with, as JSON values."""

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
        """The errors selection ranks layers by under ``compensation`` (``config()`` passes its
        own): the whole-model errors when measured, else each layer's own error.
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
        """A ``LynxConfig`` running these factors on the layers they were calibrated for.

        Defaults: the calibration's selection fields, ``compensation="lora"``, the factors as
        ``compensation_state`` and ``sensitivity(compensation)`` as ``sensitivity``; ``overrides``
        replace any of them. An overriding ``pattern`` must be the calibrated one.
        """
        compensation = overrides.get("compensation", "lora")
        config = LynxConfig(**{
            **self.selection,
            "compensation": compensation,
            "compensation_state": dict(self),
            "sensitivity": self.sensitivity(compensation),
            **overrides,
        })
        if config.pattern != self.pattern:
            raise ValueError(f"Compensation.config: calibrated for pattern {self.pattern}, but pattern is {config.pattern}")
        return config

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
        """safetensors when installed (tensors ``<name>.lora_down``/``.lora_up``, metadata as JSON), else torch.save.

        The file is created like any other (mode ``0o666 & ~umask``).
        """
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.lora_down"] = layer.lora_down.detach().cpu().float().contiguous()
            tensors[f"{name}.lora_up"] = layer.lora_up.detach().cpu().float().contiguous()
        metadata = json.dumps({
            "format": FORMAT,
            "selection": self.selection,
            "layers": [layer.metadata() for layer in self.layers.values()],
        })
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError:
            torch.save({"metadata": metadata, "tensors": tensors}, path)
            return
        # safetensors' save_file creates its file with mode 0600 whatever the umask; writing its
        # bytes here gives the file the permissions every other file gets.
        payload = safetensors_bytes(tensors, metadata={"lynx": metadata})
        with open(path, "wb") as file:
            file.write(payload)

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


__all__ = ["Compensation", "LayerCalibration", "SELECTION_FIELDS"]
