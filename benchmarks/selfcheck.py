"""Quick GPU self-check of the lynx kernels (metadata nibble order, one GEMM per config), prints errors."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lynx_compile import kernels, ops  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402

assert kernels.load(), kernels.load_error()
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    M, K, N = 300, 1152, 520
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    kept, s = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    ref = (kept.double() @ w.double().t()) * s.double() + b.double()
    v, e, sc = kernels.compress_2to4(x, True)
    # A metadata byte holds the codes of two groups, the lower group's in the low nibble: swapped, the errors must grow.
    for swap, meta in ((0, e), (1, ((e & 0xF) << 4) | (e >> 4))):
        for name, idx in kernels.gemm_configs().items():
            if name.startswith("bf16" if dtype == torch.bfloat16 else "fp16"):
                y = kernels.sparse_mm_compressed(v, meta, sc, w, b, config=(idx, 1, 0))
                err = relative_error(y, ref)
                print(f"{dtype} swap={swap} {name}: rel err {err:.3e}", flush=True)
    torch.cuda.synchronize()
print("selfcheck done")
