"""``lynx-bench``: one model under several torch.compile backends, side by side.

Each backend is compiled from a fresh Dynamo state and timed on the same inputs: steady-state
forward latency (median after warm-up; CUDA events on GPU), compile time (first call), peak GPU
memory, output error against eager, optionally the share of time in linear layers (profiler) and
a full sampling loop (``--steps``; with ``--dense-steps`` or ``--sparse-fraction`` the lynx backends sample under
that step schedule, compiled with a dense twin of each graph). A backend that fails shows as a failed row; the run
goes on.
``--rounds N`` (N > 1) keeps every backend compiled in one Dynamo state, then times them
round-robin for N rounds, so that drift of the machine hits all of them alike: the latency is the
median of the round medians, shown with their range; peak memory is not measured then.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..backend import LynxBackend
from ..calibrate import calibrate
from ..config import LynxConfig
from ..metrics import relative_error
from ..steps import StepSchedule, dense_forward
from . import cli
from .bench_output import Row, bar_chart, table
from .results import device_slug, environment, write_json
from .timing import median_ms, sample_ms, synchronize
from .workloads import Workload

BACKENDS = ("eager", "inductor", "inductor-reduce-overhead", "inductor-max-autotune", "inductor-fp8",
            "inductor-fp8-reduce-overhead", "lynx-none", "lynx-norm", "lynx-lora", "lynx-fp8", "lynx-norm-reduce-overhead",
            "lynx-lora-reduce-overhead", "lynx-fp8-reduce-overhead", "torchao-24-weight")
DEFAULT_BACKENDS = ("eager", "inductor", "lynx-norm")
DEFAULT_MODEL = "dit-xl-2"
BENCH_EXCLUDED_FIELDS = {"compensation": "each lynx-<compensation> backend sets its own",
                         "step_schedule": "--steps with --dense-steps or --sparse-fraction sets it"}
"""LynxConfig fields lynx-bench takes no option for, and why."""
_LINEAR_KERNELS = ("addmm", "aten::mm", "linear", "lynx::", "gemm", "cutlass", "sm90")


def _linear_share(fn: Callable[[], Any], device: torch.device) -> float | None:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    kernel_device = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kernel_device]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    linear = sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in _LINEAR_KERNELS))
    return linear / total if total else None


_lora_states: dict[tuple[int, LynxConfig], tuple[Workload, Any]] = {}


def _lora_state(workload: Workload, config: LynxConfig) -> Any:
    """The config's own LoRA factors (``--compensation-file``), else factors calibrated on the
    benchmark's own input: enough to time the LoRA path (its error column is then optimistic;
    benchmarks/quality.py measures quality on held-out data). Calibrated once per workload and
    config: every lynx-lora row shares them."""
    if config.compensation_state is not None:
        return config.compensation_state
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
    if backend.startswith("inductor-fp8"):
        # FP8 dense as FP8 inference recipes run it (per-token e4m3 activations, per-channel e4m3 weights, rowwise
        # _scaled_mm, quantization fused by Inductor): lynx at precision "fp8" with no layer sparse.
        fp8 = LynxBackend(replace(config, precision="fp8", include=None, sparse_roles=frozenset()), warn=False)
        return torch.compile(model, backend=fp8, mode="reduce-overhead" if backend.endswith("reduce-overhead") else None), None
    if backend == "torchao-24-weight":
        from torchao.sparsity import semi_sparse_weight, sparsify_  # optional dependency

        pruned = copy.deepcopy(model)
        sparsify_(pruned, semi_sparse_weight())
        return torch.compile(pruned), None
    if backend.startswith("lynx-"):
        _, compensation, *mode = backend.split("-", 2)
        if compensation == "lora":
            lynx_config = replace(config, compensation="lora", compensation_state=_lora_state(workload, config))
        elif compensation == "fp8":
            lynx_config = replace(config, compensation="norm", precision="fp8")
        else:
            lynx_config = replace(config, compensation=compensation)
        lynx = LynxBackend(lynx_config)
        return torch.compile(model, backend=lynx, mode=mode[0] if mode else None), lynx
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def run_backend(name: str, workload: Workload, reference: torch.Tensor | None, config: LynxConfig, args: argparse.Namespace,
                fresh: bool = True) -> tuple[Row, Callable[[], Any] | None]:
    """Compile and measure one backend: its row, and the timed call (None if it failed).

    ``fresh``: from a fresh Dynamo state, with peak memory measured; off when the compiled
    backends must live on together for interleaved rounds."""
    row = Row(name)
    device = torch.device(args.device)
    if fresh:
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
            if fresh and device.type == "cuda":
                row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if reference is not None:
                row.rel_error = relative_error(out, reference)
            if args.profile:
                row.linear_time_share = _linear_share(lambda: workload(fn), device)
            schedule = lynx.config.step_schedule if lynx is not None else None
            if schedule is not None:
                row.step_schedule = schedule.sparse_steps
                # Also warms the dense twins (CUDA-graph recording) before the sampling loop is timed.
                row.dense_step_ms = median_ms(_dense_call(workload, fn), device, args.warmup, args.repeat)
            if args.steps:
                row.sampling_s = _sampling_loop(fn, workload, args.steps, device, schedule)
            if lynx is not None:
                row.sparse_layers = f"{len(lynx.report.sparse)}/{len(lynx.report.layers)}"
    except Exception as err:  # one failing backend must not abort the comparison
        row.status = "failed"
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        if args.verbose:
            traceback.print_exc()
        return row, None
    return row, lambda: workload(fn)


def _dense_call(workload: Workload, fn: Callable) -> Callable[[], Any]:
    def call() -> Any:
        with dense_forward():
            return workload(fn)

    return call


def _sampling_loop(fn: Callable, workload: Workload, steps: int, device: torch.device,
                   schedule: StepSchedule | None = None) -> float:
    """Seconds for ``steps`` denoising steps: each step feeds the output back as the latent; with a
    ``schedule``, its dense steps run the dense twins."""
    args = list(workload.args)
    synchronize(device)
    with schedule.apply(fn) if schedule is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(*args, **workload.kwargs)
            if args and out.shape[:1] == args[0].shape[:1] and out.shape[1:] != args[0].shape[1:]:
                out = out[:, : args[0].shape[1]]  # learned-sigma models return mean and variance
            if args and out.shape == args[0].shape:
                args[0] = args[0] - out / steps
        synchronize(device)
        return time.perf_counter() - t0


def step_schedule_from_args(args: argparse.Namespace) -> StepSchedule | None:
    """The schedule ``--steps`` with ``--dense-steps`` or ``--sparse-fraction`` describe (None without either);
    ``--sparse-fraction`` keeps the first steps dense. ValueError for options that do not fit together."""
    if args.dense_steps is None and args.sparse_fraction is None:
        return None
    if args.dense_steps is not None and args.sparse_fraction is not None:
        raise ValueError("give one of --dense-steps and --sparse-fraction")
    if args.steps < 1:
        raise ValueError("--dense-steps and --sparse-fraction need --steps N (the sampling steps they refer to)")
    if args.sparse_fraction is not None:
        return StepSchedule.from_costs(range(args.steps, 0, -1), sparse_fraction=args.sparse_fraction)
    try:
        dense = frozenset(int(step) for step in args.dense_steps.split(",") if step.strip())
    except ValueError:
        raise ValueError(f"--dense-steps: expected comma-separated step indices, got {args.dense_steps!r}") from None
    return StepSchedule(args.steps, dense)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_backends(names: tuple[str, ...], workload: Workload, reference: torch.Tensor | None, config: LynxConfig,
                 args: argparse.Namespace) -> list[Row]:
    """Every backend's row, with a progress line per backend (and per round) on stderr."""
    rows, calls = [], {}
    interleaved = args.rounds > 1
    if interleaved:
        torch._dynamo.reset()
    # Interleaved rounds keep every backend's compiled frames cached at once: lift Dynamo's
    # recompile limit so that none of them silently falls back to eager.
    limits = dict(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20) if interleaved else {}
    with torch._dynamo.config.patch(limits):
        for i, name in enumerate(names, 1):
            _log(f"[{i}/{len(names)}] {name}: compiling ...")
            row, call = run_backend(name, workload, reference, config, args, fresh=not interleaved)
            rows.append(row)
            if call is None:
                _log(f"[{i}/{len(names)}] {name}: FAILED: {row.error}")
                continue
            if interleaved:  # otherwise the compiled backend is let go, as its memory would count against the next one
                calls[name] = call
            _log(f"[{i}/{len(names)}] {name}: {row.latency_ms:.2f} ms (compiled in {row.compile_s:.1f} s)")
        round_ms = _round_robin(calls, torch.device(args.device), args.rounds, args.repeat) if calls else {}
    for row in rows:
        if row.backend in round_ms:
            row.round_latency_ms = round_ms[row.backend]
            row.latency_ms = statistics.median(row.round_latency_ms)
    return rows


