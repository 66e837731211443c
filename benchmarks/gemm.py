"""Benchmark of the lynx 2:4 activation-sparse linear against cuBLAS dense and cuSPARSELt (H100/H200), in 16-bit and
in FP8 (e4m3 with per-token and per-channel scales) against FP8 dense (``torch._scaled_mm``) and cuSPARSELt FP8.

    python benchmarks/gemm.py                 # the standard shapes
    python benchmarks/gemm.py 4096x1152x3456  # extra shapes, M x K x N (M x K -> N)
    python benchmarks/gemm.py --tune          # also sweep every GEMM configuration per shape (--tune fp8: e4m3 only)
    python benchmarks/gemm.py --lora-rank 32  # rank of the folded-LoRA columns (default 64; 0 skips them)

All times are medians (ms) of ``triton.testing.do_bench`` over CUDA-graph replays (pure GPU time), in
one process. Writes ``benchmarks/results/gemm-<gpu>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lynx_compile import kernels, ops  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.tools.results import slug, write_json  # noqa: E402

SHAPES = [  # (M, K, N)
    (4096, 1152, 3456), (4096, 1152, 1152), (4096, 1152, 4608), (4096, 4608, 1152),
    (8192, 1152, 4608), (8192, 4608, 1152),
    (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504), (4608, 15360, 3072),
    (4096, 3072, 4096), (4096, 12288, 4096),
    (512, 1152, 4608),
]
LARGE = SHAPES[:13]


def bench_graph(fn, warmup: int = 3, min_graph_ms: float = 0.5, rep: int = 150) -> float:
    """Median ms per call of fn(), from CUDA-graph replays (several calls per graph for short kernels,
    so that the replay's launch cost does not hide the GPU time)."""
    from triton.testing import do_bench

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    one = do_bench(g.replay, warmup=10, rep=50, return_mode="median")
    reps = max(1, min(64, math.ceil(min_graph_ms / max(one, 1e-3))))
    if reps > 1:
        del g
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
    ms = do_bench(g.replay, warmup=25, rep=rep, return_mode="median") / reps
    del g
    return ms


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def sparsify_bandwidth(dtype) -> tuple[float, float]:
    """(GB/s moved, ms) by the sparsify kernel on a tensor far larger than L2."""
    M, K = 65536, 4608
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ms = bench_graph(lambda: kernels.compress_2to4(x, True))
    nbytes = M * K * 2 + M * K + kernels.metadata_bytes(M, K) + M * 4
    return nbytes / ms / 1e6, ms


def run_shape(M, K, N, dtype, tune: str | None, lora_rank: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    row: dict = {"M": M, "K": K, "N": N, "dtype": str(dtype).replace("torch.", "")}

    row["dense_ms"] = bench_graph(lambda: F.linear(x, w, b))

    # cuSPARSELt GEMM only: A = 2:4-pruned x, pre-compressed.
    try:
        kept, _ = ops.sparsify_reference(x, 2, 4, False, ops.NORM_EPS)
        xc = torch._cslt_compress(kept)
        wt = w.t()
        torch._cslt_sparse_mm(xc, wt)
        row["cslt_ms"] = bench_graph(lambda: torch._cslt_sparse_mm(xc, wt))
    except Exception as exc:  # noqa: BLE001
        row["cslt_ms"] = None
        row["cslt_error"] = f"{type(exc).__name__}: {exc}"[:200]

    values, meta, scale = kernels.compress_2to4(x, True)
    out = torch.empty(M, N, device="cuda", dtype=dtype)
    row["sparsify_ms"] = bench_graph(lambda: kernels.compress_2to4(x, True))
    cfg = kernels.choose_config(dtype, M, N, K)
    row["config"] = [{v: k for k, v in kernels.gemm_configs().items()}[cfg[0]], cfg[1], cfg[2]]
    row["gemm_ms"] = bench_graph(lambda: kernels.sparse_mm_compressed(values, meta, scale, w, b, out=out))
    row["e2e_ms"] = bench_graph(lambda: torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True))

    y = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)
    kept, s = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    ref = (kept.float() @ w.float().t()) * s + b.float()
    row["rel_err"] = relative_error(y, ref)
    row["nonfinite"] = int((~torch.isfinite(y)).sum().item())

    if lora_rank:
        # The LoRA term folded into the same sparse GEMM (what the backend runs), against the
        # same term as two extra GEMMs and an add beside the sparse op.
        down = (torch.randn(lora_rank, K, device="cuda") / math.sqrt(K)).to(dtype)
        up = (torch.randn(N, lora_rank, device="cuda") / math.sqrt(lora_rank)).to(dtype)
        weight_lora, down_padded = ops.pack_lora(w, down, up)
        row["lora_rank"] = lora_rank

        def folded():
            return torch.ops.lynx.sparse_linear_lora(x, weight_lora, b, 2, 4, True, ops.NORM_EPS, down_padded)

        row["lora_e2e_ms"] = bench_graph(folded)
        # Its parts: the down-projection (re-reads x) and the GEMM over K + 2r columns.
        row["lora_down_ms"] = bench_graph(lambda: x @ down_padded.t())
        values_lora, meta_lora, scale_lora = kernels.compress_2to4(x, True, lora_tail=x @ down_padded.t())
        row["lora_gemm_ms"] = bench_graph(lambda: kernels.sparse_mm_compressed(values_lora, meta_lora, scale_lora,
                                                                               weight_lora, b, out=out, layer_k=K))
        row["lora_unfolded_ms"] = bench_graph(lambda: torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True) + (x @ down.t()) @ up.t())
        row["lora_rel_err"] = relative_error(folded(), ref + (x.float() @ down.float().t()) @ up.float().t())
        del down, up, weight_lora, down_padded, values_lora, meta_lora, scale_lora

    fp8_operands = run_fp8(row, x, w, b, out)
    prefix = "bf16_" if dtype == torch.bfloat16 else "fp16_"
    if tune in ("all", "16bit"):
        row["tune"], row["tune_best"] = tune_configs(prefix, lambda config: kernels.sparse_mm_compressed(
            values, meta, scale, w, b, out=out, config=config))
    if tune in ("all", "fp8"):
        values8, meta8, scale8, w8, w8_scale = fp8_operands
        row["fp8_tune"], row["fp8_tune_best"] = tune_configs(f"e4m3_{prefix}", lambda config: kernels.sparse_mm_compressed(
            values8, meta8, scale8, w8, b, out=out, config=config, col_scale=w8_scale))
    return row


