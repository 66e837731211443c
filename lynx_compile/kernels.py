"""CUDA kernels for the ``lynx`` ops: 2:4 online activation sparsification + sm90 sparse GEMM.

The kernels live in one torch-ABI-independent shared library built by ``nvcc`` from ``cuda/*.cu``
(CUTLASS 3.x headers from the ``nvidia-cutlass`` wheel, target ``sm_90a``) and loaded with ctypes.
Entry points take raw device pointers, sizes and a ``cudaStream_t``; every buffer is allocated
by torch here, so the ops stay CUDA-graph safe (no host syncs, no cudaMalloc in the hot path).

Build: just in time on first use (``nvcc`` in parallel, one progress line on stderr, a few minutes),
cached under ``$LYNX_COMPILE_CACHE_DIR`` (default ``~/.cache/lynx_compile``) in ``<source-hash>/``,
written through a temporary directory and an atomic rename under a file lock. ``LYNX_COMPILE_LIB``
points at a prebuilt library instead; ``python -m lynx_compile.kernels`` builds ahead of time.

The graph pass calls :func:`unsupported_reason` at compile time; ``None`` means the CUDA kernel
takes the layer. The weight needs no preparation: ``nn.Linear``'s (N, K) row-major weight is the
kernel's dense operand as is (a folded LoRA's is packed once, by ``ops.pack_lora``).

Importing this module registers Python CUDA kernels for ``lynx::sparse_linear`` and
``lynx::sparse_linear_lora`` when torch sees a CUDA device; importing never builds and never fails.
When the library loads, C++ kernels (``cuda/torch_ops.cpp``, built with ``torch.utils.cpp_extension``
once per torch version, about a minute, and cached beside the library) take their place: they do
the supported case without Python, whose host time bounds a forward without CUDA graphs, and call
the Python kernels for the rest. ``LYNX_TORCH_OPS=0`` keeps the Python kernels; ``torch_ops_error``
says why the C++ ones are not in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lynx_compile import ops

__all__ = [
    "available",
    "unsupported_reason",
    "build",
    "compress_2to4",
    "sparse_mm_compressed",
    "sparse_linear_cuda",
    "sparse_linear_lora_cuda",
    "metadata_bytes",
    "gemm_configs",
    "choose_config",
]

def _default_src_dir() -> Path:
    """``cuda/`` ships inside an installed wheel as ``lynx_compile/cuda``; a checkout has it at the top."""
    packaged = Path(__file__).resolve().parent / "cuda"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "cuda"


_SRC_DIR = Path(os.environ.get("LYNX_COMPILE_CUDA_SRC") or _default_src_dir())
_LIB_NAME = "liblynx_kernels.so"
_NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DNDEBUG", "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
    "-gencode", "arch=compute_90a,code=sm_90a",
]
_DTYPES = (torch.bfloat16, torch.float16)
_PDL = os.environ.get("LYNX_PDL", "1") != "0"  # GEMM launched with programmatic dependent launch
_CONFIG_OVERRIDE = os.environ.get("LYNX_GEMM_CONFIG")  # name[:swizzle[:raster]], for tuning by hand
K_MULTIPLE = 64
N_MULTIPLE = 8

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


# --------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------

def _cache_root() -> Path:
    return Path(os.environ.get("LYNX_COMPILE_CACHE_DIR", Path.home() / ".cache" / "lynx_compile"))


def _cutlass_includes() -> list[str]:
    root = os.environ.get("CUTLASS_PATH")
    if root:
        base = Path(root)
    else:
        try:
            import cutlass_library  # the nvidia-cutlass wheel ships the C++ tree
        except ImportError as exc:
            raise RuntimeError("CUTLASS headers not found: pip install nvidia-cutlass, or set CUTLASS_PATH") from exc
        base = Path(cutlass_library.__file__).resolve().parent / "source"
    incs = [base / "include", base / "tools" / "util" / "include"]
    if not (incs[0] / "cute" / "tensor.hpp").exists():
        raise RuntimeError(f"CUTLASS headers not found under {base}")
    return [str(p) for p in incs]


def _nvcc() -> str:
    for cand in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    import shutil

    found = shutil.which("nvcc")
    if not found:
        raise RuntimeError("nvcc not found (set CUDA_HOME or NVCC)")
    return found


def _sources() -> list[Path]:
    if not _SRC_DIR.is_dir():
        raise RuntimeError(f"CUDA sources not found at {_SRC_DIR}")
    return sorted(_SRC_DIR.glob("*.cu"))


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(list(_SRC_DIR.glob("*.cu")) + list(_SRC_DIR.glob("*.cuh")) + list(_SRC_DIR.glob("*.h"))
                    + list(_SRC_DIR.glob("*.inc"))):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(_NVCC_FLAGS).encode())
    try:
        import cutlass_library

        h.update(str(getattr(cutlass_library, "__version__", "")).encode())
    except ImportError:
        pass
    return h.hexdigest()[:16]


def build(verbose: bool = True) -> Path:
    """Build (or find in the cache) the kernel library and return its path."""
    prebuilt = os.environ.get("LYNX_COMPILE_LIB")
    if prebuilt:
        return Path(prebuilt)
    out_dir = _cache_root() / _source_hash()
    target = out_dir / _LIB_NAME
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(out_dir / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if target.exists():  # another process built it while we waited
                return target
            _compile(out_dir, target, verbose)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def _compile(out_dir: Path, target: Path, verbose: bool) -> None:
    nvcc = _nvcc()
    incs = [f"-I{p}" for p in _cutlass_includes()] + [f"-I{_SRC_DIR}"]
    srcs = _sources()
    jobs = max(1, min(len(srcs), int(os.environ.get("LYNX_COMPILE_JOBS", os.cpu_count() or 1))))
    if verbose:
        print(f"lynx_compile: building CUDA kernels ({len(srcs)} files, {jobs} parallel nvcc jobs; "
              f"a few minutes, once) into {out_dir}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        objs, pending = [], list(srcs)
        running: list[tuple[subprocess.Popen, Path, Path]] = []
        failures = []
        while pending or running:
            while pending and len(running) < jobs:
                src = pending.pop(0)
                obj = Path(tmp) / (src.stem + ".o")
                log = Path(tmp) / (src.stem + ".log")
                cmd = [nvcc, *_NVCC_FLAGS, *incs, "-c", str(src), "-o", str(obj)]
                running.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT), src, log))
                objs.append(obj)
            proc, src, log = running.pop(0)
            if proc.wait() != 0:
                failures.append(f"{src.name}:\n{log.read_text()[-4000:]}")
        if failures:
            raise RuntimeError("nvcc failed:\n" + "\n".join(failures))
        tmp_lib = Path(tmp) / _LIB_NAME
        cmd = [nvcc, "-shared", "-o", str(tmp_lib), *map(str, objs), "-cudart", "static"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc link failed:\n{res.stdout}{res.stderr}")
        os.replace(tmp_lib, target)  # atomic: readers see no file or the whole library
    if verbose:
        print(f"lynx_compile: CUDA kernels built: {target}", file=sys.stderr, flush=True)


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.lynx_abi_version.restype = c.c_int
    lib.lynx_num_configs.restype = c.c_int
    lib.lynx_config_name.restype = c.c_char_p
    lib.lynx_config_name.argtypes = [c.c_int]
    lib.lynx_config_is_bf16.argtypes = [c.c_int]
    lib.lynx_sparsify_2to4.restype = c.c_int
    lib.lynx_sparsify_2to4.argtypes = [c.c_int, c.c_void_p, c.c_longlong, c.c_int, c.c_int, c.c_void_p, c.c_void_p,
                                       c.c_void_p, c.c_int, c.c_float, c.c_int, c.c_void_p, c.c_int, c.c_void_p]
    lib.lynx_metadata_bytes.restype = c.c_longlong
    lib.lynx_metadata_bytes.argtypes = [c.c_int, c.c_int]
    lib.lynx_sparse_gemm.restype = c.c_int
    lib.lynx_sparse_gemm.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p,
                                     c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int,
                                     c.c_int, c.c_void_p, c.c_size_t, c.c_void_p]
    lib.lynx_sparse_gemm_workspace.restype = c.c_longlong
    lib.lynx_sparse_gemm_workspace.argtypes = [c.c_int, c.c_int, c.c_int, c.c_int, c.c_int]
    lib.lynx_cuda_error_string.restype = c.c_char_p
    lib.lynx_cuda_error_string.argtypes = [c.c_int]


def _load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None (and ``_lib_error`` set) if that fails."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            path = build()
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.lynx_abi_version() != 2:
                raise RuntimeError("library ABI version mismatch")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
            _lib_error = f"{type(exc).__name__}: {exc}".strip()
            return _lib
        _load_torch_ops(_lib)
    return _lib


_USE_TORCH_OPS = os.environ.get("LYNX_TORCH_OPS", "1") != "0"  # 0: keep the Python kernels of the ops
torch_ops_error: str | None = None
"""Why the C++ kernels of the ops (``cuda/torch_ops.cpp``) are not in use; None once they are."""


def _load_torch_ops(lib: ctypes.CDLL) -> None:
    """Build (once per torch version) and load the C++ kernels of the two ops in place of the Python ones.

    They do the supported case without Python, the host time a DiT forward without CUDA graphs is
    bound by, and call back into this module for everything else.
    """
    global torch_ops_error
    if not _USE_TORCH_OPS:
        torch_ops_error = "disabled by LYNX_TORCH_OPS=0"
        return
    if _python_kernels is None:
        torch_ops_error = "no CUDA device"
        return
    from torch.utils import cpp_extension

    build_dir = _cache_root() / "torch_ops" / re.sub(r"[^\w.]", "_", f"torch-{torch.__version__}")
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print(f"lynx_compile: building the C++ op kernels (about a minute, once per torch version) into {build_dir}",
              file=sys.stderr, flush=True)
    # The dispatcher takes one CUDA kernel per op: the Python ones go first, and come back if this fails.
    _python_kernels._destroy()
    try:
        module = cpp_extension.load(name="lynx_torch_ops", sources=[str(_SRC_DIR / "torch_ops.cpp")],
                                    extra_cflags=["-O2"], extra_ldflags=["-lcublas"],
                                    build_directory=str(build_dir), with_cuda=True)
        entry = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
        module.init(entry(lib.lynx_sparsify_2to4), entry(lib.lynx_sparse_gemm), entry(lib.lynx_metadata_bytes),
                    K_MULTIPLE, N_MULTIPLE, _PDL, _plan_for_torch_ops, sparse_linear_cuda, sparse_linear_lora_cuda)
        torch_ops_error = None
    except Exception as exc:  # noqa: BLE001 - the Python kernels do the same work, only slower
        torch_ops_error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        warnings.warn(f"lynx_compile: C++ op kernels unavailable, using the Python ones ({torch_ops_error[:300]})",
                      stacklevel=2)
        _register_python_kernels()


def _cuda_ok() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _sm90_device(device: torch.device) -> str | None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    if (major, minor) != (9, 0):
        return f"sm_{major}{minor} GPU: no sm_90 kernel"
    return None


def available() -> bool:
    """True when a CUDA sm_90 device is present and the kernel library builds and loads."""
    if not _cuda_ok():
        return False
    if _sm90_device(torch.device("cuda")) is not None:
        return False
    return _load() is not None


def unsupported_reason(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int,
                       n: int, m: int) -> str | None:
    """Why the CUDA kernel cannot take this layer (``None``: it can). Called by the graph pass at compile time."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"kernel is CUDA-only, got device {device.type}"
    if not _cuda_ok():
        return "no CUDA device visible to torch"
    if (n, m) != (2, 4):
        return f"kernel does 2:4 only, got {n}:{m}"
    if dtype not in _DTYPES:
        return f"kernel takes bf16/fp16 only, got {str(dtype).replace('torch.', '')}"
    if in_features % K_MULTIPLE != 0:
        return f"in_features {in_features} not a multiple of {K_MULTIPLE}"
    if out_features % N_MULTIPLE != 0:
        return f"out_features {out_features} not a multiple of {N_MULTIPLE}"
    reason = _sm90_device(device)
    if reason is not None:
        return reason
    if _load() is None:
        return f"CUDA kernels not built: {_lib_error}"
    return None


