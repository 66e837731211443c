"""Runs the dense GEMM, the lynx sparsify kernel and the lynx sparse GEMM a few times for one shape (for ncu).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight python benchmarks/profile_one.py 4096 12288 4096
    LYNX_GEMM_CONFIG=e4m3_bf16_128x128x256_c1x2_pp:1:1 ncu ... python benchmarks/profile_one.py 4096 1152 3456 --fp8

bf16: cuBLAS ``F.linear``, then the bf16 sparsify and sparse GEMM. ``--fp8``: the rowwise ``_scaled_mm`` of FP8 dense
on pre-quantized operands, then the e4m3 sparsify and sparse GEMM. The sparse GEMM runs the library's plan, which
``LYNX_GEMM_CONFIG=<config>[:swizzle[:raster]]`` forces to one compiled configuration.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lynx_compile import kernels, ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("M", type=int)
    ap.add_argument("K", type=int)
    ap.add_argument("N", type=int)
    ap.add_argument("--fp8", action="store_true", help="FP8 dense and the e4m3 kernels instead of bf16")
    args = ap.parse_args()
    assert kernels.load(), kernels.load_error()
    x = torch.randn(args.M, args.K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(args.N, args.K, device="cuda") / math.sqrt(args.K)).to(torch.bfloat16)
    b = torch.randn(args.N, device="cuda", dtype=torch.bfloat16)
    if args.fp8:
        w8, w8_scale = ops.quantize_weight_e4m3(w)
        x8, x8_scale = ops.quantize_e4m3(x, x.abs().amax(dim=-1, keepdim=True).float())

        def dense():
            torch._scaled_mm(x8, w8.t(), scale_a=x8_scale, scale_b=w8_scale.reshape(1, -1), bias=b,
                             out_dtype=torch.bfloat16, use_fast_accum=True)

        def sparse():
            values, meta, scale = kernels.compress_2to4(x, True, e4m3=True)
            kernels.sparse_mm_compressed(values, meta, scale, w8, b, col_scale=w8_scale, out_dtype=torch.bfloat16)
    else:
        def dense():
            F.linear(x, w, b)

        def sparse():
            values, meta, scale = kernels.compress_2to4(x, True)
            kernels.sparse_mm_compressed(values, meta, scale, w, b)
    for it in range(4):
        if it == 3:  # profile only the last round: ncu --profile-from-start off
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        dense()
        sparse()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
