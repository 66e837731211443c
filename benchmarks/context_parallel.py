"""inductor against lynx under diffusers' context parallelism, and the scaling against one GPU.

    torchrun --nproc-per-node=2 benchmarks/context_parallel.py                  # flux-dev, 1024 and 2048 px
    torchrun --nproc-per-node=2 benchmarks/context_parallel.py --quick          # tiny Flux, CPU (gloo) or GPU

The model is diffusers' ``FluxTransformer2DModel`` with flux-dev's configuration and random
weights (identical on every rank), batch 1, 512 text tokens. Two phases:

1. one GPU: rank 0 alone, the model unsharded (the other ranks wait);
2. all GPUs: the model sharded over every rank with ``lynx_compile.parallel.context_parallel``
   (Ulysses by default).

``--phase single`` and ``--phase sharded`` run them apart (flux-dev compiles for minutes); the
figures meet in ``--state`` on the same machine.

In each phase every backend compiles once (``dynamic=True``: the second resolution must not
recompile) and is timed per resolution. ``--compile blocks`` (the default) compiles each
transformer block class on its own with diffusers' ``compile_repeated_blocks``, as diffusers
advises for Flux: the whole flux-dev graph takes Inductor over three minutes per backend and
phase, a block a fraction of that. ``--compile whole`` compiles the whole model. Each backend is timed: median of
``--repeat`` forwards after ``--warmup``, CUDA
events, the slowest rank's median (each rank's is recorded too). Also recorded: lynx's relative error against inductor, and the
sharded output's error against the unsharded one of the same backend.

Writes ``results/context-parallel-<model>-<gpu>-x<N>.json`` and prints a table with each
backend's speedup over inductor, its scaling over one GPU, and how much of lynx's one-GPU speedup
it keeps.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx.experimental._config
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lynx_compile  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.parallel import MODES, context_parallel, init_distributed  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402
from lynx_compile.tools.timing import median_ms, synchronize  # noqa: E402
from lynx_compile.tools.workloads import diffusers_workload  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# Wide enough (256) for lynx to select its layers; no input size equals another (duck shaping
# would tie them and specialise).
TINY_FLUX = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=4,
                 joint_attention_dim=192, pooled_projection_dim=48, axes_dims_rope=(16, 24, 24))
BACKENDS = ("inductor", "lynx")


def _per_rank(value: float, group: bool) -> list[float]:
    """Every rank's figure, in rank order (a sharded forward ends when its last rank does)."""
    if not group:
        return [value]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, torch.tensor([value], dtype=torch.float64, device=device))
    return gathered.tolist()


def _settled(output: torch.Tensor) -> torch.Tensor:
    """The model's output as a plain tensor. Compiled by blocks, diffusers' output gather runs
    eagerly and hands back an ``AsyncCollectiveTensor`` still waiting on its collective."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return output.wait() if isinstance(output, AsyncCollectiveTensor) else output


def measure(workload, backend: str, args, device: torch.device, gpus: int) -> list[dict[str, Any]]:
    """Compile ``workload.model`` with ``backend`` once and time it at each resolution; the
    outputs go to the state folder for the error columns."""
    torch._dynamo.reset()
    lynx = lynx_compile.backend() if backend == "lynx" else None
    if args.compile == "blocks":  # compiles in place; a later backend's call replaces this one
        workload.model.model.compile_repeated_blocks(backend=lynx or backend, dynamic=True)
        compiled = workload.model
    else:
        compiled = torch.compile(workload.model, backend=lynx or backend, dynamic=True)
    from torch._dynamo.utils import counters

    counters.clear()
    records = []
    with torch.no_grad():
        for index, resolution in enumerate(args.resolutions):
            kwargs = workload.make_inputs(1, resolution=resolution, text_tokens=args.text_tokens)[1]
            forward = lambda kwargs=kwargs: _settled(compiled(**kwargs))  # noqa: E731
            start = time.perf_counter()
            output = forward()
            synchronize(device)
            first_call_s = time.perf_counter() - start
            per_rank = _per_rank(median_ms(forward, device, args.warmup, args.repeat), gpus > 1)
            median = max(per_rank)
            if args.profile:  # every rank of a sharded forward has to take part; rank 0 writes
                path = args.state / f"profile-{gpus}-{backend}-{resolution}.txt"
                _profile(forward, device, path if dist.get_rank() == 0 else None)
            records.append({"gpus": gpus, "backend": backend, "resolution": resolution, "median_ms": median,
                            "rank_median_ms": per_rank,
                            "compile_s" if index == 0 else "first_call_s": first_call_s})
            if dist.get_rank() == 0:  # as it goes: a run cut short still shows its figures
                torch.save(output.cpu(), _output_path(args, gpus, backend, resolution))
                print(f"[{gpus} GPU] {backend} {resolution}px: {median:.2f} ms, per rank {[round(t, 2) for t in per_rank]} "
                      f"(first call {first_call_s:.1f} s)", flush=True)
    for record in records:
        record["graphs"] = counters["stats"]["unique_graphs"]
        record["sparse_layers"] = f"{len(lynx.report.sparse)}/{len(lynx.report.layers)}" if lynx else None
    return records


def _profile(forward, device: torch.device, path: Path | None) -> None:
    """One forward under the profiler: GPU time per kernel, and the host's time to issue it."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        start = time.perf_counter()
        forward()
        issued = time.perf_counter() - start
        synchronize(device)
        done = time.perf_counter() - start
    if path is None:
        return
    table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=30,
                                      max_name_column_width=70)
    path.write_text(f"{json.dumps(environment(device))}\n"
                    f"host issue {issued * 1e3:.1f} ms, until GPU done {done * 1e3:.1f} ms\n{table}\n")
    print(f"profile: host issue {issued * 1e3:.1f} ms, until GPU done {done * 1e3:.1f} ms -> {path}", flush=True)


