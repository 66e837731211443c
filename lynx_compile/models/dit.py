"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"): class-conditional,
adaLN blocks, fixed sin-cos positions. Random non-zero init (see ``layers.init_weights``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import AdaLNBlock, FinalLayer, PatchEmbed, TimestepEmbedder, init_weights, sincos_pos_embed_2d, unpatchify


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent H = W (256 px / VAE factor 8); fixes the position-embedding buffer
    patch_size: int = 2
    in_channels: int = 4
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the embedding has one extra row: the null class (index num_classes) for CFG
    learn_sigma: bool = True  # predict (eps, sigma): out channels = 2 * in_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


class DiT(nn.Module):
    """``forward(x, t, y)``: x (B, C, S, S) latents with S = ``input_size``, t (B,) int or float
    timesteps, y (B,) int64 labels in [0, num_classes] -> (B, out_channels, S, S)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        if c.hidden % c.heads or c.input_size % c.patch_size:
            raise ValueError(f"DiT: hidden must divide by heads and input_size by patch_size: {c}")
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden)
        self.t_embedder = TimestepEmbedder(c.hidden)
        self.y_embedder = nn.Embedding(c.num_classes + 1, c.hidden)
        grid = torch.arange(c.input_size // c.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.hidden, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(AdaLNBlock(c.hidden, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden, c.patch_size**2 * c.out_channels)
        init_weights(self)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t, x.dtype) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final_layer(x, c), h, w, p, self.config.out_channels)

    @staticmethod
    def example_inputs(
        config: DiTConfig, batch: int, resolution: int | None, text_tokens: int | None, gen: torch.Generator
    ) -> tuple[Tensor, ...]:
        """(x, t, y); resolution defaults to (and must equal) 8 * input_size; text_tokens is unused."""
        if resolution is not None and resolution != 8 * config.input_size:
            raise ValueError(
                f"DiT has a fixed {config.input_size}x{config.input_size} latent grid ({8 * config.input_size} px); "
                f"build it with input_size={resolution // 8} for {resolution} px"
            )
        s = config.input_size
        x = torch.randn(batch, config.in_channels, s, s, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        y = torch.randint(0, config.num_classes, (batch,), generator=gen)
        return x, t, y
