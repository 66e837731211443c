"""Calibration quality and cost: relative error of none / norm / norm+LoRA, per layer and end to end.

    python benchmarks/calibrate.py                                  # dit-s-2 on CPU (fp32)
    python benchmarks/calibrate.py --model dit-xl-2 --device cuda   # times calibrating on 32 batches

Calibrates ``--model`` (random init, seed 0) on ``--batches`` batches of ``--batch-size`` random
latents at random timesteps, with the default LynxConfig (the backend's own layer selection).
Reports, per sparse layer, the relative output error on the held-out rows of the reservoir for
plain N:M ("none"), norm compensation ("norm") and norm + the fitted LoRA ("lora"), their means,
and the relative error of the model output on ``--eval-batches`` unseen batches with every layer
sparsified each way (compiled by the lynx backend, passes only). Writes
``benchmarks/results/calibrate-<device>.json`` (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lynx_compile  # noqa: E402
from lynx_compile import LynxConfig  # noqa: E402
from lynx_compile.models import build, example_inputs  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402
from lynx_compile.tools.timing import synchronize  # noqa: E402
from lynx_compile.tools.workloads import DTYPES  # noqa: E402


def model_output_errors(model, batches, comp) -> dict[str, float]:
    """Relative error of the model output against the dense model, every selected layer sparse."""
    lora = comp.config()
    configs = {
        "none": replace(lora, compensation="none", compensation_state=None),
        "norm": replace(lora, compensation="norm", compensation_state=None),
        "lora": lora,
    }
    errors = {}
    with torch.no_grad():
        dense = [model(*batch).double() for batch in batches]
        for kind, config in configs.items():
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=lynx_compile.LynxBackend(config, inductor=False), dynamic=False)
            num = sum(((compiled(*b).double() - d).norm() ** 2).item() for b, d in zip(batches, dense))
            den = sum((d.norm() ** 2).item() for d in dense)
            errors[kind] = (num / den) ** 0.5
    torch._dynamo.reset()
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit-s-2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batches", type=int, default=None, help="calibration batches (default 32 on cuda, 16 on cpu)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=2, help="unseen batches for the model-output error (0: skip)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--max-rows", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=None, help="override the model depth (quick runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/calibrate-<device>.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    n_batches = args.batches or (32 if device.type == "cuda" else 16)

    torch.manual_seed(0)
    with torch.device(device):
        model = build(args.model, **({"depth": args.depth} if args.depth else {})).to(dtype).eval()

    def batch(seed: int):
        return example_inputs(model, batch=args.batch_size, dtype=dtype, device=device, seed=seed)

    batches = [batch(seed) for seed in range(n_batches)]
    base = LynxConfig()
    synchronize(device)
    start = time.perf_counter()
    comp = lynx_compile.calibrate(model, batches, base, rank=args.rank, max_rows=args.max_rows)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del batches

    print(comp.table(tablefmt="github"))
    means = comp.mean_errors()
    print(f"\nmean per-layer relative output error on held-out rows: none {means['none']:.4f}  "
          f"norm {means['norm']:.4f}  norm+LoRA {means['lora']:.4f}")
    print(f"calibrated {len(comp)} layers on {n_batches} batches of {args.batch_size} in {seconds:.1f} s"
          + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else ""))
    model_errors = None
    if args.eval_batches:
        model_errors = model_output_errors(model, [batch(10_000 + i) for i in range(args.eval_batches)], comp)
        print("model output relative error (all selected layers sparse): "
              + "  ".join(f"{k} {v:.4f}" for k, v in model_errors.items()))

    result = {
        "model": args.model,
        "depth": args.depth,
        **environment(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "calibration": {"batches": n_batches, "batch_size": args.batch_size, "rank": args.rank,
                        "max_rows": args.max_rows, "pattern": base.pattern},
        "calibrate_seconds": seconds,
        "peak_gpu_memory_GiB": peak,
        "mean_layer_error": means,
        "model_output_error": model_errors,
        "layer_order_none_gt_norm_gt_lora": means["none"] > means["norm"] > means["lora"],
        "model_order_none_gt_norm_gt_lora": (
            None if model_errors is None else model_errors["none"] > model_errors["norm"] > model_errors["lora"]
        ),
        "layers": [layer.metadata() for layer in comp.layers.values()],
    }
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"calibrate-{device_slug(device)}.json"
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