def _output_path(args, gpus: int, backend: str, resolution: int) -> Path:
    return args.state / f"output-{gpus}-{backend}-{resolution}.pt"


def _save_records(args, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge ``new`` into the state folder's records (a phase run again replaces its rows)."""
    path = args.state / "records.json"
    records = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["gpus"], r["backend"], r["resolution"])
    fresh = {key(r) for r in new}
    records = [r for r in records if key(r) not in fresh] + new
    path.write_text(json.dumps(records, indent=1))
    return records


def run(args) -> dict[str, Any] | None:
    rank, world, device = init_distributed()
    # At 1024 px flux-dev has 4096 image tokens, as many as its text features: duck shaping would
    # give both one symbol, the text Linear would pin it to 4096, and 2048 px would recompile.
    torch.fx.experimental._config.use_duck_shape = False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.state.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = TINY_FLUX if args.quick else FLUX_DEV
    if args.blocks:
        config = dict(config, num_layers=args.blocks[0], num_single_layers=args.blocks[1])
    workload = diffusers_workload("FluxTransformer2DModel", config, dtype=dtype, device=device)
    for tensor in workload.model.state_dict().values():  # the same random weights on every rank
        dist.broadcast(tensor, src=0)
    records: list[dict[str, Any]] = []

    def measure_backends(gpus: int) -> None:
        nonlocal records
        for backend in args.backends:
            measured = measure(workload, backend, args, device, gpus)
            if rank == 0:  # kept per backend: a run stopped later still leaves these
                records = _save_records(args, measured)

    if args.phase in ("single", "both") or world == 1:
        if rank == 0:
            measure_backends(1)
        dist.barrier()
    if args.phase in ("sharded", "both") and world > 1:
        context_parallel(workload.model, mode=args.mode)
        measure_backends(world)
    if rank != 0:
        return None
    return summarize(records, args, device, world)


