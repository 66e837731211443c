"""CPU-side checks of lynx_compile.kernels: importing is cheap and safe, and reasons are given."""

from __future__ import annotations

import torch

from lynx_compile import kernels


def test_import_and_available_on_cpu():
    if torch.cuda.is_available():
        return  # covered by tests/test_kernels_cuda.py
    assert kernels.available() is False
    assert kernels._lib is None  # importing/asking never built anything


def test_unsupported_reason_cpu_device():
    r = kernels.unsupported_reason(torch.device("cpu"), torch.bfloat16, 1152, 3456, 2, 4)
    assert isinstance(r, str) and "CUDA" in r


def test_unsupported_reason_cuda_without_gpu():
    if torch.cuda.is_available():
        return
    r = kernels.unsupported_reason(torch.device("cuda"), torch.bfloat16, 1152, 3456, 2, 4)
    assert isinstance(r, str) and r


def test_unsupported_reason_shapes_and_dtypes(monkeypatch):
    # Pretend a CUDA device exists so the shape/dtype checks are reached.
    monkeypatch.setattr(kernels, "_cuda_ok", lambda: True)
    dev = torch.device("cuda")
    assert "float32" in kernels.unsupported_reason(dev, torch.float32, 1152, 3456, 2, 4)
    assert "1000" in kernels.unsupported_reason(dev, torch.bfloat16, 1000, 3456, 2, 4)
    assert "2:4" in kernels.unsupported_reason(dev, torch.bfloat16, 1152, 3456, 1, 4)
    assert "out_features" in kernels.unsupported_reason(dev, torch.float16, 1152, 3457, 2, 4)


def test_metadata_bytes():
    assert kernels.metadata_bytes(1, 64) == 64 * 128 // 8
    assert kernels.metadata_bytes(4096, 1152) == 4096 * 1152 // 8
