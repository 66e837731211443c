"""CUDA kernels for the ``lynx`` ops: 2:4 online activation sparsification + sm90 sparse GEMM.

The kernels live in one torch-independent shared library built by ``nvcc`` from ``cuda/*.cu`` (:mod:`.compilation`)
and called through the C ABI of ``cuda/lynx_api.h`` (:mod:`.abi`). Entry points take raw device pointers, sizes
and a ``cudaStream_t``; every buffer is allocated by torch, so the ops stay CUDA-graph safe (no host syncs, no
cudaMalloc in the hot path).

:func:`load` is the one step with side effects: on a machine with a GPU the kernels are built for, it builds
(once, cached) and loads the library and registers the ops' CUDA kernels (:mod:`.registry`); elsewhere it
returns False at once. Importing this package, :func:`available` and :func:`unsupported_reason` build and
register nothing: they report what :func:`load` found. The backend calls :func:`load` before its passes;
``python -m lynx_compile.kernels`` builds the library ahead of time.

The graph pass calls :func:`unsupported_reason` at compile time; ``None`` means the CUDA kernel takes the layer.
The weight needs no preparation: ``nn.Linear``'s (N, K) row-major weight is the kernel's dense operand as is
(a folded LoRA's is packed once, by ``ops.pack_lora``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .. import ops
from . import abi, compilation, launch, registry, support
from .compilation import build
from .launch import choose_config, compress_2to4, gemm_configs, metadata_bytes, sparse_mm_compressed
from .registry import sparse_linear_cuda, sparse_linear_e4m3_cuda, sparse_linear_lora_cuda

__all__ = [
    "load",
    "load_error",
    "available",
    "unsupported_reason",
    "build",
    "compress_2to4",
    "sparse_mm_compressed",
    "sparse_linear_cuda",
    "sparse_linear_lora_cuda",
    "sparse_linear_e4m3_cuda",
    "metadata_bytes",
    "gemm_configs",
    "choose_config",
    "torch_ops_error",
    "K_MULTIPLE",
    "N_MULTIPLE",
]

_NOT_LOADED = "lynx_compile.kernels.load() has not run"

_lock = threading.Lock()
_loaded: bool | None = None  # None until load() has run
_load_error: str | None = _NOT_LOADED

torch_ops_error: str | None = _NOT_LOADED
"""Why the C++ kernels of the ops (``cuda/torch_ops.cpp``) are not in use; None once they are."""


def __getattr__(name: str) -> int:
    # The kernels' shape multiples, read from cuda/lynx_api.h on first use rather than at import.
    if name in ("K_MULTIPLE", "N_MULTIPLE"):
        return abi.header().constants[f"LYNX_{name}"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


KERNELS_OFF_VARIABLE = "LYNX_COMPILE_KERNELS"
"""Set to ``off`` to leave the kernels unloaded: every sparse layer then runs the reference op, also on a GPU and
in float32, e.g. to measure the sparsity's numerics apart from the kernels'."""


def _no_kernel_gpu() -> str | None:
    """Why this machine has no GPU the kernels are built for, or they are switched off (None: they run)."""
    if os.environ.get(KERNELS_OFF_VARIABLE, "").lower() == "off":
        return f"{KERNELS_OFF_VARIABLE}=off"
    if not support.cuda_ok():
        return "no CUDA device visible to torch"
    reasons = [support.device_reason(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return None if None in reasons else reasons[0] if reasons else "no CUDA device visible to torch"


def load() -> bool:
    """Build (once, cached) and load the kernel library and register the ops' CUDA kernels; True when they run.

    Idempotent and never raises: on failure it returns False and :func:`load_error` says why. Without a
    GPU the kernels are built for it returns False at once, without running nvcc.
    """
    global _loaded, _load_error, torch_ops_error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            reason = _no_kernel_gpu()
            if reason is None:
                path = Path(compilation.build()).resolve()
                launch.attach(abi.open_library(path))
                # A bad LYNX_GEMM_CONFIG fails every plan: say so here, once, rather than at the first layer. The
                # probe is an e4m3 plan because every tile is compiled for the e4m3 types: a valid override naming
                # an e4m3-only tile fails the 16-bit plans alone.
                e4m3 = launch.gemm_type(ops.E4M3, torch.bfloat16)
                launch.gemm_plan(e4m3, 64, 64, 64, 64, torch.cuda.current_device())
                torch_ops_error = registry.register(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
            reason = f"{type(exc).__name__}: {exc}".strip()
        _load_error = reason
        if reason is not None:
            torch_ops_error = f"CUDA kernels not loaded: {reason}"
        _loaded = reason is None
        return _loaded


def load_error() -> str | None:
    """Why the CUDA kernels are not loaded (None once :func:`load` succeeded)."""
    return _load_error


def available() -> bool:
    """True once :func:`load` has loaded the kernels (it never loads them itself)."""
    return bool(_loaded)


def unsupported_reason(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int,
                       n: int, m: int) -> str | None:
    """Why the CUDA kernel cannot take this layer (``None``: it can). Called by the graph pass at compile time;
    builds and loads nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"kernel is CUDA-only, got device {device.type}"
    if not support.cuda_ok():
        return "no CUDA device visible to torch"
    reason = support.layer_reason(dtype, in_features, out_features, n, m) or support.device_reason(device)
    if reason is not None:
        return reason
    if not _loaded:
        return f"CUDA kernels not loaded: {_load_error}"
    return None
