"""The CUDA kernels of the ``lynx`` linear ops, registered with the dispatcher.

The C++ kernels (``cuda/torch_ops.cpp``) serve the ops: they do the supported case without Python, whose host
time bounds a forward without CUDA graphs. The Python kernels here do the same work through the thin wrappers
(same plans, same CUDA kernels) and fall back to the reference op, with a warning, where the kernels cannot take
a call. They serve every case the C++ kernels hand over, and all of them where the C++ kernels do not build
(or ``LYNX_TORCH_OPS=0``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .. import ops
from . import compilation, launch, support

USE_TORCH_OPS = os.environ.get("LYNX_TORCH_OPS", "1") != "0"  # 0: the Python kernels serve the ops

_runtime_reasons: dict[tuple, str | None] = {}
_warned: set[tuple[str, str]] = set()
_python_kernels: torch.library.Library | None = None


def _runtime_reason(x: Tensor, weight: Tensor, n: int, m: int, others: tuple[Tensor | None, ...],
                    check_args: Callable[[], None]) -> str | None:
    """Why the kernels can't take this call (None: they can), after ``check_args`` raised on bad arguments.

    Cached per call signature (devices, dtypes, shapes but the token count): this runs on every call,
    host time is what a DiT forward of ~100 small sparse GEMMs is short of, and the op's
    ``torch._check``s alone cost tens of microseconds.
    """
    key = (x.device, weight.device, x.dtype, weight.dtype, x.shape[-1], weight.shape, n, m,
           *((None, None) if t is None else (t.shape, t.dtype) for t in others))
    if key not in _runtime_reasons:
        check_args()
        if x.device.type != "cuda" or weight.device != x.device:
            reason = "not on one CUDA device"
        else:
            reason = support.layer_reason(x.dtype, x.shape[-1], weight.shape[0], n, m) or support.device_reason(x.device)
        _runtime_reasons[key] = reason
    return _runtime_reasons[key]


def _reference_fallback(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"lynx::{op}: using the reference implementation ({reason})", stacklevel=3)


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, norm_compensation: bool, eps: float,
            lora_down: Tensor | None, producer: tuple | None = None, weight_scale: Tensor | None = None) -> Tensor:
    """Sparsify x (appending ``x @ lora_down.T`` when given, applying ``producer`` = (kind, mul, add, producer_eps)
    first when given) and run the one sparse GEMM against ``weight``; e4m3 where ``weight`` is (with its
    ``weight_scale``)."""
    lead = x.shape[:-1]
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.reshape(*lead, N)
    # The library launches on the calling thread's current device; switch only when it differs.
    on_device = contextlib.nullcontext() if x.device.index == torch.cuda.current_device() else torch.cuda.device(x.device)
    with on_device:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        lora_tail = x2 @ lora_down.t() if lora_down is not None else None
        fused = None if producer is None else launch.producer(*producer)
        values, meta, scale = launch.compress_2to4(x2, norm_compensation, eps, lora_tail=lora_tail, producer=fused,
                                                   e4m3=weight.dtype == ops.E4M3, stream=stream)
        launch.sparse_mm_compressed(values, meta, scale, weight, bias, out=out, col_scale=weight_scale, layer_k=K,
                                    stream=stream)
    return out.reshape(*lead, N)


def sparse_linear_cuda(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, m: int, norm_compensation: bool,
                       eps: float = ops.NORM_EPS, lora_down: Tensor | None = None,
                       lora_up: Tensor | None = None) -> Tensor:
    """Python kernel of ``lynx::sparse_linear``; falls back to the reference where the kernels can't take the call.

    With LoRA factors it packs them per call (:func:`lynx_compile.ops.pack_lora`, a copy of the
    weight); the backend instead packs once at compile time and calls ``lynx::sparse_linear_lora``.
    """
    reason = _runtime_reason(x, weight, n, m, (bias, lora_down, lora_up),
                             lambda: ops.check_linear(x, weight, bias, n, m, lora_down, lora_up))
    if reason is not None:
        _reference_fallback("sparse_linear", reason)
        return ops.sparse_linear_reference(x, weight, bias, n, m, norm_compensation, eps, lora_down, lora_up)
    if lora_down is not None and lora_up is not None:
        weight, lora_down = ops.pack_lora(weight, lora_down.to(x.dtype), lora_up.to(x.dtype))
    return _launch(x, weight, bias, norm_compensation, eps, lora_down)


def sparse_linear_lora_cuda(x: Tensor, weight_lora: Tensor, bias: Tensor | None, n: int, m: int,
                            norm_compensation: bool, eps: float, lora_down: Tensor) -> Tensor:
    """Python kernel of ``lynx::sparse_linear_lora``: the down-projection, then one sparsify pass that
    appends it to the compressed tokens, then one sparse GEMM over K + 2r columns."""
    reason = _runtime_reason(x, weight_lora, n, m, (bias, lora_down),
                             lambda: ops.check_linear_lora(x, weight_lora, bias, n, m, lora_down))
    if reason is not None or lora_down.shape[0] % 8 != 0:
        rank_reason = f"LoRA rank {lora_down.shape[0]} not a multiple of 8 (use ops.pack_lora)"
        _reference_fallback("sparse_linear_lora", reason or rank_reason)
        return ops.sparse_linear_lora(x, weight_lora, bias, n, m, norm_compensation, eps, lora_down)
    return _launch(x, weight_lora, bias, norm_compensation, eps, lora_down)


def _producer_reason(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None) -> str | None:
    """Why the sparsify kernel cannot run this producer (None: it can)."""
    if producer == "layer_norm" and x.shape[-1] > launch.WHOLE_ROW_MAX_K:
        return f"layer norm over {x.shape[-1]} > {launch.WHOLE_ROW_MAX_K} features"
    if any(t is not None and (t.device != x.device or not t.is_contiguous()) for t in (mul, add)):
        return "producer rows not contiguous on the input's device"
    return None


def producer_sparse_linear_cuda(x: Tensor, producer: str, mul: Tensor | None, add: Tensor | None, producer_eps: float,
                                weight: Tensor, bias: Tensor | None, n: int, m: int, norm_compensation: bool,
                                eps: float, weight_scale: Tensor | None = None) -> Tensor:
    """Python kernel of ``lynx::producer_sparse_linear``: one sparsify pass that runs the producer on the loaded
    input, then the sparse GEMM (e4m3 with ``weight_scale``); the reference where the kernels can't take the call."""
    ops.check_producer(x, producer, mul, add)  # per call: whether the tokens split into the samples depends on M
    reason = _runtime_reason(x, weight, n, m, (bias, mul, add, weight_scale),
                             lambda: ops.check_producer_linear(x, producer, mul, add, weight, bias, n, m, weight_scale))
    reason = reason or _producer_reason(x, producer, mul, add)
    if reason is None and weight_scale is not None:
        reason = support.e4m3_reason(x.shape[-1], 0)
    if reason is not None:
        _reference_fallback("producer_sparse_linear", reason)
        return ops.producer_sparse_linear(x, producer, mul, add, producer_eps, weight, bias, n, m, norm_compensation, eps,
                                          weight_scale)
    return _launch(x, weight, bias, norm_compensation, eps, None, (producer, mul, add, producer_eps), weight_scale)