def run_fp8(row: dict, x, w, b, out) -> tuple:
    """FP8 rows: FP8 dense as users run it (per-token quantization compiled by Inductor + rowwise ``_scaled_mm``,
    fast accumulation) and its GEMM alone; cuSPARSELt FP8 2:4 (GEMM alone); lynx e4m3 sparsify, GEMM and the op.
    Returns the lynx e4m3 GEMM's operands (for tuning)."""
    w8, w8_scale = ops.quantize_weight_e4m3(w)
    torch._dynamo.reset()  # one compiled graph per shape, past Dynamo's recompile limit
    fp8_dense = torch.compile(ops.e4m3_linear, fullgraph=True, dynamic=False)
    row["fp8_dense_ms"] = bench_graph(lambda: fp8_dense(x, w8, w8_scale, b))
    x8, x8_scale = ops.quantize_e4m3(x, x.abs().amax(dim=-1, keepdim=True).float())
    row["fp8_gemm_ms"] = bench_graph(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x8_scale, scale_b=w8_scale.reshape(1, -1),
                                                              bias=b, out_dtype=x.dtype, use_fast_accum=True))
    try:
        kept, _ = ops.sparsify_reference(x, 2, 4, False, ops.NORM_EPS)
        kept8 = ops.quantize_e4m3(kept, kept.abs().amax(dim=-1, keepdim=True).float())[0]
        xc8, w8t = torch._cslt_compress(kept8), w8.t()
        torch._cslt_sparse_mm(xc8, w8t, out_dtype=x.dtype)
        row["cslt_fp8_ms"] = bench_graph(lambda: torch._cslt_sparse_mm(xc8, w8t, out_dtype=x.dtype))
    except Exception as exc:  # noqa: BLE001
        row["cslt_fp8_ms"] = None
        row["cslt_fp8_error"] = f"{type(exc).__name__}: {exc}"[:200]
    values8, meta8, scale8 = kernels.compress_2to4(x, True, e4m3=True)
    row["fp8_sparsify_ms"] = bench_graph(lambda: kernels.compress_2to4(x, True, e4m3=True))
    cfg = kernels.choose_config(x.dtype, x.shape[0], w.shape[0], x.shape[1], operand=ops.E4M3)
    row["fp8_config"] = [{v: k for k, v in kernels.gemm_configs().items()}[cfg[0]], cfg[1], cfg[2]]
    row["fp8_sparse_gemm_ms"] = bench_graph(lambda: kernels.sparse_mm_compressed(values8, meta8, scale8, w8, b, out=out,
                                                                                 col_scale=w8_scale))
    row["fp8_e2e_ms"] = bench_graph(lambda: torch.ops.lynx.sparse_linear_e4m3(x, w8, w8_scale, b, 2, 4, True, ops.NORM_EPS))
    y = torch.ops.lynx.sparse_linear_e4m3(x, w8, w8_scale, b, 2, 4, True, ops.NORM_EPS)
    ref = ops.sparse_linear_e4m3_reference(x.float(), w8, w8_scale, b, 2, 4, True, ops.NORM_EPS, None)
    row["fp8_rel_err"] = relative_error(y, ref)
    row["fp8_nonfinite"] = int((~torch.isfinite(y)).sum().item())
    return values8, meta8, scale8, w8, w8_scale


