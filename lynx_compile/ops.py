"""The ``lynx`` custom ops: schemas, reference implementations and fake implementations.

Every op is defined here once, with its pure-torch reference implementation (used on CPU, and
on any device without a faster kernel) and its fake implementation (used for tracing, including
symbolic shapes) side by side. Device kernels (``lynx_compile.kernels``) only *add* CUDA
implementations to these ops; they never change a schema.

Numerics shared by all implementations:

* Selection: in each group of ``m`` consecutive features along the last dim, keep the ``n``
  entries of largest magnitude. Ties go to the lower index; ``-0.0`` and ``+0.0`` tie. NaN ranks
  above every number (so a NaN is always kept and propagates), then +-inf, then finite values.
* Norm compensation: ``s = sqrt(||x||^2 / (||x~||^2 + eps))`` per token, in fp32. An all-zero
  token gets ``s = 0`` (finite). A token holding inf or NaN gets a non-finite ``s``, so its
  output row is non-finite, as a dense linear's would be: never silently finite.
* Accumulation in fp32 for bf16/fp16 inputs (fp64 stays fp64); the output has the input's dtype.
* A fused producer (``producer_sparse_linear``) is computed in the accumulation dtype and rounded
  once to the input's dtype before the selection, as Inductor's generated kernel for it would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import NORM_EPS


def _check_pattern(x: Tensor, n: int, m: int) -> None:
    torch._check(0 < n < m, lambda: f"lynx: pattern needs 0 < n < m, got {n}:{m}")
    torch._check(
        x.shape[-1] % m == 0,
        lambda: f"lynx: in_features ({x.shape[-1]}) must be a multiple of m ({m})",
    )


def keep_mask(x: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask of the entries kept by the n:m top-|x| selection along the last dim."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    magnitude = groups.abs().float()
    is_nan = torch.isnan(magnitude)
    magnitude = torch.where(is_nan, torch.zeros_like(magnitude), magnitude)
    # (..., m, 1) against (..., 1, m): does entry j outrank entry i?
    mag_i, mag_j = magnitude.unsqueeze(-1), magnitude.unsqueeze(-2)
    nan_i, nan_j = is_nan.unsqueeze(-1), is_nan.unsqueeze(-2)
    lower_index = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j < i
    beats = (nan_j & ~nan_i) | ((nan_j == nan_i) & ((mag_j > mag_i) | ((mag_j == mag_i) & lower_index)))
    rank = beats.sum(dim=-1)
    return (rank < n).reshape(x.shape)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def sparsify_reference(x: Tensor, n: int, m: int, norm_compensation: bool, eps: float) -> tuple[Tensor, Tensor]:
    """(x~ with dropped entries zeroed, per-token scale of shape (..., 1) in the accumulation dtype)."""
    kept = torch.where(keep_mask(x, n, m), x, torch.zeros_like(x))
    acc = accumulation_dtype(x.dtype)
    if norm_compensation:
        x_acc, kept_acc = x.to(acc), kept.to(acc)
        dense_sq = (x_acc * x_acc).sum(dim=-1, keepdim=True)
        kept_sq = (kept_acc * kept_acc).sum(dim=-1, keepdim=True)
        scale = torch.sqrt(dense_sq / (kept_sq + eps))
    else:
        scale = torch.ones(*x.shape[:-1], 1, dtype=acc, device=x.device)
    return kept, scale


@torch.library.custom_op("lynx::sparsify", mutates_args=())
def sparsify(x: Tensor, n: int, m: int, norm_compensation: bool, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """n:m-sparsify each token (row) of ``x`` along its last dim.

    Returns ``(x_sparse, scale)``: ``x_sparse`` has ``x``'s shape and dtype with the dropped
    entries set to zero; ``scale`` is fp32 of shape ``(..., 1)`` (all ones without compensation).
    """
    _check_pattern(x, n, m)
    kept, scale = sparsify_reference(x, n, m, norm_compensation, eps)
    return kept, scale.float()


@sparsify.register_fake
def _(x: Tensor, n: int, m: int, norm_compensation: bool, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    _check_pattern(x, n, m)
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def sparse_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    n: int,
    m: int,
    norm_compensation: bool,
    eps: float,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
) -> Tensor:
    kept, scale = sparsify_reference(x, n, m, norm_compensation, eps)
    acc = scale.dtype
    out = (kept.to(acc) @ weight.to(acc).t()) * scale
    if lora_down is not None and lora_up is not None:
        out = out + (x.to(acc) @ lora_down.to(acc).t()) @ lora_up.to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype)


def _check_bias(bias: Tensor | None, out_features: int) -> None:
    if bias is not None:
        torch._check(tuple(bias.shape) == (out_features,), lambda: f"lynx: bias shape {tuple(bias.shape)} != ({out_features},)")


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, m: int,
                 lora_down: Tensor | None, lora_up: Tensor | None) -> None:
    _check_pattern(x, n, m)
    torch._check(weight.dim() == 2, lambda: f"lynx: weight must be 2-D (out, in), got {tuple(weight.shape)}")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"lynx: input has {x.shape[-1]} features but weight expects {weight.shape[1]}",
    )
    torch._check(x.dtype == weight.dtype, lambda: f"lynx: input dtype {x.dtype} != weight dtype {weight.dtype}")
    _check_bias(bias, weight.shape[0])
    torch._check((lora_down is None) == (lora_up is None), lambda: "lynx: lora_down and lora_up come together")
    if lora_down is not None and lora_up is not None:
        torch._check(
            lora_down.dim() == 2 and lora_up.dim() == 2 and lora_down.shape[1] == weight.shape[1]
            and lora_up.shape[0] == weight.shape[0] and lora_down.shape[0] == lora_up.shape[1],
            lambda: f"lynx: LoRA factors {tuple(lora_down.shape)} / {tuple(lora_up.shape)} "
            f"do not fit weight {tuple(weight.shape)}",
        )


LORA_RANK_MULTIPLE = 32
"""Folded LoRA ranks are padded with zero factors to a multiple of this: the 2r logical columns the fold
adds then keep in_features a multiple of the CUDA kernel's 64."""


