"""``lynx-bench``: one model under several torch.compile backends, side by side.

Each backend is compiled from a fresh Dynamo state and timed on the same inputs: steady-state
forward latency (median after warm-up; CUDA events on GPU), compile time (first call), peak GPU
memory, output error against eager, optionally the share of time in linear layers (profiler) and
a full sampling loop. A backend that fails shows as a failed row; the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .backend import LynxBackend
from .calibrate import calibrate, relative_error
from .config import LynxConfig
from .progress import progress
from .results import device_slug, environment, write_json
from .workloads import (
    Workload,
    WorkloadError,
    add_config_arguments,
    add_workload_arguments,
    config_from_args,
    finish_workload_arguments,
    load_workload,
)

BACKENDS = ("eager", "inductor", "inductor-reduce-overhead", "inductor-max-autotune", "lynx-none", "lynx-norm", "lynx-lora", "lynx-norm-reduce-overhead", "lynx-lora-reduce-overhead", "torchao-24-weight")
DEFAULT_BACKENDS = ("eager", "inductor", "lynx-norm")
_LINEAR_KERNELS = ("addmm", "aten::mm", "linear", "lynx::", "gemm", "cutlass", "sm90")


@dataclass
class Row:
    backend: str
    status: str = "ok"
    latency_ms: float | None = None
    compile_s: float | None = None
    peak_mem_gib: float | None = None
    rel_error: float | None = None
    linear_time_share: float | None = None
    sampling_s: float | None = None
    sparse_layers: str | None = None
    error: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median latency of ``fn`` in ms after ``warmup`` calls: CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _linear_share(fn: Callable[[], Any], device: torch.device) -> float | None:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type == (torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU)]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    linear = sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in _LINEAR_KERNELS))
    return linear / total if total else None


_lora_states: dict[tuple[int, LynxConfig], tuple[Workload, Any]] = {}


def _lora_state(workload: Workload, config: LynxConfig) -> Any:
    """LoRA factors calibrated on the benchmark's own input: enough to time the LoRA path (its
    error column is then optimistic; benchmarks/quality.py measures quality on held-out data).
    Calibrated once per workload and config: every lynx-lora row shares them."""
    key = (id(workload), config)  # the entry holds the workload, so its id stays its own
    if key not in _lora_states:
        # The bench ranks no layers, so the whole-model sensitivity pass would be wasted forwards.
        _lora_states[key] = workload, calibrate(workload.model, [(workload.args, workload.kwargs)], config, model_batches=0)
    return _lora_states[key][1]


def _compiler(backend: str, config: LynxConfig, workload: Workload) -> tuple[Callable, LynxBackend | None]:
    """(model callable, lynx backend object if any) for one backend name."""
    model = workload.model
    if backend == "eager":
        return model, None
    if backend == "inductor":
        return torch.compile(model), None
    if backend == "inductor-reduce-overhead":
        return torch.compile(model, mode="reduce-overhead"), None
    if backend == "inductor-max-autotune":
        return torch.compile(model, mode="max-autotune-no-cudagraphs"), None
    if backend == "torchao-24-weight":
        from torchao.sparsity import semi_sparse_weight, sparsify_  # optional dependency

        pruned = copy.deepcopy(model)
        sparsify_(pruned, semi_sparse_weight())
        return torch.compile(pruned), None
    if backend.startswith("lynx-"):
        _, compensation, *mode = backend.split("-", 2)
        if compensation == "lora":
            lynx_config = replace(config, compensation="lora", compensation_state=_lora_state(workload, config))
        else:
            lynx_config = replace(config, compensation=compensation)
        lynx = LynxBackend(lynx_config)
        return torch.compile(model, backend=lynx, mode=mode[0] if mode else None), lynx
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def run_backend(name: str, workload: Workload, reference: torch.Tensor | None, config: LynxConfig, args: argparse.Namespace) -> Row:
    row = Row(name)
    device = torch.device(args.device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.no_grad():
            fn, lynx = _compiler(name, config, workload)
            t0 = time.perf_counter()
            out = workload(fn).clone()  # CUDA-graph backends overwrite their outputs on the next run
            synchronize(device)
            row.compile_s = time.perf_counter() - t0
            row.latency_ms = median_ms(lambda: workload(fn), device, args.warmup, args.repeat)
            if device.type == "cuda":
                row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if reference is not None:
                row.rel_error = relative_error(out, reference)
            if args.profile:
                row.linear_time_share = _linear_share(lambda: workload(fn), device)
            if args.steps:
                row.sampling_s = _sampling_loop(fn, workload, args.steps, device)
            if lynx is not None:
                row.sparse_layers = f"{len(lynx.report.sparse)}/{len(lynx.report.layers)}"
    except Exception as err:  # one failing backend must not abort the comparison
        row.status = "failed"
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        if args.verbose:
            traceback.print_exc()
    return row


def _sampling_loop(fn: Callable, workload: Workload, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` denoising steps: each step feeds the output back as the latent."""
    args = list(workload.args)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args, **workload.kwargs)
        if args and out.shape[:1] == args[0].shape[:1] and out.shape[1:] != args[0].shape[1:]:
            out = out[:, : args[0].shape[1]]  # learned-sigma models return mean and variance
        if args and out.shape == args[0].shape:
            args[0] = args[0] - out / steps
    synchronize(device)
    return time.perf_counter() - t0


