"""Runs cuBLAS dense, the lynx sparsify kernel and the lynx sparse GEMM a few times for one shape (for ncu).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight python benchmarks/profile_one.py 4096 12288 4096
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lynx_compile import kernels  # noqa: E402

assert kernels.load(), kernels.load_error()
M, K, N = (int(v) for v in sys.argv[1:4])
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16)
b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
for it in range(4):
    if it == 3:  # profile only the last round: ncu --profile-from-start off
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    F.linear(x, w, b)
    v, e, s = kernels.compress_2to4(x, True)
    kernels.sparse_mm_compressed(v, e, s, w, b)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
