"""When a layer the CUDA kernels could take would still run slower sparse than dense (``LynxConfig.speed_guard``)."""

from __future__ import annotations

SLOWER_BELOW_OUT_FEATURES = 2048


def slower_than_dense(out_features: int) -> str | None:
    """Why sparse would lose to cuBLAS on this layer, from the kept benchmark results.

    With few output features the sparse GEMM saves less than the sparsify step costs. Separate
    sparsify pass (``gemm-nvidia-h100-80gb-hbm3.json``): 0.77x, 0.82x and 0.89x of cuBLAS end to
    end at N = 1152, against 1.08-1.45x from N = 3456 up (M >= 4096; 0.71x at M = 512). With the
    producer fused into the sparsify step (``fused-producer-nvidia-h200.json``, producer + linear
    against Inductor): 0.83-1.04x at N = 1152, against 1.12-1.48x from N = 3072 up.
    """
    if out_features < SLOWER_BELOW_OUT_FEATURES:
        return (f"out_features {out_features} < {SLOWER_BELOW_OUT_FEATURES}: sparse measured slower than dense "
                "there (0.77-0.89x of cuBLAS on H100; 0.83-1.04x with the producer fused, H200)")
    return None
