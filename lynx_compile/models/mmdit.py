"""Flux-style MMDiT (FLUX.1): double-stream blocks with joint image/text attention, then
single-stream blocks with fused qkv+MLP-up / attn-out+MLP-down Linears, 3-axis RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import (
    AdaLNBlock,
    FinalLayer,
    Mlp,
    Modulation,
    QKNorm,
    Rope,
    TimestepEmbedder,
    attention,
    init_weights,
    layer_norm,
    modulate,
    patchify,
    rope_freqs,
    split_qkv,
    unpatchify,
)


@dataclass(frozen=True)
class MMDiTConfig:
    in_channels: int = 64  # 16 latent channels packed 2x2
    hidden: int = 3072
    heads: int = 24
    depth: int = 19  # double-stream blocks
    single_depth: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # T5 width
    vec_dim: int = 768  # pooled CLIP width
    guidance_embed: bool = True
    axes_dim: tuple[int, ...] | None = None  # RoPE channels per (t, h, w) axis; None: Flux's split of head_dim
    theta: float = 10000.0
    resolution: int = 1024  # example_inputs defaults
    text_tokens: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rope_axes(self) -> tuple[int, ...]:
        if self.axes_dim is not None:
            return tuple(self.axes_dim)
        d = self.head_dim  # 128 -> (16, 56, 56); every axis needs an even count
        t = max(2, d // 16 * 2)
        hh = (d - t) // 4 * 2
        return (t, hh, d - t - hh)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over [text, image]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.img = AdaLNBlock(dim, heads, mlp_ratio, qk_norm=True)
        self.txt = AdaLNBlock(dim, heads, mlp_ratio, qk_norm=True)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        img_mod, txt_mod = self.img.adaLN_modulation(vec), self.txt.adaLN_modulation(vec)
        iq, ik, iv = self.img.attn_inputs(img, img_mod)
        tq, tk, tv = self.txt.attn_inputs(txt, txt_mod)
        joint = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), rope=rope)
        n_txt = txt.shape[1]
        img = self.img.mlp_residual(self.img.attn_residual(img, joint[:, n_txt:], img_mod), img_mod)
        txt = self.txt.mlp_residual(self.txt.attn_residual(txt, joint[:, :n_txt], txt_mod), txt_mod)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: ``linear1`` = qkv ++ mlp-up, ``linear2`` = (attn ++ act(mlp)) -> out."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.dim, self.mlp_hidden = heads, dim, int(dim * mlp_ratio)
        self.pre_norm = layer_norm(dim)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.norm = QKNorm(dim // heads)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.modulation = Modulation(dim, 3)

    def forward(self, x: Tensor, vec: Tensor, rope: Rope) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
        attn = attention(*split_qkv(qkv, self.heads, self.norm), rope=rope)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


def square_grid_ids(n_tokens: int, device: torch.device) -> Tensor:
    """(n_tokens, 3) Flux position ids (0, row, col) of a square token grid.

    The side is found with tensor ops, so a symbolic token count compiles without guards.
    """
    i = torch.arange(n_tokens, device=device, dtype=torch.float32)
    side = (i[-1] + 1).sqrt().round()
    row = torch.floor(i / side)
    return torch.stack([torch.zeros_like(i), row, i - row * side], dim=-1)


def pack_latents(z: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) Flux image tokens."""
    return patchify(z, 2)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack_latents`` for an (h, w) latent."""
    return unpatchify(tokens, h // 2, w // 2, 2, tokens.shape[-1] // 4, channels_last=False)


class MMDiT(nn.Module):
    """``forward(img, txt, timesteps, y, guidance=None, img_ids=None, txt_ids=None)``:
    img (B, L_img, in_channels) packed latents, txt (B, L_txt, context_dim), timesteps (B,) in
    [0, 1], y (B, vec_dim) pooled text, guidance (B,) (required when guidance_embed).
    Position ids ((L, 3) or (B, L, 3)) default to a square image grid and all-zero text ids, so
    callers only pass tensors whatever the shape. Returns (B, L_img, in_channels)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        c = self.config = config
        if c.hidden % c.heads or sum(c.rope_axes) != c.head_dim or any(d % 2 for d in c.rope_axes):
            raise ValueError(f"MMDiT: need hidden % heads == 0 and even rope axes summing to head_dim: {c}")
        self.img_in = nn.Linear(c.in_channels, c.hidden)
        self.time_in = TimestepEmbedder(c.hidden, scale=1000.0)
        self.vector_in = Mlp(c.vec_dim, c.hidden, c.hidden, act="silu")
        self.guidance_in = TimestepEmbedder(c.hidden, scale=1000.0) if c.guidance_embed else None
        self.txt_in = nn.Linear(c.context_dim, c.hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden, c.heads, c.mlp_ratio) for _ in range(c.single_depth)
        )
        self.final_layer = FinalLayer(c.hidden, c.in_channels)
        init_weights(self)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        img_ids: Tensor | None = None,
        txt_ids: Tensor | None = None,
    ) -> Tensor:
        if img_ids is None:
            img_ids = square_grid_ids(img.shape[1], img.device)
        if txt_ids is None:
            txt_ids = img_ids.new_zeros(*img_ids.shape[:-2], txt.shape[1], 3)
        rope = rope_freqs(torch.cat([txt_ids, img_ids], dim=-2), self.config.rope_axes, self.config.theta)

        vec = self.time_in(timesteps, img.dtype) + self.vector_in(y)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this MMDiT was built with guidance_embed=True: pass guidance (B,)")
            vec = vec + self.guidance_in(guidance, img.dtype)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, rope)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    @staticmethod
    def example_inputs(
        config: MMDiTConfig, batch: int, resolution: int | None, text_tokens: int | None, gen: torch.Generator
    ) -> tuple[Tensor, ...]:
        """(img, txt, timesteps, y[, guidance]); (resolution / 16)^2 image tokens."""
        side = (resolution or config.resolution) // 16
        img = torch.randn(batch, side * side, config.in_channels, generator=gen)
        txt = torch.randn(batch, text_tokens or config.text_tokens, config.context_dim, generator=gen)
        t = torch.rand(batch, generator=gen)
        y = torch.randn(batch, config.vec_dim, generator=gen)
        if not config.guidance_embed:
            return img, txt, t, y
        return img, txt, t, y, torch.full((batch,), 3.5)
