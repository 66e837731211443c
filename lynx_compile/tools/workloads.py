"""Models with inputs, as the command-line tools (``lynx-bench``, ``lynx-dump``) load them.

A model spec is one of:

* a built-in name (``dit-xl-2``, ``flux-dev``... see ``lynx_compile.models.NAMES``);
* ``module:factory``: a callable returning ``model``, ``(model, args)`` or ``(model, args, kwargs)``;
  given a diffusers config, it is called as ``factory(config=dict)`` and must accept ``config``;
* a diffusers class name (``FluxTransformer2DModel``...) with a diffusers config (``config.json``);
  random weights, inputs derived from the config.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import models

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Serving shapes: (batch, resolution in pixels, classifier-free guidance).
SERVING = {"dit": (8, 256, True), "pixart-xl-2": (1, 1024, True), "flux-dev": (1, 1024, False), "mmdit-tiny": (1, 256, False)}
# --quick: the same architectures, small enough for a 2-core CPU.
QUICK_OVERRIDES = {
    "dit": dict(depth=2, hidden=256),
    "pixart-xl-2": dict(depth=2, hidden=256, caption_channels=256),
    "flux-dev": dict(depth=1, single_depth=1, hidden=256, context_dim=256, vec_dim=64),
    "mmdit-tiny": dict(depth=1, single_depth=1),
}
QUICK_SHAPES = {"dit": (2, 256, False), "pixart-xl-2": (1, 128, False), "flux-dev": (1, 128, False),
                "mmdit-tiny": (1, 128, False)}
QUICK_TEXT_TOKENS = 32


def describe_overrides(overrides: dict[str, Any]) -> str:
    """``depth 2, hidden 256``: model config overrides as people read them."""
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in overrides.items())


class WorkloadError(ValueError):
    """A model spec or input option that cannot be honoured: the tools print it as one line."""


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: str = ""
    """Human-readable input shape summary for tables."""
    batch: int = 1
    make_inputs: Callable[..., tuple[tuple, dict]] | None = None
    """``make_inputs(batch, resolution=None, text_tokens=None)``: fresh ``(args, kwargs)`` at
    other shapes (resolution in pixels), where the input recipe is known."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields of a built-in model that differ from its published size (``--quick``)."""
    quick: bool = False

    @property
    def label(self) -> str:
        """The name of the model that actually runs: ``dit-xl-2 (quick: depth 2, hidden 256)``."""
        if not self.model_overrides:
            return self.name
        return f"{self.name} ({'quick: ' if self.quick else ''}{describe_overrides(self.model_overrides)})"

    def __call__(self, model: Callable | None = None) -> Any:
        return (self.model if model is None else model)(*self.args, **self.kwargs)


def _family(name: str) -> str:
    return "dit" if name.startswith("dit-") else name