def summarize(records: list[dict[str, Any]], args, device: torch.device, world: int) -> dict[str, Any]:
    find = {(r["gpus"], r["backend"], r["resolution"]): r for r in records}

    @functools.cache  # each output is compared with up to two others
    def load(key: tuple[int, str, int]) -> torch.Tensor:
        return torch.load(_output_path(args, *key))

    output = lambda r: load((r["gpus"], r["backend"], r["resolution"]))
    rows = []
    for record in sorted(records, key=lambda r: (r["gpus"], BACKENDS.index(r["backend"]), r["resolution"])):
        row = dict(record)
        inductor = find.get((record["gpus"], "inductor", record["resolution"]))
        if inductor is not None:
            row["speedup_vs_inductor"] = inductor["median_ms"] / record["median_ms"]
            row["rel_error_vs_inductor"] = relative_error(output(record), output(inductor))
        single = find.get((1, record["backend"], record["resolution"]))
        if single is not None and record["gpus"] > 1:
            row["scaling_vs_1_gpu"] = single["median_ms"] / record["median_ms"]
            row["rel_error_vs_1_gpu"] = relative_error(output(record), output(single))
        rows.append(row)
    kept = {}
    for resolution in args.resolutions:
        speedups = {r["gpus"]: r.get("speedup_vs_inductor") for r in rows
                    if r["backend"] == "lynx" and r["resolution"] == resolution}
        if speedups.get(1) and speedups.get(world) and world > 1:
            kept[resolution] = {"speedup_ratio": speedups[world] / speedups[1],
                                "gain_ratio": (speedups[world] - 1) / (speedups[1] - 1) if speedups[1] > 1 else None}
    model = "tiny Flux" if args.quick else "flux-dev (diffusers FluxTransformer2DModel, random weights)"
    if args.blocks:
        model += f", {args.blocks[0]} double + {args.blocks[1]} single blocks"
    compile_modes = {"blocks": "each block class on its own (diffusers compile_repeated_blocks)", "whole": "whole model"}
    return {"model": model, "compile": compile_modes[args.compile],
            "batch": 1, "text_tokens": args.text_tokens, "mode": args.mode, "world_size": world,
            "dtype": str(torch.bfloat16 if device.type == "cuda" else torch.float32), **environment(device),
            "rows": rows, "lynx_speedup_kept": kept}


def table(result: dict[str, Any]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    out = [(r["gpus"], r["backend"], r["resolution"], fmt(r["median_ms"], ".1f"), fmt(r.get("speedup_vs_inductor"), ".3f"),
            fmt(r.get("scaling_vs_1_gpu"), ".2f"), fmt(r.get("rel_error_vs_inductor"), ".2e"),
            fmt(r.get("rel_error_vs_1_gpu"), ".2e"), fmt(r.get("compile_s", r.get("first_call_s")), ".1f"), r["graphs"],
            r["sparse_layers"] or "-") for r in result["rows"]]
    headers = ("GPUs", "backend", "px", "median ms", "vs inductor", "vs 1 GPU", "err vs inductor", "err vs 1 GPU",
               "first call s", "graphs", "sparse layers")
    lines = [tabulate(out, headers=headers)]
    for resolution, kept in result["lynx_speedup_kept"].items():
        gain = "-" if kept["gain_ratio"] is None else f"{kept['gain_ratio']:.0%}"
        lines.append(f"{resolution} px: lynx keeps {kept['speedup_ratio']:.1%} of its 1-GPU speedup over inductor "
                     f"(of the gain above 1.0x: {gain})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048], help="image sizes in pixels")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--mode", default="ulysses", choices=MODES, help="diffusers' context-parallel flavour")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--phase", default="both", choices=("single", "sharded", "both"),
                        help="one GPU (rank 0), all GPUs sharded, or both; phases run apart merge through --state")
    parser.add_argument("--state", type=Path, default=None,
                        help="folder keeping each phase's figures and outputs between runs (default: one per model "
                             "under the temp folder)")
    parser.add_argument("--quick", action="store_true", help="tiny Flux at 256 and 512 px")
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                        help="fewer transformer blocks at flux-dev's width (19 and 38 in flux-dev): compile time "
                             "grows with depth, per-block speed does not; recorded in the result")
    parser.add_argument("--compile", default="blocks", choices=("blocks", "whole"),
                        help="compile each repeated block class (diffusers compile_repeated_blocks) or the whole model")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one forward per backend and resolution (GPU): rank 0's kernel table in --state")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/context-parallel-...)")
    args = parser.parse_args()
    if args.quick and args.resolutions == [1024, 2048]:
        args.resolutions = [256, 512]
    model_tag = ("tiny-flux" if args.quick else "flux-dev") + (f"-blocks{args.blocks[0]}-{args.blocks[1]}" if args.blocks else "")
    model_tag += "-whole" if args.compile == "whole" else ""
    args.state = args.state or Path(tempfile.gettempdir()) / f"lynx-context-parallel-{model_tag}"
    try:
        result = run(args)
        if result is not None:
            gpu = device_slug("cuda" if torch.cuda.is_available() else "cpu")
            name = f"context-parallel-{model_tag}-{gpu}-x{result['world_size']}.json"
            path = write_json(result, args.out or ROOT / "benchmarks" / "results" / name)
            print(table(result))
            print(f"wrote {path}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
