from pathlib import Path

import pytest
import torch

from lynx_compile.calibrate import relative_error  # noqa: F401  (the tests' one error measure)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def sparse_kernels_or_skip():
    """``lynx_compile.kernels``, or a skip where its CUDA kernels cannot run (no GPU, not sm_90,
    or the library did not build)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from lynx_compile import kernels

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    if not kernels.available():
        pytest.skip(f"CUDA kernels unavailable: {kernels._lib_error}")
    return kernels


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def masked_reference(x: torch.Tensor, n: int, m: int, norm: bool, eps: float = 1e-12) -> torch.Tensor:
    """s * x~ computed independently of lynx_compile.ops: stable argsort instead of pairwise ranks."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    order = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    kept = (groups * keep).reshape(x.shape)
    if not norm:
        return kept
    x32, k32 = x.double(), kept.double()
    scale = (x32.pow(2).sum(-1, keepdim=True) / (k32.pow(2).sum(-1, keepdim=True) + eps)).sqrt()
    return (k32 * scale).to(x.dtype)