def table(rows: list[Row]) -> str:
    base = next((r.latency_ms for r in rows if r.backend == "inductor" and r.latency_ms), None)
    fmt = lambda v, f: "-" if v is None else format(v, f)
    out = []
    for r in rows:
        speedup = f"{base / r.latency_ms:.2f}x" if base and r.latency_ms else "-"
        out.append((r.backend, r.status if r.status == "ok" else f"FAILED: {r.error}", fmt(r.latency_ms, ".2f"), speedup,
                    fmt(r.compile_s, ".1f"), fmt(r.peak_mem_gib, ".2f"), fmt(r.rel_error, ".2e"),
                    fmt(r.linear_time_share, ".0%"), fmt(r.sampling_s, ".2f"), r.sparse_layers or "-"))
    headers = ("backend", "status", "latency ms", "vs inductor", "compile s", "peak GiB", "rel err vs eager",
               "linear share", "sampling s", "sparse layers")
    return tabulate(out, headers=headers)


def bar_chart(rows: list[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.latency_ms]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(ok) + 1.5))
    ax.barh([r.backend for r in ok], [r.latency_ms for r in ok], color=["tab:orange" if r.backend.startswith("lynx") else "tab:gray" for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("forward latency (ms, median)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lynx-bench", description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, default_model="dit-xl-2")
    add_config_arguments(parser)
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help=f"comma-separated, from {', '.join(BACKENDS)}, or 'all'")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--steps", type=int, default=0, help="also time a sampling loop of this many steps")
    parser.add_argument("--profile", action="store_true", help="measure the share of time in linear layers")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG results")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends")
    args = parser.parse_args(argv)
    finish_workload_arguments(args)
    if not str(args.device).startswith("cuda") and not args.quick and args.model.startswith(("dit-xl", "pixart", "flux")):
        print(f"lynx-bench: no GPU, so {args.model} runs with --quick settings", file=sys.stderr)
        args.quick = True
    backends = BACKENDS if args.backends == "all" else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    try:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise WorkloadError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
        config = config_from_args(args)
        workload = load_workload(args)
    except ValueError as err:
        print(f"lynx-bench: error: {err}", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    with torch.no_grad():
        reference = workload()
    print(f"{workload.name} ({workload.shape}, {args.dtype}, {device}) with {config}", file=sys.stderr)
    rows = [run_backend(name, workload, reference, config, args) for name in progress(backends, sys.stderr.isatty(), desc="backends", unit="backend", file=sys.stderr)]
    print(table(rows))
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = environment(device)
        stem = f"bench-{workload.name.replace(':', '_')}-{'quick-' if args.quick else ''}{device_slug(device)}"
        payload = {"model": workload.name, "shape": workload.shape, "dtype": args.dtype, "quick": args.quick,
                   "config": repr(config), **env, "rows": [asdict(r) for r in rows]}
        write_json(payload, out / f"{stem}.json")
        charted = bar_chart(rows, out / f"{stem}.png", f"{workload.name} ({workload.shape}) on {payload['device']}")
        print(f"wrote {out / (stem + '.json')}" + (f" and {stem}.png" if charted else ""), file=sys.stderr)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