def _round_robin(calls: dict[str, Callable[[], Any]], device: torch.device, rounds: int, repeat: int) -> dict[str, list[float]]:
    """Each backend's median latency in each of ``rounds`` rounds, the backends taking turns within a round."""
    round_ms: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for r in range(1, rounds + 1):
            for name, call in calls.items():
                call()  # untimed: the first call after another backend ran pays for the switch
                round_ms[name].append(statistics.median(sample_ms(call, device, repeat)))
            _log(f"round {r}/{rounds}: " + ", ".join(f"{name} {ms[-1]:.2f} ms" for name, ms in round_ms.items()))
    return round_ms


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("lynx-bench", __doc__, "Without a GPU, dit-xl-*, pixart-* and flux-* models run with --quick.")
    cli.add_workload_arguments(parser, default_model=DEFAULT_MODEL)
    cli.add_config_arguments(parser, excluded=BENCH_EXCLUDED_FIELDS)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                       help=f"comma-separated, from {', '.join(BACKENDS)}; or 'all'")
    group.add_argument("--warmup", type=int, default=3, help="untimed calls before each backend's timed calls")
    group.add_argument("--repeat", type=int, default=10, help="timed calls per backend (per round with --rounds)")
    group.add_argument("--rounds", type=int, default=1,
                       help="time the compiled backends round-robin over this many rounds and report the median of the "
                            "round medians with their range; peak memory is not measured then, as all backends stay loaded")
    group.add_argument("--steps", type=int, default=0, help="also time a sampling loop of this many steps (0: none)")
    group.add_argument("--dense-steps", metavar="I,J,...",
                       help="with --steps: the lynx backends run these steps (0: the first) dense and the others sparse, "
                            "each graph compiled with a dense twin (LynxConfig.step_schedule)")
    group.add_argument("--sparse-fraction", type=float, metavar="F",
                       help="with --steps: the lynx backends run this fraction of the steps sparse and the first ones "
                            "dense (instead of --dense-steps)")
    group.add_argument("--profile", action="store_true", help="measure the share of time in linear layers")
    group.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG results")
    group.add_argument("--no-save", action="store_true", help="print the table only; write no result files")
    group.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if not str(args.device).startswith("cuda") and not args.quick and args.model.startswith(("dit-xl", "pixart", "flux")):
        _log(f"lynx-bench: no GPU, so {args.model} runs with --quick settings")
        args.quick = True
    backends = BACKENDS if args.backends == "all" else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    try:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
        if args.rounds < 1 or args.repeat < 1 or args.warmup < 0:
            raise ValueError("--rounds and --repeat must be >= 1 and --warmup >= 0")
        config = replace(cli.config_from_args(args), step_schedule=step_schedule_from_args(args))
        workload = cli.workload_from_args(args)
    except ValueError as err:
        return cli.error("lynx-bench", err)

    device = torch.device(args.device)
    with torch.no_grad():
        reference = workload()
    heading = f"{workload.label} ({workload.shape}, {args.dtype}, {device})"
    _log(f"{heading} with {config} (compensation: per lynx-* backend)")
    rows = run_backends(backends, workload, reference, config, args)
    print(heading)
    print(table(rows))
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = environment(device)
        stem = f"bench-{workload.name.replace(':', '_')}-{'quick-' if args.quick else ''}{device_slug(device)}"
        payload = {"model": workload.label, "model_overrides": workload.model_overrides, "shape": workload.shape,
                   "dtype": args.dtype, "quick": args.quick, "rounds": args.rounds, "config": repr(config),
                   "steps": args.steps, "step_schedule": None if config.step_schedule is None else str(config.step_schedule),
                   **env,
                   "rows": [asdict(r) for r in rows]}
        write_json(payload, out / f"{stem}.json")
        charted = bar_chart(rows, out / f"{stem}.png", f"{workload.label} ({workload.shape}) on {payload['device']}")
        _log(f"wrote {out / (stem + '.json')}" + (f" and {stem}.png" if charted else ""))
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
