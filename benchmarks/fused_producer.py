"""Producer + linear as Inductor compiles it: lynx (producer fused into the sparsify step) against Inductor + cuBLAS.

    python benchmarks/fused_producer.py                # the 13 large shapes of gemm.py
    python benchmarks/fused_producer.py 4096x1152x3456 # M x K x N shapes

Two producers, as in a DiT block: adaLN's ``LayerNorm(x) * (1 + scale) + shift`` (per-sample scale and shift)
before the attention/MLP up-projections, and ``GELU(tanh)`` before the MLP down-projection. Each layer is compiled
three ways on one input: ``inductor`` (torch.compile, cuBLAS GEMM), ``lynx`` (backend="lynx": the producer runs
inside the sparsify step, ``fuse_producers=True``) and ``lynx-separate`` (``fuse_producers=False``: Inductor's
producer kernel, then the separate sparsify pass). ``speed_guard`` is off, so every shape runs sparse. Times are medians of
``triton.testing.do_bench`` over CUDA-graph replays, in one process. Writes
``benchmarks/results/fused-producer-<gpu>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemm import LARGE, bench_graph  # noqa: E402  (the kernel benchmark's shapes and timing)

from lynx_compile import LynxConfig, backend  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.tools.results import environment, slug, write_json  # noqa: E402

SAMPLES = 2  # images per batch: the per-sample modulation rows


class ModulatedLinear(torch.nn.Module):
    """adaLN: ``LayerNorm(x) * (1 + scale) + shift``, then the linear."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(k, elementwise_affine=False, eps=1e-6)
        self.linear = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class GeluLinear(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.linear = torch.nn.Linear(k, n)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(F.gelu(h, approximate="tanh"))


def compiled_layer(kind: str, module: torch.nn.Module):
    """``module`` compiled by ``inductor``, ``lynx`` (fused producer) or ``lynx-separate``."""
    if kind == "inductor":
        return torch.compile(module)
    # include: a lone linear reads as the model's final layer (or its embedder), which lynx keeps dense by role.
    config = LynxConfig(include="linear", speed_guard=False, fuse_producers=(kind == "lynx"))
    return torch.compile(module, backend=backend(config))


def measure(shapes: list[tuple[int, int, int]], dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    rows = []
    for M, K, N in shapes:
        gen = torch.Generator(device="cuda").manual_seed(M + K + N)
        layers = {
            "layernorm_modulate": (ModulatedLinear(K, N), (
                torch.randn(SAMPLES, M // SAMPLES, K, device="cuda", dtype=dtype, generator=gen),
                0.5 * torch.randn(SAMPLES, K, device="cuda", dtype=dtype, generator=gen),
                0.5 * torch.randn(SAMPLES, K, device="cuda", dtype=dtype, generator=gen))),
            "gelu": (GeluLinear(K, N), (torch.randn(M, K, device="cuda", dtype=dtype, generator=gen),)),
        }
        for producer, (module, args) in layers.items():
            module = module.to("cuda", dtype).eval()
            row = {"producer": producer, "M": M, "K": K, "N": N}
            outputs = {}
            for kind in ("inductor", "lynx", "lynx-separate"):
                torch._dynamo.reset()
                fn = compiled_layer(kind, module)
                with torch.no_grad():
                    outputs[kind] = fn(*args).float()
                    row[f"{kind}_ms"] = bench_graph(lambda fn=fn, args=args: fn(*args))
            for kind in ("lynx", "lynx-separate"):
                row[f"{kind}_rel_error"] = relative_error(outputs[kind], outputs["inductor"])
            if row["lynx_rel_error"] < 1e-3:
                raise RuntimeError(f"{producer} {M}x{K}->{N}: lynx ran dense (its output is the dense one)")
            # Fused and separate compute one function; they differ by rounding and by near-tie selections.
            row["fused_vs_separate"] = relative_error(outputs["lynx"], outputs["lynx-separate"])
            row["speedup"] = row["inductor_ms"] / row["lynx_ms"]
            row["speedup_separate"] = row["inductor_ms"] / row["lynx-separate_ms"]
            rows.append(row)
            print(f"{producer:>18} {M}x{K}->{N}: inductor {row['inductor_ms']:.4f} ms, lynx {row['lynx_ms']:.4f} "
                  f"({row['speedup']:.2f}x), separate {row['lynx-separate_ms']:.4f} ({row['speedup_separate']:.2f}x)",
                  file=sys.stderr, flush=True)
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def record_in_gemm_results(path: Path, fused_e2e: float, env: dict) -> None:
    """The kernel figure of record sits beside the GEMM's in ``gemm-<gpu>.json``, with the run it comes from."""
    if not path.exists():
        print(f"{path} not found: fused_e2e kept in the fused-producer file only", file=sys.stderr)
        return
    gemm = json.loads(path.read_text())
    gemm["geomean_speedup_large"]["fused_e2e"] = fused_e2e
    gemm["fused_e2e_run"] = {"script": "benchmarks/fused_producer.py", **env}
    write_json(gemm, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", help="M x K x N shapes (default: the 13 large shapes of gemm.py)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] or LARGE
    rows = measure(shapes)
    summary = {producer: {"fused_e2e": geomean([r["speedup"] for r in rows if r["producer"] == producer]),
                          "separate_e2e": geomean([r["speedup_separate"] for r in rows if r["producer"] == producer])}
               for producer in ("layernorm_modulate", "gelu")}
    summary["all"] = {"fused_e2e": geomean([r["speedup"] for r in rows]),
                      "separate_e2e": geomean([r["speedup_separate"] for r in rows])}
    env = environment("cuda")
    payload = {**env, "dtype": "bfloat16", "timing": "triton do_bench median over CUDA-graph replays",
               "geomean_speedup": summary, "rows": rows}
    write_json(payload, Path(args.out) / f"fused-producer-{slug(env['device'])}.json")
    record_in_gemm_results(Path(args.out) / f"gemm-{slug(env['device'])}.json", summary["all"]["fused_e2e"], env)
    print(tabulate([(r["producer"], f"{r['M']}x{r['K']}->{r['N']}", r["inductor_ms"], r["lynx_ms"], r["lynx-separate_ms"],
                     f"{r['speedup']:.2f}x", f"{r['speedup_separate']:.2f}x", f"{r['lynx_rel_error']:.3f}") for r in rows],
                   headers=("producer", "shape", "inductor ms", "lynx ms", "separate ms", "lynx x", "separate x", "err vs dense"),
                   floatfmt=".4f"))
    for name, s in summary.items():
        print(f"geomean over inductor, {name}: fused {s['fused_e2e']:.3f}x, separate {s['separate_e2e']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
