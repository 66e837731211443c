"""Thin Python wrappers over the kernel library's entry points, for the Python op kernels, tests and benchmarks.

torch allocates every buffer, sizes and GEMM plans come from the library (``lynx_metadata_bytes``,
``lynx_gemm_plan``), and work goes to the current stream without host syncs.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from .. import ops
from . import abi

PDL = os.environ.get("LYNX_PDL", "1") != "0"  # GEMM launched with programmatic dependent launch
WHOLE_ROW_MAX_K = abi.header().constants["LYNX_WHOLE_ROW_MAX_K"]

_lib: ctypes.CDLL | None = None
_config_index: dict[str, int] = {}
_sm_counts: dict[int, int] = {}
_workspaces: dict[int, Tensor] = {}


def attach(lib: ctypes.CDLL) -> None:
    """Launch through ``lib`` from now on (called by ``kernels.load``)."""
    global _lib
    _lib = lib


def library() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError("lynx CUDA kernels not loaded: call lynx_compile.kernels.load() (its reason: load_error())")
    return _lib


def _sm_count(dev: int) -> int:
    if dev not in _sm_counts:
        _sm_counts[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _sm_counts[dev]


def metadata_bytes(M: int, K: int) -> int:
    """Bytes of sparsity metadata for an (M, K) activation."""
    return int(library().lynx_metadata_bytes(M, K))


def gemm_configs() -> dict[str, int]:
    """Name -> index of the compiled GEMM configurations."""
    if not _config_index:
        lib = library()
        _config_index.update({lib.lynx_config_name(i).decode(): i for i in range(lib.lynx_num_configs())})
    return dict(_config_index)


def gemm_type(operand: torch.dtype, out: torch.dtype) -> int:
    """The ``LYNX_GEMM_*`` of a sparse GEMM on ``operand`` (bf16/fp16, or e4m3) with ``out`` (bf16/fp16) output."""
    out_name = {torch.bfloat16: "BF16", torch.float16: "FP16"}.get(out)
    if out_name is None or operand not in (out, ops.E4M3):
        raise ValueError(f"no sparse GEMM on {operand} operands with {out} output")
    prefix = "E4M3_" if operand == ops.E4M3 else ""
    return abi.header().constants[f"LYNX_GEMM_{prefix}{out_name}"]


@functools.lru_cache(maxsize=4096)  # per call of every sparse layer: host time is what small GEMMs lack
def gemm_plan(gemm: int, M: int, N: int, K: int, layer_k: int, dev: int) -> tuple[int, int, int, int]:
    """(config index, swizzle, raster, workspace bytes) of one GEMM shape of GEMM type ``gemm`` (:func:`gemm_type`) on
    one device, from the library's plan for a layer of ``layer_k`` input features (K less any folded-LoRA columns)."""
    lib = library()
    plan = abi.structure("LynxGemmPlan")()
    abi.check(lib, lib.lynx_gemm_plan(gemm, M, N, K, layer_k, _sm_count(dev), ctypes.byref(plan)), "GEMM plan")
    return plan.config, plan.swizzle, plan.raster, plan.workspace_bytes


def choose_config(dtype: torch.dtype, M: int, N: int, K: int, operand: torch.dtype | None = None) -> tuple[int, int, int]:
    """(config index, swizzle, raster) the library plans for this shape on the current device, for ``dtype`` output
    and ``operand`` (default ``dtype``; ``ops.E4M3`` for the e4m3 GEMM) operands
    (``LYNX_GEMM_CONFIG=<config>[:swizzle[:raster]]``, set before the first plan, forces one)."""
    return gemm_plan(gemm_type(operand or dtype, dtype), M, N, K, K, torch.cuda.current_device())[:3]


def _aligned(t: Tensor) -> Tensor:
    t = t.contiguous()
    if t.data_ptr() % 16 != 0:
        t = t.clone()
    return t


def producer(kind: str, mul: Tensor | None = None, add: Tensor | None = None, producer_eps: float = 0.0) -> ctypes.Structure:
    """The ``LynxProducer`` of ``ops.producer_sparse_linear``'s producer ``kind``: ``mul``/``add`` are contiguous
    fp32 (S, K) rows, one per sample of S equal runs of rows (None: 1 and 0). The struct holds their pointers:
    keep the tensors alive while it is used."""
    samples = next((t.shape[0] for t in (mul, add) if t is not None), 1)
    return abi.structure("LynxProducer")(
        abi.header().constants[f"LYNX_PRODUCER_{kind.upper()}"],
        None if mul is None else mul.data_ptr(), None if add is None else add.data_ptr(), samples, float(producer_eps))


