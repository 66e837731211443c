"""PixArt-alpha (Chen et al.): DiT blocks with cross-attention to T5 tokens and adaLN-single
(one shared ``t_block`` modulation plus a learned per-block ``scale_shift_table``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import (
    AdaLNBlock,
    CrossAttention,
    Mlp,
    Modulation,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    init_weights,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)


@dataclass(frozen=True)
class PixArtConfig:
    input_size: int = 128  # latent side of the default resolution (1024 px); the position grid's base size
    patch_size: int = 2
    in_channels: int = 4
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-XXL width
    text_tokens: int = 120  # example_inputs default (PixArt-alpha's max caption length)
    pe_interpolation: float = 2.0  # positions are scaled to span (input_size / patch) / pe_interpolation
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


class PixArtBlock(AdaLNBlock):
    """Self-attention, cross-attention to the caption, MLP; modulation = t_block(t) + table."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__(dim, heads, mlp_ratio, modulation=False)
        self.cross_attn = CrossAttention(dim, heads)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, context: Tensor, t_mod: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        mod = [m + s for m, s in zip(t_mod, self.scale_shift_table.unbind(0))]
        x = self.attn_residual(x, attention(*self.attn_inputs(x, mod)), mod)
        x = x + self.cross_attn(x, context, mask)
        return self.mlp_residual(x, mod)


class PixArtFinalLayer(nn.Module):
    """Final norm modulated by the timestep embedding plus a learned (shift, scale) table."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    """``forward(x, t, text, mask=None)``: x (B, C, H, W) latents (any H, W divisible by the patch),
    t (B,) timesteps, text (B, L, caption_channels) T5 features, mask (B, L) bool/0-1, True =
    real token (optional) -> (B, out_channels, H, W)."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        c = self.config = config
        if c.hidden % c.heads:
            raise ValueError(f"PixArt: hidden must divide by heads: {c}")
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden)
        self.t_embedder = TimestepEmbedder(c.hidden)
        self.t_block = Modulation(c.hidden, 6)
        self.y_embedder = Mlp(c.caption_channels, c.hidden, c.hidden)
        self.blocks = nn.ModuleList(PixArtBlock(c.hidden, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = PixArtFinalLayer(c.hidden, c.patch_size**2 * c.out_channels)
        init_weights(self)

    def pos_embed(self, h: int, w: int, device: torch.device) -> Tensor:
        # Computed per call (cheap) so any resolution works without new buffers; each axis is
        # normalised to the base grid as in PixArt's multi-scale model.
        span = self.config.input_size / self.config.patch_size / self.config.pe_interpolation
        rows = torch.arange(h, device=device, dtype=torch.float32) * span / h
        cols = torch.arange(w, device=device, dtype=torch.float32) * span / w
        return sincos_pos_embed_2d(self.config.hidden, rows, cols)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor | None = None) -> Tensor:
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.x_embedder(x) + self.pos_embed(h, w, x.device).to(x.dtype)
        t = self.t_embedder(t, x.dtype)
        t_mod = self.t_block(t)
        context = self.y_embedder(text)
        for block in self.blocks:
            x = block(x, context, t_mod, mask)
        return unpatchify(self.final_layer(x, t), h, w, p, self.config.out_channels)

    @staticmethod
    def example_inputs(
        config: PixArtConfig, batch: int, resolution: int | None, text_tokens: int | None, gen: torch.Generator
    ) -> tuple[Tensor, ...]:
        """(x, t, text); resolution defaults to 8 * input_size (1024), text_tokens to config.text_tokens."""
        s = (resolution or 8 * config.input_size) // 8
        x = torch.randn(batch, config.in_channels, s, s, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        text = torch.randn(batch, text_tokens or config.text_tokens, config.caption_channels, generator=gen)
        return x, t, text