SLOWER_BELOW_OUT_FEATURES = 2048


def slower_than_dense(out_features: int) -> str | None:
    """Why sparse would lose to cuBLAS on this layer, from benchmarks/results/gemm-*.json (H100).

    With few output features the separate sparsify pass (a read of X, a write of half of it)
    costs more than the sparse GEMM saves: 0.74x, 0.80x and 0.88x of cuBLAS end to end at
    N = 1152, against 1.08-1.44x from N = 3456 up (M >= 4096; 0.69x at M = 512).
    """
    if out_features < SLOWER_BELOW_OUT_FEATURES:
        return (f"out_features {out_features} < {SLOWER_BELOW_OUT_FEATURES}: sparsify + sparse GEMM measured "
                "slower than cuBLAS there (0.74-0.88x on H100)")
    return None


# --------------------------------------------------------------------------------------------
# Configurations and the per-shape heuristic
# --------------------------------------------------------------------------------------------

_config_index: dict[str, int] | None = None


def gemm_configs() -> dict[str, int]:
    """Name -> index of the compiled GEMM configurations."""
    global _config_index
    if _config_index is None:
        lib = _load()
        if lib is None:
            return {}
        _config_index = {lib.lynx_config_name(i).decode(): i for i in range(lib.lynx_num_configs())}
    return _config_index