def compress_2to4(x2d: Tensor, norm_compensation: bool = True, eps: float = ops.NORM_EPS, *,
                  lora_tail: Tensor | None = None, producer: ctypes.Structure | None = None, e4m3: bool = False,
                  stream: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """2:4-sparsify a (M, K) bf16/fp16 CUDA tensor in one pass (K a multiple of 16; call on x's device).

    Returns ``(values (M, K/2 + r), metadata (bytes, CUTLASS sm90 layout, K + 2r logical columns),
    scale (M,) fp32)``. ``lora_tail`` (M, r), r a multiple of 8, is ``x2d @ lora_down.T``: each row
    of it, divided by the row's scale, is appended to the row's values as the kept entries 0 and 1
    of r/2 extra groups, the folded LoRA of :func:`lynx_compile.ops.pack_lora`. ``producer`` (from
    :func:`producer`; no LoRA tail with it) is applied to ``x2d`` first, inside the same pass.
    ``e4m3``: the values are e4m3 for the e4m3 GEMM, quantized per row, and ``scale`` is each row's
    dequantization scale with the norm scale folded in (:func:`lynx_compile.ops.sparse_linear_e4m3`;
    r a multiple of 16, K + 2r at most ``WHOLE_ROW_MAX_K``).
    """
    lib = library()
    x2d = _aligned(x2d)
    M, K = x2d.shape
    rank = 0
    if lora_tail is not None:
        lora_tail = _aligned(lora_tail)
        rank = lora_tail.shape[1]
        if lora_tail.shape[0] != M or lora_tail.dtype != x2d.dtype:
            raise ValueError(f"lora_tail {tuple(lora_tail.shape)} {lora_tail.dtype} does not match x {tuple(x2d.shape)} "
                             f"{x2d.dtype}")
    values = torch.empty((M, K // 2 + rank), dtype=ops.E4M3 if e4m3 else x2d.dtype, device=x2d.device)
    meta = torch.empty((metadata_bytes(M, K + 2 * rank),), dtype=torch.uint8, device=x2d.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x2d.device)
    if M > 0:
        stream = torch.cuda.current_stream(x2d.device).cuda_stream if stream is None else stream
        sparsify = lib.lynx_sparsify_2to4_e4m3 if e4m3 else lib.lynx_sparsify_2to4
        status = sparsify(int(x2d.dtype == torch.bfloat16), x2d.data_ptr(), K, M, K, values.data_ptr(), meta.data_ptr(),
                          scale.data_ptr(), int(norm_compensation), float(eps), lora_tail.data_ptr() if rank else None,
                          rank, None if producer is None else ctypes.byref(producer), stream)
        abi.check(lib, status, "sparsify")
    return values, meta, scale


def _workspace(dev: int, nbytes: int) -> Tensor | None:
    if nbytes <= 0:
        return None
    ws = _workspaces.get(dev)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty((max(nbytes, 1 << 20),), dtype=torch.uint8, device=torch.device("cuda", dev))
        _workspaces[dev] = ws
    return ws


def sparse_mm_compressed(values: Tensor, meta: Tensor, scale: Tensor | None, weight: Tensor, bias: Tensor | None = None,
                         out: Tensor | None = None, config: tuple[int, int, int] | None = None, *,
                         col_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,
                         layer_k: int | None = None, stream: int | None = None) -> Tensor:
    """``scale[:, None] * col_scale[None, :] * (A~ @ weight.T) + bias`` from the compressed activation; (M, N) output.

    16-bit ``values`` and ``weight`` of one dtype give that dtype; e4m3 ones (from ``compress_2to4(..., e4m3=True)``
    and :func:`lynx_compile.ops.quantize_weight_e4m3`) take the weight's fp32 ``col_scale`` and give ``out_dtype``
    (bf16/fp16, or ``out``'s). Call with the tensors' device current. ``config`` = (index, swizzle, raster)
    overrides the library's plan (see :func:`choose_config`), which otherwise plans for ``layer_k`` input features
    (default: all K; a folded LoRA's extra columns run on the layer's own configuration); ``stream`` (a
    ``cudaStream_t``) the current stream.
    """
    lib = library()
    M, K = values.shape[0], values.shape[1] * 2
    N = weight.shape[0]
    if weight.shape[1] != K or weight.dtype != values.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match {K} logical input columns of "
                         f"{values.dtype}")
    dev = values.device.index if values.device.index is not None else torch.cuda.current_device()
    out_dtype = out.dtype if out is not None else out_dtype or values.dtype
    gemm = gemm_type(values.dtype, out_dtype)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=values.device)
    if M == 0 or N == 0:
        return out
    weight = _aligned(weight)
    if bias is not None:
        bias = _aligned(bias if bias.dtype == out_dtype else bias.to(out_dtype))
    if col_scale is not None:
        col_scale = _aligned(col_scale.float())
    sms = _sm_count(dev)
    if config is None:
        cfg, swz, ras, ws_bytes = gemm_plan(gemm, M, N, K, layer_k or K, dev)
    else:
        cfg, swz, ras = config
        ws_bytes = int(lib.lynx_sparse_gemm_workspace(cfg, M, N, K, sms))
    ws = _workspace(dev, ws_bytes)
    if stream is None:
        stream = torch.cuda.current_stream(values.device).cuda_stream
    status = lib.lynx_sparse_gemm(cfg, values.data_ptr(), meta.data_ptr(), weight.data_ptr(),
                                  scale.data_ptr() if scale is not None else None,
                                  col_scale.data_ptr() if col_scale is not None else None,
                                  bias.data_ptr() if bias is not None else None, out.data_ptr(), M, N, K, swz, ras, dev,
                                  sms, int(PDL), ws.data_ptr() if ws is not None else None,
                                  ws.numel() if ws is not None else 0, stream)
    abi.check(lib, status, "sparse GEMM")
    return out