def pack_lora(weight: Tensor, lora_down: Tensor, lora_up: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a LoRA into extra K columns of one 2:4 sparse GEMM: ``(weight_lora, lora_down)`` for
    :func:`sparse_linear_lora`, made once per layer at compile time.

    ``weight_lora`` is (N, K + 2r) with r the rank padded to ``LORA_RANK_MULTIPLE``: ``weight``
    followed by ``lora_up`` spread over 2:4 groups, its columns 2g and 2g + 1 at K + 4g and
    K + 4g + 1, zeros at K + 4g + 2 and K + 4g + 3. The kernel appends ``x @ lora_down.T`` to each
    compressed token as the kept entries 0 and 1 of those groups, so the one GEMM adds the LoRA term.
    It costs a second copy of the layer's weight.
    """
    n_out, k = weight.shape
    rank = lora_down.shape[0]
    padded = -(-rank // LORA_RANK_MULTIPLE) * LORA_RANK_MULTIPLE
    down = lora_down.new_zeros((padded, k))
    down[:rank] = lora_down
    up = lora_up.new_zeros((n_out, padded))
    up[:, :rank] = lora_up
    spread = weight.new_zeros((n_out, padded // 2, 4))
    spread[..., :2] = up.reshape(n_out, padded // 2, 2)
    return torch.cat([weight, spread.reshape(n_out, 2 * padded)], dim=1), down


def unpack_lora_weight(weight_lora: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(weight (N, K), lora_up (N, rank))`` back from :func:`pack_lora`'s ``weight_lora``."""
    n_out, k = weight_lora.shape[0], weight_lora.shape[1] - 2 * rank
    spread = weight_lora[:, k:].reshape(n_out, rank // 2, 4)
    return weight_lora[:, :k], spread[..., :2].reshape(n_out, rank)


# Defined with torch.library.define rather than custom_op: a model calls this op once per sparse
# layer per forward, and custom_op adds Python autograd and aliasing wrappers to every call, host
# time that a DiT's hundreds of small GEMMs feel. Inference only: without an autograd kernel, a
# backward through it raises.
#
# Every op that reads an activation asks Inductor for contiguous inputs. Without the tag Inductor
# hands a custom op the strides eager tracing saw, and a DiT's residual stream is traced in the
# patch embedding's transposed layout (token stride 1): the producer kernel of a fused layer would
# then read it through a copy per layer. With it, Inductor lays the stream out row-major where it
# is computed, at no cost.
CONTIGUOUS_INPUTS = (torch.Tag.needs_contiguous_strides,)
torch.library.define(
    "lynx::sparse_linear",
    "(Tensor x, Tensor weight, Tensor? bias, int n, int m, bool norm_compensation, "
    f"float eps={NORM_EPS!r}, Tensor? lora_down=None, Tensor? lora_up=None) -> Tensor",
    tags=CONTIGUOUS_INPUTS,
)


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    n: int,
    m: int,
    norm_compensation: bool,
    eps: float = NORM_EPS,
    lora_down: Tensor | None = None,
    lora_up: Tensor | None = None,
) -> Tensor:
    """``s * (S(x) @ weight.T) + x @ lora_down.T @ lora_up.T + bias`` for ``x`` of shape (..., K).

    ``weight`` is (N, K) as in ``nn.Linear``; ``lora_down`` is (r, K) and ``lora_up`` (N, r).
    The LoRA branch sees the dense ``x``. Output: (..., N) in ``x``'s dtype.
    """
    check_linear(x, weight, bias, n, m, lora_down, lora_up)
    return sparse_linear_reference(x, weight, bias, n, m, norm_compensation, eps, lora_down, lora_up)


# Each op's reference is registered by a plain call: the decorator form returns None, and the CUDA kernels' fallbacks
# call the reference functions themselves.
torch.library.impl("lynx::sparse_linear", "CompositeExplicitAutograd")(sparse_linear)


@torch.library.register_fake("lynx::sparse_linear")
def _(x, weight, bias, n, m, norm_compensation, eps=NORM_EPS, lora_down=None, lora_up=None):
    check_linear(x, weight, bias, n, m, lora_down, lora_up)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def check_linear_lora(x: Tensor, weight_lora: Tensor, bias: Tensor | None, n: int, m: int, lora_down: Tensor) -> None:
    _check_pattern(x, n, m)
    torch._check(
        lora_down.dim() == 2 and lora_down.shape[1] == x.shape[-1] and lora_down.shape[0] % 2 == 0,
        lambda: f"lynx: lora_down {tuple(lora_down.shape)} must be (r, {x.shape[-1]}) with r even",
    )
    torch._check(
        weight_lora.dim() == 2 and weight_lora.shape[1] == x.shape[-1] + 2 * lora_down.shape[0],
        lambda: f"lynx: weight_lora {tuple(weight_lora.shape)} must be (out, in + 2r) = (out, "
        f"{x.shape[-1] + 2 * lora_down.shape[0]}) for input features {x.shape[-1]} and rank {lora_down.shape[0]}",
    )
    torch._check(x.dtype == weight_lora.dtype == lora_down.dtype,
                 lambda: f"lynx: dtypes differ: input {x.dtype}, weight_lora {weight_lora.dtype}, lora_down {lora_down.dtype}")
    _check_bias(bias, weight_lora.shape[0])


torch.library.define(
    "lynx::sparse_linear_lora",
    "(Tensor x, Tensor weight_lora, Tensor? bias, int n, int m, bool norm_compensation, float eps, "
    "Tensor lora_down) -> Tensor",
    tags=CONTIGUOUS_INPUTS,
)


def sparse_linear_lora(x: Tensor, weight_lora: Tensor, bias: Tensor | None, n: int, m: int,
                       norm_compensation: bool, eps: float, lora_down: Tensor) -> Tensor:
    """:func:`sparse_linear` with its LoRA folded: ``weight_lora`` and ``lora_down`` come from
    :func:`pack_lora`, which the graph pass runs once per layer. Same function, one sparse GEMM on GPU."""
    check_linear_lora(x, weight_lora, bias, n, m, lora_down)
    weight, lora_up = unpack_lora_weight(weight_lora, lora_down.shape[0])
    return sparse_linear_reference(x, weight, bias, n, m, norm_compensation, eps, lora_down, lora_up)


torch.library.impl("lynx::sparse_linear_lora", "CompositeExplicitAutograd")(sparse_linear_lora)


@torch.library.register_fake("lynx::sparse_linear_lora")
def _(x, weight_lora, bias, n, m, norm_compensation, eps, lora_down):
    check_linear_lora(x, weight_lora, bias, n, m, lora_down)
    return x.new_empty((*x.shape[:-1], weight_lora.shape[0]))


PRODUCERS = ("layer_norm", "gelu", "gelu_tanh", "silu")
"""Producers ``producer_sparse_linear`` runs on its input first: the kernel that would otherwise write it."""


def check_producer(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None) -> None:
    torch._check(producer in PRODUCERS, lambda: f"lynx: producer must be one of {PRODUCERS}, got {producer!r}")
    rows = [t for t in (mul, add) if t is not None]
    torch._check(not rows or producer == "layer_norm", lambda: f"lynx: mul/add go with producer 'layer_norm', not {producer!r}")
    for t in rows:
        torch._check(t.dim() == 2 and t.shape[1] == x.shape[-1] and t.dtype == torch.float32,
                     lambda t=t: f"lynx: producer rows must be float32 (samples, {x.shape[-1]}), got {tuple(t.shape)} {t.dtype}")
    if len(rows) == 2:
        torch._check(mul.shape[0] == add.shape[0], lambda: f"lynx: mul has {mul.shape[0]} rows but add {add.shape[0]}")
    if rows:
        torch._check(x.numel() // max(x.shape[-1], 1) % rows[0].shape[0] == 0,
                     lambda: f"lynx: {x.numel() // max(x.shape[-1], 1)} tokens do not split into {rows[0].shape[0]} samples")


def produce_reference(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None, producer_eps: float) -> Tensor:
    """The producer's output, computed in the accumulation dtype and rounded once to ``x``'s dtype (as a fused kernel,
    or Inductor's generated code, does)."""
    acc = x.to(accumulation_dtype(x.dtype))
    if producer == "layer_norm":
        y = torch.nn.functional.layer_norm(acc, (x.shape[-1],), eps=producer_eps)
        samples = next((t.shape[0] for t in (mul, add) if t is not None), 1)
        y = y.reshape(samples, -1, x.shape[-1])
        if mul is not None:
            y = y * mul.to(acc.dtype).unsqueeze(1)
        if add is not None:
            y = y + add.to(acc.dtype).unsqueeze(1)
        y = y.reshape(x.shape)
    elif producer == "silu":
        y = torch.nn.functional.silu(acc)
    else:
        y = torch.nn.functional.gelu(acc, approximate="tanh" if producer == "gelu_tanh" else "none")
    return y.to(x.dtype)


torch.library.define(
    "lynx::producer_sparse_linear",
    "(Tensor x, str producer, Tensor? mul, Tensor? add, float producer_eps, Tensor weight, Tensor? bias, int n, int m, "
    "bool norm_compensation, float eps, Tensor? weight_scale=None) -> Tensor",
    tags=CONTIGUOUS_INPUTS,
)


def check_producer_linear(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None, weight: Tensor,
                          bias: Tensor | None, n: int, m: int, weight_scale: Tensor | None) -> None:
    check_producer(x, producer, mul, add)
    if weight_scale is None:
        check_linear(x, weight, bias, n, m, None, None)
    else:
        check_linear_e4m3(x, weight, weight_scale, bias, n, m, None)


def producer_sparse_linear(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None, producer_eps: float,
                           weight: Tensor, bias: Tensor | None, n: int, m: int, norm_compensation: bool,
                           eps: float, weight_scale: Tensor | None = None) -> Tensor:
    """:func:`sparse_linear` of ``producer(x)``: ``layer_norm`` (``LN(x) * mul[s] + add[s]``, without LN's own affine,
    ``mul``/``add`` fp32 (S, K) rows per sample s of the S equal runs of tokens, None for 1 and 0), ``gelu``,
    ``gelu_tanh`` or ``silu``; :func:`sparse_linear_e4m3` of it where ``weight_scale`` is given (``weight`` then in
    e4m3). The sparse layers' graph pass writes it where the producer's output feeds only lynx layers, so that the
    kernel reading ``x`` writes the sparse GEMM's operand and the output is never stored."""
    check_producer_linear(x, producer, mul, add, weight, bias, n, m, weight_scale)
    y = produce_reference(x, producer, mul, add, producer_eps)
    if weight_scale is not None:
        return sparse_linear_e4m3_reference(y, weight, weight_scale, bias, n, m, norm_compensation, eps, None)
    return sparse_linear_reference(y, weight, bias, n, m, norm_compensation, eps, None, None)


torch.library.impl("lynx::producer_sparse_linear", "CompositeExplicitAutograd")(producer_sparse_linear)


@torch.library.register_fake("lynx::producer_sparse_linear")
def _(x, producer, mul, add, producer_eps, weight, bias, n, m, norm_compensation, eps, weight_scale=None):
    check_producer_linear(x, producer, mul, add, weight, bias, n, m, weight_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)
"""The largest finite e4m3 value (448): each row's (or weight channel's) largest magnitude is quantized to it."""


E4M3_SMALLEST_AMAX = 2.0**-119
"""The smallest row amax whose multiplier ``448 / amax`` is finite in float32 (448 * 2**119 < 2**128); the CUDA
kernels floor it at ``2**LYNX_E4M3_MIN_AMAX_EXP2`` of ``cuda/lynx_api.h``, the same value."""


def quantize_e4m3(values: Tensor, amax: Tensor) -> tuple[Tensor, Tensor]:
    """``(e4m3 values, dequantization scale)`` of ``values`` whose rows have largest magnitude ``amax`` (keepdim
    shape, fp32 or fp64): ``values * 448 / amax`` rounded to e4m3, and ``amax / 448``. An all-zero row (amax 0) gets
    zeros and scale 0; a row holding inf or NaN gets NaN values, so it is never silently finite. A row whose amax is
    below ``E4M3_SMALLEST_AMAX`` is quantized against that amax instead: its values round towards zero, where
    ``448 / amax`` would overflow float32 to inf and turn the row's zeros into NaN."""
    amax = torch.where(amax > 0, amax.clamp_min(E4M3_SMALLEST_AMAX), amax)
    multiplier = torch.where(amax > 0, E4M3_MAX / amax, torch.zeros_like(amax))
    quantized = (values.to(amax.dtype) * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized, amax / E4M3_MAX


def quantize_weight_e4m3(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight_e4m3 (N, K), scale (N,) fp32)`` with one scale per output channel, made once per layer at compile
    time; an all-zero channel gets scale 1."""
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float()
    quantized, scale = quantize_e4m3(weight.detach(), amax)
    return quantized, torch.where(amax > 0, scale, torch.ones_like(scale)).reshape(-1)


def sparse_linear_e4m3_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, n: int, m: int,
                                 norm_compensation: bool, eps: float, lora_down: Tensor | None) -> Tensor:
    kept, scale = sparsify_reference(x, n, m, norm_compensation, eps)
    acc = scale.dtype
    values = kept.to(acc)
    if lora_down is not None:
        # The folded LoRA's tail, divided by the norm scale (which the epilogue multiplies back), takes entries 0
        # and 1 of r/2 extra groups, as pack_lora spread lora_up over the weight's extra columns.
        tail = (x @ lora_down.t()).to(acc) * torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        spread = values.new_zeros((*tail.shape[:-1], tail.shape[-1] // 2, 4))
        spread[..., :2] = tail.reshape(*tail.shape[:-1], -1, 2)
        values = torch.cat([values, spread.flatten(-2)], dim=-1)
    quantized, row_scale = quantize_e4m3(values, values.abs().amax(dim=-1, keepdim=True))
    out = (quantized.to(acc) @ weight.to(acc).t()) * (scale * row_scale) * weight_scale.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype)


def check_linear_e4m3(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, n: int, m: int,
                      lora_down: Tensor | None) -> None:
    _check_pattern(x, n, m)
    rank = 0 if lora_down is None else lora_down.shape[0]
    torch._check(weight.dtype == E4M3, lambda: f"lynx: weight must be float8_e4m3fn, got {weight.dtype}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == x.shape[-1] + 2 * rank,
        lambda: f"lynx: weight {tuple(weight.shape)} must be (out, in + 2r) = (out, {x.shape[-1] + 2 * rank}) for "
        f"input features {x.shape[-1]} and LoRA rank {rank}",
    )
    torch._check(
        weight_scale.dtype == torch.float32 and tuple(weight_scale.shape) == (weight.shape[0],),
        lambda: f"lynx: weight_scale must be float32 ({weight.shape[0]},), got {weight_scale.dtype} {tuple(weight_scale.shape)}",
    )
    torch._check(x.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64),
                 lambda: f"lynx: input must be floating point, got {x.dtype}")
    if lora_down is not None:
        torch._check(
            lora_down.dim() == 2 and lora_down.shape[1] == x.shape[-1] and rank % 2 == 0 and lora_down.dtype == x.dtype,
            lambda: f"lynx: lora_down {tuple(lora_down.shape)} {lora_down.dtype} must be (r, {x.shape[-1]}) with r even, "
            f"in the input's dtype {x.dtype}",
        )
    _check_bias(bias, weight.shape[0])


torch.library.define(
    "lynx::sparse_linear_e4m3",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, int n, int m, bool norm_compensation, float eps, "
    "Tensor? lora_down=None) -> Tensor",
    tags=CONTIGUOUS_INPUTS,
)


def sparse_linear_e4m3(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, n: int, m: int,
                       norm_compensation: bool, eps: float, lora_down: Tensor | None = None) -> Tensor:
    """:func:`sparse_linear` on FP8 tensor cores: ``S(x)``'s kept values quantized to e4m3 per token (scale from their
    largest magnitude, the norm scale folded into it), against ``weight`` in e4m3 with ``weight_scale`` per output
    channel (:func:`quantize_weight_e4m3`). With ``lora_down``, ``weight`` is :func:`pack_lora`'s ``weight_lora``
    quantized, and the LoRA term rides in the same GEMM, quantized with the token. Output in ``x``'s dtype."""
    check_linear_e4m3(x, weight, weight_scale, bias, n, m, lora_down)
    return sparse_linear_e4m3_reference(x, weight, weight_scale, bias, n, m, norm_compensation, eps, lora_down)


torch.library.impl("lynx::sparse_linear_e4m3", "CompositeExplicitAutograd")(sparse_linear_e4m3)


@torch.library.register_fake("lynx::sparse_linear_e4m3")
def _(x, weight, weight_scale, bias, n, m, norm_compensation, eps, lora_down=None):
    check_linear_e4m3(x, weight, weight_scale, bias, n, m, lora_down)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def e4m3_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """FP8 dense ``linear``: ``x`` quantized to e4m3 per token at run time, against ``weight`` quantized per output
    channel (:func:`quantize_weight_e4m3`), one rowwise-scaled ``torch._scaled_mm`` with fast accumulation, output
    in ``x``'s dtype. Registered as ``lynx::e4m3_linear`` with this function as its CompositeImplicitAutograd kernel:
    the lynx passes see one op per layer, and Inductor sees the plain ops and fuses the quantization into the kernel
    that produces ``x``, as it does for FP8 inference recipes built the same way."""
    x2 = x.reshape(-1, x.shape[-1])
    quantized, scale = quantize_e4m3(x2, x2.abs().amax(dim=-1, keepdim=True).float())
    # CUDA's rowwise _scaled_mm takes no bias with a float32 output: add it after.
    fused_bias = bias if x.dtype != torch.float32 else None
    out = torch._scaled_mm(quantized, weight.t(), scale_a=scale, scale_b=weight_scale.reshape(1, -1), bias=fused_bias,
                           out_dtype=x.dtype, use_fast_accum=True)
    if bias is not None and fused_bias is None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


torch.library.define("lynx::e4m3_linear", "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None) -> Tensor")
torch.library.impl("lynx::e4m3_linear", "CompositeImplicitAutograd")(e4m3_linear)