def tune_configs(prefix: str, gemm) -> tuple[dict, list]:
    """ms of ``gemm(config)`` for every configuration named ``prefix...`` and swizzle/raster; and the best."""
    res = {}
    for name, idx in kernels.gemm_configs().items():
        if not name.startswith(prefix):
            continue
        for swz in (1, 2, 4, 8):
            for ras in (1, 2):
                try:
                    ms = bench_graph(lambda config=(idx, swz, ras): gemm(config), rep=60)
                except Exception as exc:  # noqa: BLE001
                    ms = float("nan")
                    print(f"  {name} {swz} {ras}: {exc}", file=sys.stderr)
                res[f"{name}:{swz}:{ras}"] = ms
    best = min(res, key=lambda k: res[k] if res[k] == res[k] else 1e9)
    return res, [best, res[best]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="extra shapes MxKxN")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--tune", nargs="?", const="all", choices=["all", "16bit", "fp8"],
                    help="sweep the GEMM configurations per shape: of both GEMM types (default), or of one")
    ap.add_argument("--only-extra", action="store_true", help="run only the shapes given on the command line")
    ap.add_argument("--lora-rank", type=int, default=64, help="rank of the folded LoRA timed per shape (0: skip)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gemm-<gpu>.json)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    assert kernels.load(), f"CUDA kernels unavailable: {kernels.load_error()}"

    extra = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    shapes = extra if args.only_extra else SHAPES + [s for s in extra if s not in SHAPES]
    gpu = torch.cuda.get_device_name()
    rows = []
    for M, K, N in shapes:
        r = run_shape(M, K, N, dtype, args.tune, args.lora_rank)
        torch.cuda.empty_cache()  # the shape's tensors went with run_shape's frame
        rows.append(r)
        print(f"{M}x{K}->{N}: dense {r['dense_ms']:.4f} cslt {r['cslt_ms']} sparsify {r['sparsify_ms']:.4f} "
              f"gemm {r['gemm_ms']:.4f} e2e {r['e2e_ms']:.4f} err {r['rel_err']:.2e}"
              + (f" lora {r['lora_e2e_ms']:.4f} (unfolded {r['lora_unfolded_ms']:.4f})" if args.lora_rank else "")
              + f" | fp8 dense {r['fp8_dense_ms']:.4f} (GEMM {r['fp8_gemm_ms']:.4f}) cslt-fp8 {r['cslt_fp8_ms']} "
              f"lynx-fp8 sparsify {r['fp8_sparsify_ms']:.4f} gemm {r['fp8_sparse_gemm_ms']:.4f} e2e {r['fp8_e2e_ms']:.4f} "
              f"err {r['fp8_rel_err']:.2e}"
              + (f" best {r['tune_best']}" if "tune_best" in r else "")
              + (f" fp8 best {r['fp8_tune_best']}" if "fp8_tune_best" in r else ""), flush=True)

    bw_copy = copy_bandwidth()
    bw_sp, ms_sp = sparsify_bandwidth(dtype)

    from tabulate import tabulate

    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"

    table = []
    for r in rows:
        d = r["dense_ms"]
        table.append([f"{r['M']}x{r['K']}->{r['N']}", f(d), f(r["cslt_ms"]), f(r["sparsify_ms"]), f(r["gemm_ms"]),
                      f(r["e2e_ms"]), f(d / r["cslt_ms"], 2) if r["cslt_ms"] else "-", f(d / r["gemm_ms"], 2),
                      f(d / r["e2e_ms"], 2), f"{r['rel_err']:.1e}", r["config"][0]])
        if args.lora_rank:
            table[-1][-1:-1] = [f(r["lora_e2e_ms"]), f"{100 * (r['lora_e2e_ms'] / r['e2e_ms'] - 1):+.1f}%",
                                f"{100 * (r['lora_unfolded_ms'] / r['e2e_ms'] - 1):+.1f}%"]
    headers = ["M x K -> N", "cuBLAS ms", "cuSPARSELt ms", "sparsify ms", "GEMM ms", "e2e ms", "cslt x", "GEMM x",
               "e2e x", "rel err", "config"]
    if args.lora_rank:
        headers[-1:-1] = [f"e2e+LoRA{args.lora_rank} ms", "LoRA folded", "LoRA unfolded"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    fp8_table = [[f"{r['M']}x{r['K']}->{r['N']}", f(r["fp8_dense_ms"]), f(r["fp8_gemm_ms"]), f(r["cslt_fp8_ms"]),
                  f(r["fp8_sparsify_ms"]), f(r["fp8_sparse_gemm_ms"]), f(r["fp8_e2e_ms"]),
                  f(r["fp8_dense_ms"] / r["fp8_e2e_ms"], 2), f(r["dense_ms"] / r["fp8_e2e_ms"], 2),
                  f(r["cslt_fp8_ms"] / r["fp8_sparse_gemm_ms"], 2) if r["cslt_fp8_ms"] else "-", f"{r['fp8_rel_err']:.1e}",
                  r["fp8_config"][0]] for r in rows]
    print(tabulate(fp8_table, headers=["M x K -> N", "FP8 dense ms", "FP8 GEMM ms", "cuSPARSELt FP8 ms",
                                       "e4m3 sparsify ms", "e4m3 sparse GEMM ms", "lynx-fp8 e2e ms", "over FP8 dense",
                                       "over bf16", "GEMM over cslt FP8", "rel err", "config"], tablefmt="github"))

    def geo(key, base="dense_ms"):
        sel = [r for r in rows if (r["M"], r["K"], r["N"]) in LARGE and r.get(key) and r.get(base)]
        if len(sel) != len(LARGE):
            return None
        return math.exp(sum(math.log(r[base] / r[key]) for r in sel) / len(sel))

    summary = {k: geo(k) for k in ("e2e_ms", "gemm_ms", "cslt_ms")}
    summary |= {
        "fp8_e2e_over_fp8_dense": geo("fp8_e2e_ms", "fp8_dense_ms"),
        "fp8_e2e_over_bf16": geo("fp8_e2e_ms"),
        "fp8_sparse_gemm_over_fp8_gemm": geo("fp8_sparse_gemm_ms", "fp8_gemm_ms"),
        "fp8_dense_over_bf16": geo("fp8_dense_ms"),
        "fp8_gemm_over_bf16": geo("fp8_gemm_ms"),
        "cslt_fp8_over_bf16": geo("cslt_fp8_ms"),
    }
    slower = [f"{r['M']}x{r['K']}->{r['N']}" for r in rows if r["cslt_fp8_ms"] and r["fp8_sparse_gemm_ms"] >= r["cslt_fp8_ms"]]
    summary["fp8_sparse_gemm_not_faster_than_cslt_fp8"] = slower
    if args.lora_rank:
        overheads = [r["lora_e2e_ms"] / r["e2e_ms"] - 1 for r in rows]
        summary["lora_overhead_max"] = max(overheads)
        summary["lora_overhead_geomean"] = math.exp(sum(math.log1p(o) for o in overheads) / len(overheads)) - 1
        print(f"folded LoRA (rank {args.lora_rank}) over lynx e2e: geomean {100 * summary['lora_overhead_geomean']:+.1f}%, "
              f"max {100 * summary['lora_overhead_max']:+.1f}%")
    print(f"geomean speedup over cuBLAS, 13 large shapes: e2e {f(summary['e2e_ms'], 3)}  GEMM alone "
          f"{f(summary['gemm_ms'], 3)}  cuSPARSELt {f(summary['cslt_ms'], 3)}")
    print("FP8, 13 large shapes: " + ", ".join(f"{k} {f(summary[k], 3)}" for k in (
        "fp8_e2e_over_fp8_dense", "fp8_e2e_over_bf16", "fp8_sparse_gemm_over_fp8_gemm", "fp8_dense_over_bf16",
        "fp8_gemm_over_bf16", "cslt_fp8_over_bf16"))
        + f"; e4m3 sparse GEMM not faster than cuSPARSELt FP8 at {slower or 'no shape'}")
    print(f"copy bandwidth {bw_copy:.0f} GB/s; sparsify (65536x4608) {bw_sp:.0f} GB/s = "
          f"{100 * bw_sp / bw_copy:.1f}% of copy ({ms_sp:.3f} ms)")

    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "timing": "triton.testing.do_bench median over CUDA-graph replay (graphs of several calls for short kernels), "
                  "ms per call",
        "copy_bandwidth_GBps": bw_copy,
        "sparsify_bandwidth_GBps": bw_sp,
        "geomean_speedup_large": summary,
        "rows": rows,
    }
    suffix = "" if args.dtype == "bf16" else f"-{args.dtype}"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"gemm-{slug(gpu)}{suffix}.json"
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