# Measured best (config suffix, swizzle, raster) on H100 SXM (benchmarks/gemm.py --tune), keyed on (M, N, K).
# raster: 1 = along M, 2 = along N, 0 = CUTLASS heuristic.
_TUNED: dict[tuple[int, int, int], tuple[str, int, int]] = {
    (4096, 3456, 1152): ("128x128_c1x2_pp", 1, 1),
    (4096, 1152, 1152): ("128x128_c1x2_pp", 1, 1),
    (4096, 4608, 1152): ("128x128_c1x2_pp", 1, 1),
    (4096, 1152, 4608): ("128x128_c1x2_coop", 1, 1),
    (8192, 4608, 1152): ("256x128_c1x2_coop", 1, 1),
    (8192, 1152, 4608): ("256x128_c2x1_coop", 1, 2),
    (4608, 9216, 3072): ("256x128_c1x2_coop", 1, 1),
    (4608, 12288, 3072): ("256x128_c1x2_coop", 2, 1),
    (4608, 3072, 12288): ("256x128_c1x2_coop", 1, 1),
    (4608, 21504, 3072): ("256x128_c1x2_coop", 2, 1),
    (4608, 3072, 15360): ("256x128_c1x2_coop", 1, 2),
    (4096, 4096, 3072): ("256x128_c2x1_coop", 4, 2),
    (4096, 4096, 12288): ("256x128_c1x2_coop", 8, 1),
    (512, 4608, 1152): ("256x128_c2x1_coop", 1, 2),
}


