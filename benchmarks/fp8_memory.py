"""Peak GPU memory and latency of FP8 inference, with and without ``lynx_compile.convert_to_fp8``.

    python benchmarks/fp8_memory.py [--model dit-xl-2] [--quick]

Each row builds the model afresh in bf16 on the GPU (converting it where the row says so), then compiles it with
``mode="reduce-overhead"`` and runs it. ``peak_GiB`` is ``torch.cuda.max_memory_allocated`` from after the build and
conversion through compilation and runs, ``resident_GiB`` what stays allocated after the runs: both count the
model's weights and every copy a compiled graph holds. Rows: Inductor in bf16; FP8 dense (lynx at
``precision="fp8"`` with no sparse layer) and lynx-fp8 (norm compensation), each on the bf16 model (its graph holds
e4m3 copies of the weights) and on the converted model (the e4m3 weights are the model's own). Writes
``benchmarks/results/fp8-memory-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lynx_compile import LynxBackend, LynxConfig, convert_to_fp8, kernels  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402
from lynx_compile.tools.timing import median_ms  # noqa: E402
from lynx_compile.tools.workloads import builtin_workload  # noqa: E402

ROWS = {  # name -> (backend config or None for Inductor, convert the model first)
    "inductor-reduce-overhead (bf16)": (None, False),
    "inductor-fp8-reduce-overhead": (LynxConfig(precision="fp8", sparse_roles=frozenset()), False),
    "inductor-fp8-reduce-overhead, converted": (LynxConfig(precision="fp8", sparse_roles=frozenset()), True),
    "lynx-fp8-reduce-overhead": (LynxConfig(precision="fp8"), False),
    "lynx-fp8-reduce-overhead, converted": (LynxConfig(precision="fp8"), True),
}


def measure(model_name: str, quick: bool, config: LynxConfig | None, convert: bool, reference) -> tuple[dict, torch.Tensor]:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    workload = builtin_workload(model_name, dtype=torch.bfloat16, device="cuda", quick=quick)
    converted = convert_to_fp8(workload.model) if convert else []
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the bf16 build itself is every row's; what follows is the row's own
    backend = "inductor" if config is None else LynxBackend(config, warn=False)
    compiled = torch.compile(workload.model, backend=backend, mode="reduce-overhead")
    device = torch.device("cuda")
    with torch.no_grad():
        out = workload(compiled).clone()
        latency = median_ms(lambda: workload(compiled), device, 3, 10)
    row = {"peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "resident_GiB": torch.cuda.memory_allocated() / 2**30,
           "latency_ms": latency, "converted_layers": len(converted),
           "label": workload.label, "shape": workload.shape}
    row["rel_err_vs_bf16"] = None if reference is None else relative_error(out, reference)
    return row, out  # the model and its compiled graphs go with this frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-xl-2")
    parser.add_argument("--quick", action="store_true", help="the model's small --quick configuration")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fp8-memory-<gpu>.json)")
    args = parser.parse_args()
    assert kernels.load(), f"CUDA kernels unavailable: {kernels.load_error()}"
    rows, reference = {}, None
    for name, (config, convert) in ROWS.items():
        rows[name], out = measure(args.model, args.quick, config, convert, reference)
        reference = out if reference is None else reference
        print(f"{name}: peak {rows[name]['peak_GiB']:.2f} GiB, resident {rows[name]['resident_GiB']:.2f} GiB, "
              f"{rows[name]['latency_ms']:.2f} ms, "
              f"rel err vs bf16 {rows[name]['rel_err_vs_bf16']}", flush=True)
    result = {**environment("cuda"), "model": args.model, "rows": rows,
              "timing": "median ms of 10 forwards after 3 warm-ups, CUDA graphs (reduce-overhead)"}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"fp8-memory-{device_slug('cuda')}.json"
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