def builtin_workload(name, batch=None, resolution=None, text_tokens=None, dtype=torch.float32, device="cpu",
                     quick=False, cfg=None, **overrides) -> Workload:
    family = _family(name)
    default_batch, default_res, default_cfg = (QUICK_SHAPES if quick else SERVING)[family]
    if quick:
        overrides = {**QUICK_OVERRIDES[family], **overrides}
        text_tokens = text_tokens or QUICK_TEXT_TOKENS
    batch = batch or default_batch
    cfg = default_cfg if cfg is None else cfg
    resolution = resolution or default_res
    if family == "dit":
        overrides.setdefault("input_size", resolution // 8)
    with torch.device(device):
        model = models.build(name, **overrides).to(dtype).eval()
    def make_inputs(n: int, resolution: int | None = resolution, text_tokens: int | None = text_tokens) -> tuple[tuple, dict]:
        args = models.example_inputs(model, batch=n, resolution=resolution, text_tokens=text_tokens, dtype=dtype, device=device)
        return args, {}

    shape = f"{resolution}px, batch {batch}{' x2 (CFG)' if cfg else ''}"
    batch = 2 * batch if cfg else batch  # guidance runs the conditional and unconditional batch in one forward
    size_overrides = {key: value for key, value in overrides.items() if key != "input_size"}  # input_size follows the resolution
    return Workload(name, model, make_inputs(batch)[0], {}, shape, batch, make_inputs, size_overrides, quick)


def _diffusers_inputs(cls_name: str, config: dict, batch: int, resolution: int | None, text_tokens: int, dtype, device,
                      gen) -> dict:
    """Forward kwargs of a diffusers transformer; ``resolution`` in pixels (default: the config's)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sample = resolution // 8 if resolution else config.get("sample_size", 32)  # VAE factor 8
    channels = config.get("in_channels", 4)
    timestep = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    if cls_name == "DiTTransformer2DModel":
        return dict(hidden_states=randn(batch, channels, sample, sample), timestep=timestep,
                    class_labels=torch.randint(0, config.get("num_embeds_ada_norm", 1000), (batch,), generator=gen).to(device))
    if cls_name == "PixArtTransformer2DModel":
        return dict(hidden_states=randn(batch, channels, sample, sample), timestep=timestep,
                    encoder_hidden_states=randn(batch, text_tokens, config.get("caption_channels", 4096)),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if cls_name == "SD3Transformer2DModel":
        return dict(hidden_states=randn(batch, channels, sample, sample), timestep=timestep,
                    encoder_hidden_states=randn(batch, text_tokens, config.get("joint_attention_dim", 4096)),
                    pooled_projections=randn(batch, config.get("pooled_projection_dim", 2048)))
    if cls_name == "FluxTransformer2DModel":
        side = resolution // 16 if resolution else config.get("sample_size", 32)  # 2x2-packed latents
        kwargs = dict(hidden_states=randn(batch, side * side, channels), timestep=torch.rand(batch, generator=gen).to(device),
                      encoder_hidden_states=randn(batch, text_tokens, config.get("joint_attention_dim", 4096)),
                      pooled_projections=randn(batch, config.get("pooled_projection_dim", 768)),
                      img_ids=torch.randn(side * side, 3, generator=gen).to(device),
                      txt_ids=torch.zeros(text_tokens, 3, device=device))
        if config.get("guidance_embeds", True):
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device)
        return kwargs
    raise WorkloadError(f"no input recipe for diffusers class {cls_name!r}; supported: DiT, PixArt, SD3, Flux transformers")


class DiffusersSample(torch.nn.Module):
    """A diffusers transformer returning its sample tensor (``return_dict=False``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.model(**kwargs, return_dict=False)[0]


def read_diffusers_config(path: str | Path) -> dict:
    """A diffusers ``config.json`` as a dict; an unreadable file or one that is not a JSON object is a WorkloadError."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkloadError(f"cannot read diffusers config {path}: {err}") from None
    if not isinstance(config, dict):
        raise WorkloadError(f"diffusers config {path}: expected a JSON object, got {type(config).__name__}")
    return config


def diffusers_workload(cls_name, config_path, batch=1, text_tokens=None, dtype=torch.float32, device="cpu") -> Workload:
    """A diffusers transformer from its config (a JSON path or a dict), with random weights."""
    try:
        diffusers = importlib.import_module("diffusers")
    except ImportError:
        raise WorkloadError("diffusers is not installed (pip install diffusers)") from None
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise WorkloadError(f"diffusers has no class {cls_name!r}")
    if config_path is None:
        raise WorkloadError(f"{cls_name} needs a diffusers config (--diffusers-config CONFIG.json)")
    config = config_path if isinstance(config_path, dict) else read_diffusers_config(config_path)
    # Built in its dtype on its device: flux-dev in fp32 first would need 48 GB on the way to 24.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls.from_config(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    def make_inputs(n: int, resolution: int | None = None, text_tokens: int | None = text_tokens) -> tuple[tuple, dict]:
        gen = torch.Generator().manual_seed(n)
        return (), _diffusers_inputs(cls_name, dict(model.config), n, resolution, text_tokens or 16, dtype, device, gen)

    return Workload(cls_name, DiffusersSample(model), (), make_inputs(batch)[1], f"batch {batch}", batch, make_inputs)


def _accepts_config(factory: Callable) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and extension callables have no signature
        return False
    config = parameters.get("config")
    return config is not None and config.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def factory_workload(spec: str, device="cpu", dtype=torch.float32, config: dict | None = None) -> Workload:
    """``module:factory``'s model; ``config`` (a diffusers config dict), if given, goes to ``factory(config=...)``."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise WorkloadError(f"cannot load factory {spec!r}: {err}") from None
    if config is None:
        made = factory()
    elif _accepts_config(factory):
        made = factory(config=config)
    else:
        raise WorkloadError(f"{spec} takes no 'config' argument, so a diffusers config cannot be passed to it")
    model, args, kwargs = (made, None, {}) if isinstance(made, torch.nn.Module) else (tuple(made) + ({},))[:3]
    if args is None:
        if not hasattr(model, "config") or not hasattr(model, "lynx_name"):
            raise WorkloadError(f"{spec} returned a bare model: return (model, args) or (model, args, kwargs)")
        args = models.example_inputs(model, dtype=dtype, device=device)
    return Workload(spec, model.to(device).eval(), tuple(args), dict(kwargs), "from factory")


def load_workload(spec: str, *, diffusers_config: str | Path | None = None, batch: int | None = None,
                  resolution: int | None = None, text_tokens: int | None = None, cfg: bool | None = None,
                  dtype: torch.dtype = torch.float32, device: str = "cpu", quick: bool = False) -> Workload:
    """The workload a model spec names (see the module docstring); options that do not apply to it are errors."""
    if spec in models.NAMES:
        if diffusers_config is not None:
            raise WorkloadError(f"a diffusers config does not apply to the built-in model {spec!r}; "
                                "give it with a diffusers class or a module:factory that takes 'config'")
        return builtin_workload(spec, batch, resolution, text_tokens, dtype, device, quick, cfg)
    config = None if diffusers_config is None else read_diffusers_config(diffusers_config)
    if ":" in spec:
        return factory_workload(spec, device, dtype, config)
    if spec.endswith("Model") or config is not None:
        return diffusers_workload(spec, config, batch or 1, text_tokens, dtype, device)
    raise WorkloadError(f"unknown model {spec!r}: use one of {', '.join(models.NAMES)}, module:factory, "
                        "or a diffusers class with a diffusers config")