def _heuristic(dtype: torch.dtype, M: int, N: int, K: int) -> tuple[str, int, int]:
    """(config name, swizzle, raster): the tuned entry, else a rule fitted to the tuned shapes.

    256x128 tiles (2x1 cluster) win once there are enough of them to fill the 132 SMs about 1.5 times;
    below that the smaller 128x128 tile balances better (ping-pong for short K, cooperative for long K).
    """
    prefix = "bf16" if dtype == torch.bfloat16 else "fp16"
    hit = _TUNED.get((M, N, K))
    if hit is None:
        tiles_256 = -(-M // 256) * -(-N // 128)
        if M >= 1024 and tiles_256 < 200:
            hit = ("128x128_c1x2_pp" if K <= 2048 else "128x128_c1x2_coop", 1, 1)
        else:
            hit = ("256x128_c2x1_coop", 1, 1)
    return f"{prefix}_{hit[0]}", hit[1], hit[2]


def choose_config(dtype: torch.dtype, M: int, N: int, K: int) -> tuple[int, int, int]:
    """(config index, swizzle, raster) for this shape. ``LYNX_GEMM_CONFIG=name[:swizzle[:raster]]``, set
    before import, overrides."""
    cfgs = gemm_configs()
    prefix = "bf16" if dtype == torch.bfloat16 else "fp16"
    if _CONFIG_OVERRIDE:
        parts = _CONFIG_OVERRIDE.split(":")
        name, swz, ras = parts[0], int(parts[1]) if len(parts) > 1 else 1, int(parts[2]) if len(parts) > 2 else 0
    else:
        name, swz, ras = _heuristic(dtype, M, N, K)
    if name not in cfgs or not name.startswith(prefix):
        name = f"{prefix}_128x128_c1x2_coop"
    return cfgs[name], swz, ras


# --------------------------------------------------------------------------------------------
# Thin wrappers over the entry points (torch allocates; current stream; no syncs)
# --------------------------------------------------------------------------------------------

_sm_counts: dict[int, int] = {}
_workspaces: dict[int, Tensor] = {}


def _sm_count(dev: int) -> int:
    if dev not in _sm_counts:
        _sm_counts[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _sm_counts[dev]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = _load()
        msg = ""
        if rc <= -1000 and lib is not None:
            msg = ": " + lib.lynx_cuda_error_string(-1000 - rc).decode()
        elif rc > 0 and lib is not None:
            msg = ": " + lib.lynx_cuda_error_string(rc).decode()
        raise RuntimeError(f"lynx {what} failed with code {rc}{msg}")


def metadata_bytes(M: int, K: int) -> int:
    return ((M + 63) // 64 * 64) * ((K + 127) // 128 * 128) // 8


def _aligned(t: Tensor) -> Tensor:
    t = t.contiguous()
    if t.data_ptr() % 16 != 0:
        t = t.clone()
    return t


@functools.lru_cache(maxsize=4096)  # per call of every sparse layer: host time is what small GEMMs lack
def _gemm_plan(dtype: torch.dtype, M: int, N: int, K: int, layer_k: int, dev: int) -> tuple[int, int, int, int]:
    """(config index, swizzle, raster, workspace bytes) of one GEMM shape on one device; the configuration
    is the one tuned for the layer's own in_features ``layer_k`` (K less any folded-LoRA columns)."""
    cfg, swz, ras = choose_config(dtype, M, N, layer_k)
    return cfg, swz, ras, int(_load().lynx_sparse_gemm_workspace(cfg, M, N, K, _sm_count(dev)))


def compress_2to4(x2d: Tensor, norm_compensation: bool = True, eps: float = ops.NORM_EPS,
                  _swap_nibbles: bool = False, *, lora_tail: Tensor | None = None,
                  stream: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """2:4-sparsify a (M, K) bf16/fp16 CUDA tensor in one pass (K a multiple of 16; call on x's device).

    Returns ``(values (M, K/2 + r), metadata (bytes, CUTLASS sm90 layout, K + 2r logical columns),
    scale (M,) fp32)``. ``lora_tail`` (M, r), r a multiple of 8, is ``x2d @ lora_down.T``: each row
    of it, divided by the row's scale, is appended to the row's values as the kept entries 0 and 1
    of r/2 extra groups, the folded LoRA of :func:`lynx_compile.ops.pack_lora`.
    """
    lib = _load()
    assert lib is not None, _lib_error
    x2d = _aligned(x2d)
    M, K = x2d.shape
    rank = 0
    if lora_tail is not None:
        lora_tail = _aligned(lora_tail)
        rank = lora_tail.shape[1]
        assert lora_tail.shape[0] == M and lora_tail.dtype == x2d.dtype and rank % 8 == 0, tuple(lora_tail.shape)
    values = torch.empty((M, K // 2 + rank), dtype=x2d.dtype, device=x2d.device)
    meta = torch.empty((metadata_bytes(M, K + 2 * rank),), dtype=torch.uint8, device=x2d.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x2d.device)
    if M > 0:
        stream = torch.cuda.current_stream(x2d.device).cuda_stream if stream is None else stream
        rc = lib.lynx_sparsify_2to4(int(x2d.dtype == torch.bfloat16), x2d.data_ptr(), K, M, K, values.data_ptr(),
                                    meta.data_ptr(), scale.data_ptr(), int(norm_compensation), float(eps),
                                    int(_swap_nibbles), lora_tail.data_ptr() if rank else None, rank, stream)
        _check(rc, "sparsify")
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
                         layer_k: int | None = None, stream: int | None = None) -> Tensor:
    """``scale[:, None] * (A~ @ weight.T) + bias`` from the compressed activation; (M, N) output.

    Call with the tensors' device current (``sparse_linear_cuda`` does). ``config`` = (index, swizzle, raster)
    overrides the per-shape heuristic (see :func:`choose_config`), which otherwise picks for ``layer_k`` input
    features (default: all K; a folded LoRA's extra columns run on the layer's own configuration);
    ``stream`` (a ``cudaStream_t``) the current stream.
    """
    lib = _load()
    assert lib is not None, _lib_error
    M, K = values.shape[0], values.shape[1] * 2
    N = weight.shape[0]
    assert weight.shape[1] == K, f"weight {tuple(weight.shape)} does not match {K} logical input columns"
    dev = values.device.index if values.device.index is not None else torch.cuda.current_device()
    if out is None:
        out = torch.empty((M, N), dtype=values.dtype, device=values.device)
    if M == 0 or N == 0:
        return out
    weight = _aligned(weight)
    if bias is not None:
        bias = _aligned(bias if bias.dtype == values.dtype else bias.to(values.dtype))
    sms = _sm_count(dev)
    if config is None:
        cfg, swz, ras, ws_bytes = _gemm_plan(values.dtype, M, N, K, layer_k or K, dev)
    else:
        cfg, swz, ras = config
        ws_bytes = int(lib.lynx_sparse_gemm_workspace(cfg, M, N, K, sms))
    ws = _workspace(dev, ws_bytes)
    if stream is None:
        stream = torch.cuda.current_stream(values.device).cuda_stream
    rc = lib.lynx_sparse_gemm(cfg, values.data_ptr(), meta.data_ptr(), weight.data_ptr(),
                              scale.data_ptr() if scale is not None else None,
                              bias.data_ptr() if bias is not None else None, out.data_ptr(), M, N, K, swz, ras, dev, sms,
                              int(_PDL), ws.data_ptr() if ws is not None else None, ws.numel() if ws is not None else 0, stream)
    _check(rc, "sparse GEMM")
    return out


_runtime_reasons: dict[tuple, str | None] = {}


def _runtime_reason(x: Tensor, weight: Tensor, n: int, m: int, others: tuple[Tensor | None, ...],
                    check_args: Callable[[], None]) -> str | None:
    """Why the kernel can't take this call (None: it can), after ``check_args`` raised on bad arguments.

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
            reason = unsupported_reason(x.device, x.dtype, x.shape[-1], weight.shape[0], n, m)
        _runtime_reasons[key] = reason
    return _runtime_reasons[key]


_warned: set[tuple[str, str]] = set()


def _reference_fallback(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"lynx::{op}: using the reference implementation ({reason})", stacklevel=3)


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, norm_compensation: bool, eps: float,
            lora_down: Tensor | None) -> Tensor:
    """Sparsify x (appending ``x @ lora_down.T`` when given) and run the one sparse GEMM against ``weight``."""
    lead = x.shape[:-1]
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    # The library launches on the calling thread's current device; switch only when it differs.
    on_device = contextlib.nullcontext() if x.device.index == torch.cuda.current_device() else torch.cuda.device(x.device)
    with on_device:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        lora_tail = x2 @ lora_down.t() if lora_down is not None else None
        values, meta, scale = compress_2to4(x2, norm_compensation, eps, lora_tail=lora_tail, stream=stream)
        sparse_mm_compressed(values, meta, scale, weight, bias, out=out, layer_k=K, stream=stream)
    return out.reshape(*lead, N)


def sparse_linear_cuda(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, m: int, norm_compensation: bool,
                       eps: float = ops.NORM_EPS, lora_down: Tensor | None = None,
                       lora_up: Tensor | None = None) -> Tensor:
    """CUDA implementation of ``lynx::sparse_linear``; falls back to the reference when the kernel can't take it.

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
    """CUDA implementation of ``lynx::sparse_linear_lora``: the down-projection, then one sparsify pass that
    appends it to the compressed tokens, then one sparse GEMM over K + 2r columns."""
    reason = _runtime_reason(x, weight_lora, n, m, (bias, lora_down),
                             lambda: ops.check_linear_lora(x, weight_lora, bias, n, m, lora_down))
    if reason is not None or lora_down.shape[0] % 8 != 0:
        _reference_fallback("sparse_linear_lora", reason or f"LoRA rank {lora_down.shape[0]} not a multiple of 8 (use ops.pack_lora)")
        return ops.sparse_linear_lora(x, weight_lora, bias, n, m, norm_compensation, eps, lora_down)
    return _launch(x, weight_lora, bias, norm_compensation, eps, lora_down)


def _plan_for_torch_ops(is_bf16: bool, M: int, N: int, K: int, layer_k: int, dev: int) -> tuple[int, int, int, int]:
    return _gemm_plan(torch.bfloat16 if is_bf16 else torch.float16, M, N, K, layer_k, dev)


_python_kernels: torch.library.Library | None = None


def _register_python_kernels() -> None:
    global _python_kernels
    kernels = torch.library.Library("lynx", "IMPL")
    kernels.impl("sparse_linear", sparse_linear_cuda, "CUDA")
    kernels.impl("sparse_linear_lora", sparse_linear_lora_cuda, "CUDA")
    _python_kernels = kernels


try:
    if _cuda_ok():
        _register_python_kernels()
except Exception as _exc:  # noqa: BLE001 - importing must never fail
    warnings.warn(f"lynx_compile.kernels: CUDA implementation not registered: {_exc}", stacklevel=1)


if __name__ == "__main__":
    print(build())
