"""Reference diffusion transformers (plain torch, random init) for tests and benchmarks.

    model = build("dit-xl-2", depth=2)          # any config field can be overridden
    out = model(*example_inputs(model, batch=2))

Models (``NAMES``) and what ``example_inputs`` returns by default (batch 1):

* ``dit-{s,b,l,xl}-2``: ``(x, t, y)``; x (B, 4, 32, 32) = 256 px, t (B,) int64 in [0, 1000),
  y (B,) int64 class labels. DiT's position embedding is a fixed buffer, so the resolution must
  be 8 * ``input_size`` (build with another ``input_size`` for other resolutions).
* ``pixart-xl-2``: ``(x, t, text)``; x (B, 4, 128, 128) = 1024 px, t (B,) int64, text
  (B, 120, 4096) T5 features. Any resolution divisible by 16 px.
* ``flux-dev``: ``(img, txt, timesteps, y, guidance)``; img (B, 4096, 64) = 1024 px packed
  latents, txt (B, 512, 4096), timesteps (B,) float in [0, 1), y (B, 768), guidance (B,) = 3.5.
* ``mmdit-tiny``: same class and signature as flux-dev; hidden 128, 4 heads, 2 + 2 blocks,
  context 64, pooled 32; img (B, 256, 64) = 256 px, txt (B, 32, 64).

Latents are resolution / 8 (VAE factor 8). Floating inputs with more than one dim (latents,
text, pooled text) get ``dtype``; timesteps and guidance stay fp32 / int64.

``build`` overrides: the config dataclass fields (``model.config``), e.g. ``depth``, ``hidden``,
``heads``, ``in_channels``... For MMDiT ``depth`` counts double blocks and ``single_depth``
single blocks. Overriding ``hidden`` without ``heads`` keeps the default head width.

All models trace with ``torch.compile(fullgraph=True, dynamic=True)``. Caveat of dynamo's duck
shaping: an input size equal to a weight dim shares its symbol and gets specialised with it
(flux-dev at 1024 px: 4096 image tokens == context_dim 4096), so a later resolution change
recompiles once. ``torch.fx.experimental._config.use_duck_shape = False`` avoids that.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .dit import DiT, DiTConfig
from .layers import heads_for
from .mmdit import MMDiT, MMDiTConfig
from .pixart import PixArt, PixArtConfig

_REGISTRY = {
    "dit-s-2": (DiT, DiTConfig(depth=12, hidden=384, heads=6)),
    "dit-b-2": (DiT, DiTConfig(depth=12, hidden=768, heads=12)),
    "dit-l-2": (DiT, DiTConfig(depth=24, hidden=1024, heads=16)),
    "dit-xl-2": (DiT, DiTConfig(depth=28, hidden=1152, heads=16)),
    "pixart-xl-2": (PixArt, PixArtConfig()),
    "flux-dev": (MMDiT, MMDiTConfig()),
    "mmdit-tiny": (
        MMDiT,
        MMDiTConfig(hidden=128, heads=4, depth=2, single_depth=2, context_dim=64, vec_dim=32, resolution=256, text_tokens=32),
    ),
}
NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["NAMES", "build", "example_inputs", "DiT", "DiTConfig", "PixArt", "PixArtConfig", "MMDiT", "MMDiTConfig"]


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
    return _REGISTRY[name]


def build(name: str, **overrides) -> nn.Module:
    """A randomly initialised model (deterministic under ``torch.manual_seed``), built on the
    current default device (``with torch.device("meta"): build(...)`` costs no memory)."""
    cls, base = _lookup(name)
    valid = [f.name for f in dataclasses.fields(base)]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for {name!r}; valid: {', '.join(valid)}")
    if "hidden" in overrides and "heads" not in overrides:
        overrides["heads"] = heads_for(overrides["hidden"], base.hidden // base.heads)
    model = cls(dataclasses.replace(base, **overrides))
    model.lynx_name = name
    return model


def example_inputs(
    name_or_model: str | nn.Module,
    batch: int = 1,
    resolution: int | None = None,
    text_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, ...]:
    """Forward args for ``model(*args)``: per-model defaults in the module docstring.

    A model passed in supplies its own config (channels, sizes); a name uses the default one.
    Random values come from ``generator`` (a CPU generator) or else a fresh one seeded ``seed``.
    """
    if isinstance(name_or_model, str):
        cls, config = _lookup(name_or_model)
    else:
        cls, config = type(name_or_model), name_or_model.config
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    args = cls.example_inputs(config, batch, resolution, text_tokens, gen)
    return tuple(
        a.to(device=device, dtype=dtype) if a.is_floating_point() and a.dim() > 1 else a.to(device) for a in args
    )