def sparse_linear_e4m3_cuda(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, n: int, m: int,
                            norm_compensation: bool, eps: float, lora_down: Tensor | None = None) -> Tensor:
    """Python kernel of ``lynx::sparse_linear_e4m3``: the down-projection (with LoRA), one sparsify pass that writes
    the e4m3 tokens, one e4m3 sparse GEMM; the reference where the kernels can't take the call."""
    rank = 0 if lora_down is None else lora_down.shape[0]
    reason = _runtime_reason(x, weight, n, m, (weight_scale, bias, lora_down),
                             lambda: ops.check_linear_e4m3(x, weight, weight_scale, bias, n, m, lora_down))
    reason = reason or support.e4m3_reason(x.shape[-1], rank)
    if reason is not None:
        _reference_fallback("sparse_linear_e4m3", reason)
        return ops.sparse_linear_e4m3(x, weight, weight_scale, bias, n, m, norm_compensation, eps, lora_down)
    return _launch(x, weight, bias, norm_compensation, eps, lora_down, weight_scale=weight_scale)


def _register_python_kernels() -> None:
    global _python_kernels
    kernels = torch.library.Library("lynx", "IMPL")
    kernels.impl("sparse_linear", sparse_linear_cuda, "CUDA")
    kernels.impl("sparse_linear_lora", sparse_linear_lora_cuda, "CUDA")
    kernels.impl("producer_sparse_linear", producer_sparse_linear_cuda, "CUDA")
    kernels.impl("sparse_linear_e4m3", sparse_linear_e4m3_cuda, "CUDA")
    _python_kernels = kernels


def register(library_path: Path) -> str | None:
    """Register the CUDA kernels of the ops, once: the C++ ones where they build, else the Python ones.
    Returns why the C++ kernels are not in use (None: they are)."""
    if not USE_TORCH_OPS:
        _register_python_kernels()
        return "disabled by LYNX_TORCH_OPS=0"
    try:
        module = compilation.build_torch_ops()
    except Exception as exc:  # noqa: BLE001 - the Python kernels do the same work, only slower
        reason = f"{type(exc).__name__}: {exc}".strip()[:2000]
        warnings.warn(f"lynx_compile: C++ op kernels unavailable, using the Python ones ({reason[:300]})", stacklevel=3)
        _register_python_kernels()
        return reason
    try:
        module.init(str(library_path), launch.PDL, sparse_linear_cuda, sparse_linear_lora_cuda, producer_sparse_linear_cuda,
                    sparse_linear_e4m3_cuda)
    except Exception as exc:  # noqa: BLE001 - registered already, the C++ kernels hand every call to the Python ones
        reason = f"{type(exc).__name__}: {exc}".strip()[:2000]
        warnings.warn(f"lynx_compile: C++ op kernels not initialised, using the Python ones ({reason[:300]})", stacklevel=3)
        return reason
    return None
