"""Host time per call of the lynx ops against cuBLAS ``F.linear`` (GPU).

    python benchmarks/host_overhead.py

Without CUDA graphs a DiT forward issues one op per layer, and when the GPU work per op is short
the host's issue rate sets the speed. This times back-to-back calls with a small token count (so
the GPU keeps up and the loop measures the host), for:

* ``F.linear`` (cuBLAS, what Inductor calls for a dense linear);
* ``lynx::sparse_linear`` and ``lynx::sparse_linear_lora`` through the dispatcher (the C++ kernels,
  ``cuda/torch_ops.cpp``, when they are loaded);
* the same work through the Python kernels (``kernels.sparse_linear_cuda`` and friends, called directly);
* a DiT block's adaLN-modulated linear (``LayerNorm(x) * (1 + scale) + shift``, then the linear) compiled as a user
  runs it without CUDA graphs, whole calls including Dynamo's guards: Inductor (its producer kernel, then cuBLAS),
  lynx with its defaults (the producer fused into the sparse layer: one op) and lynx with the separate sparsify pass.

Writes ``benchmarks/results/host-overhead-<gpu>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fused_producer import SAMPLES, ModulatedLinear, compiled_layer  # noqa: E402  (the producer + linear benchmark's layer)

from lynx_compile import kernels, ops  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402


def host_us_per_call(fn, calls: int = 2000, repeats: int = 5) -> float:
    """Median over repeats of the wall time per call of ``calls`` back-to-back calls, excluding the final sync."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def calls(x, w, b, weight_lora, down) -> dict:
    """The timed calls of one shape, by name."""
    eps = ops.NORM_EPS
    return {
        "F.linear": lambda: F.linear(x, w, b),
        "lynx::sparse_linear": lambda: torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True),
        "lynx::sparse_linear, Python kernel": lambda: kernels.sparse_linear_cuda(x, w, b, 2, 4, True),
        "lynx::sparse_linear_lora": lambda: torch.ops.lynx.sparse_linear_lora(x, weight_lora, b, 2, 4, True, eps, down),
        "lynx::sparse_linear_lora, Python kernel":
            lambda: kernels.sparse_linear_lora_cuda(x, weight_lora, b, 2, 4, True, eps, down),
    }


def compiled_layer_calls(M: int, K: int, N: int, dtype: torch.dtype) -> Iterator[tuple[str, Callable]]:
    """(name, call) of the adaLN-modulated linear compiled by each backend, one at a time: the Dynamo reset before
    each compile drops the previous backend's graphs."""
    module = ModulatedLinear(K, N).to("cuda", dtype).eval()
    x = torch.randn(SAMPLES, M // SAMPLES, K, device="cuda", dtype=dtype)
    shift, scale = (0.5 * torch.randn(SAMPLES, K, device="cuda", dtype=dtype) for _ in range(2))
    for kind, name in (("inductor", "Inductor"), ("lynx", "lynx, fused producer"),
                       ("lynx-separate", "lynx, separate sparsify")):
        torch._dynamo.reset()
        fn = compiled_layer(kind, module)
        yield f"compiled LN-modulate + linear, {name}", lambda fn=fn: fn(x, shift, scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="rows of x (small: the GPU must keep up)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/host-overhead-<gpu>.json)")
    args = ap.parse_args()
    assert kernels.load(), f"CUDA kernels unavailable: {kernels.load_error()}"

    dtype, M = torch.bfloat16, args.tokens
    rows = []
    for K, N in ((1152, 3456), (3072, 12288)):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
        b = torch.randn(N, device="cuda", dtype=dtype)
        down = (torch.randn(64, K, device="cuda") / K ** 0.5).to(dtype)
        weight_lora, down = ops.pack_lora(w, down, torch.randn(N, 64, device="cuda").to(dtype) / 8)
        for name, fn in itertools.chain(calls(x, w, b, weight_lora, down).items(),
                                        compiled_layer_calls(M, K, N, dtype)):
            with torch.no_grad():
                us = host_us_per_call(fn)
            rows.append({"M": M, "K": K, "N": N, "call": name, "host_us": us})
            print(f"{M}x{K}->{N} {name}: {us:.1f} us/call", flush=True)

    from tabulate import tabulate

    print(tabulate([[f"{r['M']}x{r['K']}->{r['N']}", r["call"], f"{r['host_us']:.1f}"] for r in rows],
                   headers=["M x K -> N", "call", "host us per call"], tablefmt="github"))
    device = torch.device("cuda")
    result = {**environment(device), "cpp_kernels": kernels.torch_ops_error or "loaded",
              "timing": "median over 5 runs of 2000 back-to-back calls, wall time per call before the final sync",
              "rows": rows}
    default_out = Path(__file__).resolve().parent / "results" / f"host-overhead-{device_slug(device)}.json"
    out = Path(args.out) if args.out else default_out
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
