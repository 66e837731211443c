"""Shared building blocks of the reference diffusion transformers.

Every model in this package is assembled from these pieces, so graph passes meet the same op
patterns everywhere: attention is ``F.scaled_dot_product_attention``; norms are ``nn.LayerNorm``
or an ``torch.rsqrt`` RMSNorm; MLPs are ``Linear -> GELU/SiLU -> Linear``; modulation Linears are
fed by ``SiLU(c)`` with ``c`` of shape (B, C). Everything is written with tensor ops on symbolic
sizes (no ``.item()``, numpy or data-dependent Python branches) so ``torch.compile(fullgraph=True,
dynamic=True)`` traces it in one graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (..., 1, L, head_dim / 2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def layer_norm(dim: int) -> nn.LayerNorm:
    # Affine-free: in adaLN blocks the modulation supplies scale and shift.
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) of (B,) int or float timesteps, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Fixed 2-D sin-cos embedding (len(rows) * len(cols), dim) of a row-major token grid.

    First half encodes the column, second half the row (the DiT / MAE layout). ``rows`` and
    ``cols`` are float positions, so callers may rescale them (PixArt's interpolation).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=rows.device, dtype=torch.float32) / quarter)

    def axis(pos: Tensor) -> Tensor:
        a = pos.float()[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=-1)

    h, w = rows.shape[0], cols.shape[0]
    ec, er = axis(cols), axis(rows)
    grid = torch.cat([ec[None].expand(h, w, 2 * quarter), er[:, None].expand(h, w, 2 * quarter)], dim=-1)
    return grid.reshape(h * w, 4 * quarter)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), tokens row-major, features ordered (c, ph, pw)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: Tensor, h: int, w: int, p: int, c: int, channels_last: bool = True) -> Tensor:
    """Inverse of a patch embedding: (B, h*w, p*p*c) -> (B, c, h*p, w*p).

    ``channels_last`` is the DiT feature order (ph, pw, c); False is ``patchify``'s (c, ph, pw).
    """
    b = x.shape[0]
    if channels_last:
        x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    else:
        x = x.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h * p, w * p)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one strided Conv2d (B, C, H, W) -> (B, N, dim)."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, normalising in fp32 (bf16 squares lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (Flux / SD3 style)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2. Also serves as the timestep / caption / pooled-text embedder."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh") if act == "gelu_tanh" else nn.SiLU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (B,) scalar (timestep, guidance) -> Mlp(SiLU) -> (B, dim).

    ``scale`` maps the caller's range onto the sinusoid's (Flux passes t in [0, 1], so 1000).
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = Mlp(freq_dim, dim, dim, act="silu")

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``dtype``: the model's activations' (a weight's may be e4m3 after ``lynx_compile.convert_to_fp8``)."""
        return self.mlp(timestep_embedding(t, self.freq_dim, self.scale).to(dtype))


class Modulation(nn.Sequential):
    """SiLU(c) -> Linear(dim, n*dim), returned as n chunks of shape (B, 1, dim)."""

    def __init__(self, dim: int, n: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, n * dim))
        self.n = n

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return super().forward(c)[:, None].chunk(self.n, dim=-1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def split_qkv(qkv: Tensor, heads: int, norm: QKNorm | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused (B, L, 3*H*D) projection, laid out (3, H, D), -> q, k, v of shape (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    if norm is not None:
        q, k = norm(q, k)
    return q, k, v


def rope_freqs(ids: Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> Rope:
    """cos / sin tables for multi-axis RoPE from positions ``ids`` (..., L, n_axes).

    Axis i gets ``axes_dim[i]`` channels of the head (i.e. axes_dim[i] / 2 rotation pairs).
    Real arithmetic only (no complex tensors), so it compiles cleanly.
    """
    angles = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d)
        angles.append(ids[..., i, None].float() * omega)
    a = torch.cat(angles, dim=-1).unsqueeze(-3)  # broadcast over heads
    return a.cos(), a.sin()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, H, L, D) by the tabulated angles."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, rope: Rope | None = None, mask: Tensor | None = None) -> Tensor:
    """SDPA on (B, H, L, D) heads -> (B, L, H*D). ``mask``: (B, L_k) bool, True = attend."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    if mask is not None:
        mask = mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Fused ``qkv`` Linear, optional per-head QK RMSNorm (``norm``), output Linear ``proj``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm = QKNorm(dim // heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_qkv(self.qkv(x), self.heads, self.norm)

    def forward(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        return self.proj(attention(*self.qkv_heads(x), rope=rope))


class CrossAttention(nn.Module):
    """Queries from x (``q_linear``), fused keys/values from a context (``kv_linear``), ``proj``."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        q = split_heads(self.q_linear(x), self.heads)
        k, v = self.kv_linear(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention(q, k, v, mask=mask))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN modulation: norm1, attn, norm2, mlp.

    The six modulation chunks are (shift, scale, gate) for attention then for the MLP. The
    pieces are exposed separately so MMDiT can run two of these streams through one joint
    attention and PixArt can insert cross-attention and use its own modulation.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool = False, modulation: bool = True):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, heads, qk_norm=qk_norm)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = Modulation(dim, 6) if modulation else None

    def attn_inputs(self, x: Tensor, mod: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.attn.qkv_heads(modulate(self.norm1(x), mod[0], mod[1]))

    def attn_residual(self, x: Tensor, attn_out: Tensor, mod: Sequence[Tensor]) -> Tensor:
        return x + mod[2] * self.attn.proj(attn_out)

    def mlp_residual(self, x: Tensor, mod: Sequence[Tensor]) -> Tensor:
        return x + mod[5] * self.mlp(modulate(self.norm2(x), mod[3], mod[4]))

    def forward(self, x: Tensor, c: Tensor, rope: Rope | None = None) -> Tensor:
        mod = self.adaLN_modulation(c)
        x = self.attn_residual(x, attention(*self.attn_inputs(x, mod), rope=rope), mod)
        return self.mlp_residual(x, mod)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) modulated norm, then the output ``linear``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = Modulation(dim, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_weights(model: nn.Module, modulation_gain: float = 0.5, embedding_std: float = 0.5) -> None:
    """Random, non-zero init that keeps activations O(1) through depth.

    Unlike the papers' adaLN-Zero / zero-output init (which makes a fresh model the identity
    and its output zero), every layer here contributes: Linears are Xavier-uniform with small
    random biases; modulation Linears get std ``modulation_gain / sqrt(fan_in)`` so gates and
    scales come out around 0.3 and the residual stream grows slowly with depth.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=embedding_std)
    for m in model.modules():
        if isinstance(m, Modulation):
            lin = m[1]
            nn.init.normal_(lin.weight, std=modulation_gain / math.sqrt(lin.in_features))


def heads_for(hidden: int, head_dim: int) -> int:
    """Heads of about ``head_dim`` channels (at least ``head_dim``, at least one head) that divide ``hidden``."""
    heads = max(1, hidden // head_dim)
    while hidden % heads:
        heads -= 1
    return heads
