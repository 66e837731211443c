"""Builds the kernel library (``nvcc`` over ``cuda/*.cu``) and the ops' C++ kernels (``cuda/torch_ops.cpp``, with
``torch.utils.cpp_extension``), each cached on disk and built once.

The library is torch-independent: CUTLASS 3.x headers from the ``nvidia-cutlass`` wheel, one target GPU
architecture (``LYNX_COMPUTE_CAPABILITY`` of ``cuda/lynx_api.h``). It is built in parallel ``nvcc`` jobs (a few
minutes, one progress line on stderr), cached under ``$LYNX_COMPILE_CACHE_DIR`` (default ``~/.cache/lynx_compile``)
in ``<source-hash>/``, and written through a temporary directory and an atomic rename under a file lock, so that
processes starting together build it once. ``LYNX_COMPILE_LIB`` points at a prebuilt library instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import abi

LIB_NAME = "liblynx_kernels.so"


def nvcc_flags() -> list[str]:
    capability = abi.header().constants["LYNX_COMPUTE_CAPABILITY"]
    return ["-std=c++17", "-O3", "-DNDEBUG", "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", "-gencode", f"arch=compute_{capability}a,code=sm_{capability}a"]


def cache_root() -> Path:
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
    includes = [base / "include", base / "tools" / "util" / "include"]
    if not (includes[0] / "cute" / "tensor.hpp").exists():
        raise RuntimeError(f"CUTLASS headers not found under {base}")
    return [str(p) for p in includes]


def _nvcc() -> str:
    for candidate in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    found = shutil.which("nvcc")
    if not found:
        raise RuntimeError("nvcc not found (set CUDA_HOME or NVCC)")
    return found


def _sources() -> list[Path]:
    if not abi.SRC_DIR.is_dir():
        raise RuntimeError(f"CUDA sources not found at {abi.SRC_DIR}")
    return sorted(abi.SRC_DIR.glob("*.cu"))


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(p for pattern in ("*.cu", "*.cuh", "*.h", "*.inc") for p in abi.SRC_DIR.glob(pattern)):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(nvcc_flags()).encode())
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
    out_dir = cache_root() / _source_hash()
    target = out_dir / LIB_NAME
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
    includes = [f"-I{p}" for p in _cutlass_includes()] + [f"-I{abi.SRC_DIR}"]
    sources = _sources()
    jobs = max(1, min(len(sources), int(os.environ.get("LYNX_COMPILE_JOBS", os.cpu_count() or 1))))
    if verbose:
        print(f"lynx_compile: building CUDA kernels ({len(sources)} files, {jobs} parallel nvcc jobs; "
              f"a few minutes, once) into {out_dir}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        objects, pending = [], list(sources)
        running: list[tuple[subprocess.Popen, Path, Path]] = []
        failures = []
        while pending or running:
            while pending and len(running) < jobs:
                src = pending.pop(0)
                obj = Path(tmp) / (src.stem + ".o")
                log = Path(tmp) / (src.stem + ".log")
                cmd = [nvcc, *nvcc_flags(), *includes, "-c", str(src), "-o", str(obj)]
                running.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT), src, log))
                objects.append(obj)
            proc, src, log = running.pop(0)
            if proc.wait() != 0:
                failures.append(f"{src.name}:\n{log.read_text()[-4000:]}")
        if failures:
            raise RuntimeError("nvcc failed:\n" + "\n".join(failures))
        tmp_lib = Path(tmp) / LIB_NAME
        cmd = [nvcc, "-shared", "-o", str(tmp_lib), *map(str, objects), "-cudart", "static"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc link failed:\n{res.stdout}{res.stderr}")
        os.replace(tmp_lib, target)  # atomic: readers see no file or the whole library
    if verbose:
        print(f"lynx_compile: CUDA kernels built: {target}", file=sys.stderr, flush=True)


def build_torch_ops():
    """Build (once per torch version and source) and import the ops' C++ kernels; importing registers them.

    The header is part of the directory name: cpp_extension rebuilds on changes of the source it compiles,
    not of the headers that source includes.
    """
    from torch.utils import cpp_extension

    source = abi.SRC_DIR / "torch_ops.cpp"
    digest = hashlib.sha256(source.read_bytes() + (abi.SRC_DIR / abi.HEADER).read_bytes()).hexdigest()[:16]
    build_dir = cache_root() / "torch_ops" / re.sub(r"[^\w.]", "_", f"torch-{torch.__version__}-{digest}")
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print(f"lynx_compile: building the C++ op kernels (about a minute, once per torch version) into {build_dir}",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name="lynx_torch_ops", sources=[str(source)], extra_cflags=["-O2"],
                              extra_ldflags=["-lcublas", "-ldl"], build_directory=str(build_dir), with_cuda=True)
