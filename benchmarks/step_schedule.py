"""Timestep-adaptive sparsity on a trained DiT: what each sampling step's sparsity costs the final sample, and the
quality of step schedules that keep the costliest steps dense against schedules that pick the dense steps blindly;
optionally combined with LoRA compensation and a layer budget, scored by the share of linear FLOPs that run sparse.

    python benchmarks/step_schedule.py                                  # the digits DiT on CPU (about ten minutes)
    python benchmarks/step_schedule.py --checkpoint PATH --device cuda  # any DiT checkpoint of train_dit.py's format
    python benchmarks/step_schedule.py --checkpoint benchmarks/checkpoints/dit_photos.pt --device cuda \
        --guidance-scale 1.0 --compensation lora --dense-flop-budgets 0,0.1,0.2,0.3   # layers x steps

The model is compiled with lynx and a ``step_schedule``, so every graph has a dense twin; the switch then picks sparse
or dense per DDIM step, without recompiles. One compile per layer configuration: every selected layer sparse, then one
per ``--dense-flop-budgets`` entry above 0 (``LynxConfig.dense_flop_budget``, the layers ranked by the sensitivities
that ``calibrate`` measures on training images). ``--compensation lora`` fits the LoRA factors on the same training
images. The sparse layers run the reference op (``LYNX_COMPILE_KERNELS=off``, as in ``quality.py``), so CPU and GPU
measure the same numerics, whatever the model's dtype.

For each layer configuration:

1. Step costs (``lynx_compile.measure_step_costs``) on calibration noise: the relative error of the final sample
   with one step alone sparse against the all-dense sample ("sparse" isolation), and how much one step alone dense
   lowers the all-sparse sample's error ("dense" isolation). With training data, also what each step's sparsity
   adds to the denoising loss of noised training images ("training loss").
2. For each fraction of sparse steps, schedules chosen by those costs (``StepSchedule.from_costs``) and, for
   comparison, with the dense steps spread uniformly, first, or last; each is scored on evaluation noise (other
   seeds than the calibration noise) against the all-dense samples from the same noise: relative error and PSNR of
   the final samples, and, with held-out data (the digits test split, or the held-out photographs), the held-out
   denoising loss: every (image, timestep, noise) draw is predicted sparse or dense as its nearest DDIM step runs.
   ``sparse_flop_share`` is the share of the selected layers' linear FLOPs, summed over layers and steps, that runs
   sparse: the configuration's sparse layer share times the fraction of sparse steps.

Writes ``results/step-schedule[-<checkpoint>][-<compensation>]-<device>.json`` and a PNG plot of quality against the
sparse share of the FLOPs. Timings are not recorded: the reference op is slower than dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import photos  # noqa: E402
from quality import calibration_batches, mean_psnr  # noqa: E402
from train_dit import CHECKPOINT as DIGITS_CHECKPOINT  # noqa: E402
from train_dit import RESULTS, load_checkpoint, load_digits_split  # noqa: E402

from lynx_compile import LynxBackend, LynxConfig, StepSchedule, dense_forward, measure_step_costs  # noqa: E402
from lynx_compile.calibrate import calibrate  # noqa: E402
from lynx_compile.diffusion import NoiseSchedule, ddim_sample, ddim_timesteps  # noqa: E402
from lynx_compile.kernels import KERNELS_OFF_VARIABLE  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402

FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
STRATEGIES = ("cost-ranked", "cost-ranked (dense isolation)", "cost-ranked (training loss)", "uniform",
              "first steps dense", "last steps dense")
LOSS_BOUND_PCT, FLOP_SHARE_TARGET = 3.0, 0.8
"""The quality target: held-out loss within 3% of dense with >= 80% of the selected layers' FLOPs sparse."""


def uniform_dense_steps(num_steps: int, num_dense: int) -> frozenset[int]:
    """``num_dense`` steps spread evenly over the run, each in the middle of its share."""
    return frozenset(int((i + 0.5) * num_steps / num_dense) for i in range(num_dense))


def schedules(num_steps: int, fraction: float, costs: dict[str, list[float]]) -> dict[str, StepSchedule]:
    ranked = StepSchedule.from_costs(costs["sparse"], sparse_fraction=fraction)
    num_dense = len(ranked.dense_steps)
    by_cost = {"cost-ranked": ranked,
               "cost-ranked (dense isolation)": StepSchedule.from_costs(costs["dense"], num_dense=num_dense)}
    if "training_loss" in costs:
        by_cost["cost-ranked (training loss)"] = StepSchedule.from_costs(costs["training_loss"], num_dense=num_dense)
    return by_cost | {
        "uniform": StepSchedule(num_steps, uniform_dense_steps(num_steps, num_dense)),
        "first steps dense": StepSchedule.from_costs(range(num_steps, 0, -1), num_dense=num_dense),
        "last steps dense": StepSchedule.from_costs(range(num_steps), num_dense=num_dense),
    }


def load_model(checkpoint: Path, device: torch.device) -> tuple[nn.Module, NoiseSchedule]:
    """A checkpoint of train_dit.py: the model and the noise schedule it was trained with."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return load_checkpoint(checkpoint, device), NoiseSchedule.named(payload.get("schedule", "linear"))


class Sampler:
    """DDIM sampling from fixed noise, through ``model`` compiled with lynx and ``config``."""

    def __init__(self, model: nn.Module, noise_schedule: NoiseSchedule, device: torch.device, steps: int,
                 guidance_scale: float, config: LynxConfig, inductor: bool = True):
        self.model, self.noise_schedule = model, noise_schedule
        model_config = model.config
        self.channels, self.size, self.num_classes = model_config.in_channels, model_config.input_size, model_config.num_classes
        self.learn_sigma = model_config.learn_sigma
        self.device, self.steps, self.guidance_scale = device, steps, guidance_scale
        self.lynx = LynxBackend(dataclasses.replace(config, step_schedule=StepSchedule(steps)), inductor=inductor)
        # Without Inductor, dynamic shapes: one trace serves the sampling, calibration and loss batches.
        self.compiled = torch.compile(self.model, backend=self.lynx, dynamic=None if inductor else True)

    def eps(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = self.compiled(x, t, y)
        return out[:, : self.channels] if self.learn_sigma else out  # a learned-sigma DiT returns (eps, sigma)

    def inputs(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """(noise, labels): labels cycle through the model's classes; the null class is the embedding's last row."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, self.channels, self.size, self.size), generator=gen).to(self.device)
        return noise, (torch.arange(count) % self.num_classes).to(self.device)

    def sample(self, noise: Tensor, labels: Tensor) -> Tensor:
        return ddim_sample(self.eps, self.noise_schedule, noise, labels, steps=self.steps,
                           guidance_scale=self.guidance_scale, null_class=self.num_classes)

    def sample_with(self, schedule: StepSchedule, noise: Tensor, labels: Tensor) -> Tensor:
        with schedule.apply(self.compiled):
            return self.sample(noise, labels)

    def layer_flop_shares(self) -> tuple[list[str], list[str], float]:
        """(sparse layers, layers the budget kept dense, the sparse share of both together's linear FLOPs)."""
        report = self.lynx.report
        # One Dynamo graph per traced input shape, each listing the same layers.
        sparse = list(dict.fromkeys(d.name for d in report.sparse))
        budgeted = list(dict.fromkeys(d.name for d in report.dense if d.reason.startswith("sensitivity")))
        modules = dict(self.model.named_modules())
        flops = {name: modules[name].in_features * modules[name].out_features for name in sparse + budgeted}
        return sparse, budgeted, sum(flops[n] for n in sparse) / sum(flops.values())


class DenoisingLoss:
    """Per-draw epsilon errors of fixed (image, timestep, noise) draws, dense and sparse, so that any schedule's loss
    is a selection: each draw counts as its nearest DDIM step runs."""

    def __init__(self, sampler: Sampler, x: Tensor, y: Tensor, draws: int = 2, seed: int = 1234, batch: int = 512):
        gen = torch.Generator().manual_seed(seed)
        xs, ys = x.repeat(draws, 1, 1, 1), y.repeat(draws)
        t = torch.randint(0, sampler.noise_schedule.steps, (xs.shape[0],), generator=gen).to(x.device)
        noise = torch.randn(xs.shape, generator=gen).to(x)
        noisy = sampler.noise_schedule.add_noise(xs, noise, t)
        timesteps = torch.tensor(ddim_timesteps(sampler.noise_schedule, sampler.steps), device=x.device)
        self.num_steps = sampler.steps
        self.step = (t[:, None] - timesteps[None]).abs().argmin(1)
        """The DDIM step (nearest timestep) whose mode, dense or sparse, predicts each draw."""
        self.errors = {}
        for mode in ("dense", "sparse"):
            parts = []
            with torch.no_grad(), dense_forward(mode == "dense"):
                for start in range(0, xs.shape[0], batch):
                    part = slice(start, start + batch)
                    eps = sampler.eps(noisy[part], t[part], ys[part])
                    parts.append((eps - noise[part]).pow(2).flatten(1).mean(1))
            self.errors[mode] = torch.cat(parts)

    def __call__(self, schedule: StepSchedule) -> float:
        dense = torch.tensor(sorted(schedule.dense_steps), dtype=torch.long, device=self.step.device)
        runs_dense = torch.isin(self.step, dense)
        return torch.where(runs_dense, self.errors["dense"], self.errors["sparse"]).mean().item()

    def step_costs(self) -> list[float]:
        """What each step's sparsity adds to the mean loss: the sum of its draws' sparse-minus-dense errors over
        all draws."""
        excess = self.errors["sparse"] - self.errors["dense"]
        per_step = torch.zeros(self.num_steps, dtype=excess.dtype, device=excess.device).index_add_(0, self.step, excess)
        return (per_step / excess.numel()).tolist()


def data_kind(model: nn.Module, requested: str) -> str:
    """``digits``, ``photos`` or ``none``: ``auto`` picks the data whose images have the model's shape."""
    if requested != "auto":
        return requested
    shape = (model.config.in_channels, model.config.input_size, model.config.num_classes)
    return {(1, 8, 10): "digits", (3, photos.CROP, 1): "photos"}.get(shape, "none")


def load_data(kind: str, device: torch.device, photo_source: str | None) -> tuple[dict[str, Tensor] | None, str | None]:
    """(split, what its held-out part is)."""
    if kind == "digits":
        return load_digits_split(device), "digits test split"
    if kind == "photos":
        held_out = ", ".join(photos.HELDOUT_PHOTOS)
        return photos.load_photo_split(device, photo_source), f"crops of the held-out photographs {held_out}"
    return None, None


def layer_configs(args: argparse.Namespace, model: nn.Module, data: dict[str, Tensor] | None,
                  noise_schedule: NoiseSchedule) -> tuple[list[tuple[str, float, LynxConfig]], dict[str, Any]]:
    """([(name, dense FLOP budget, config)], what was calibrated): every selected layer sparse, then one per budget."""
    # speed_guard is a policy of the GPU kernels: off, so that the selection is the same on every device.
    base = LynxConfig(speed_guard=False)
    budgets = sorted({b for b in args.dense_flop_budgets if b > 0})
    if args.compensation != "lora" and not budgets:
        return [("every selected layer", 0.0, base)], {}
    if data is None:
        raise SystemExit("step_schedule.py: LoRA and layer budgets calibrate on training images; give --data")
    batches = calibration_batches(data, noise_schedule, args.calibration_batches, args.calibration_batch, args.seed + 1)
    print(f"[step-schedule] calibrating on {len(batches)} x {args.calibration_batch} noised training images ...", flush=True)
    compensation = calibrate(model, batches, base, rank=args.lora_rank)
    if args.compensation == "lora":
        base = dataclasses.replace(base, compensation="lora", compensation_state=dict(compensation))
    sensitivity = (compensation.layer_sensitivity if args.ranking == "layer"
                   else compensation.model_sensitivity(args.compensation))
    configs = [("every selected layer", 0.0, base)] + [
        (f"budget {budget:g} by {args.ranking} error", budget,
         dataclasses.replace(base, sensitivity=sensitivity, dense_flop_budget=budget)) for budget in budgets]
    calibrated = {"calibration_images": len(batches) * args.calibration_batch, "lora_rank": args.lora_rank,
                  "ranking": args.ranking, "sensitivity": sensitivity}
    return configs, calibrated


def target_findings(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best held-out loss at >= 80% of the FLOPs sparse, and the largest sparse share within 3% of dense."""
    scored = [r for r in rows if "heldout_loss_change_pct" in r]
    if not scored:
        return None

    def brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
        keys = ("layer_config", "strategy", "sparse_steps", "dense_steps", "sparse_flop_share",
                "heldout_loss_change_pct", "psnr_db")
        return None if row is None else {k: row[k] for k in keys}

    at_share = [r for r in scored if r["sparse_flop_share"] >= FLOP_SHARE_TARGET - 1e-9]
    within = [r for r in scored if r["heldout_loss_change_pct"] <= LOSS_BOUND_PCT]
    best = min(at_share, key=lambda r: r["heldout_loss_change_pct"], default=None)
    return {"loss_bound_pct": LOSS_BOUND_PCT, "flop_share_target": FLOP_SHARE_TARGET,
            "best_at_flop_share_target": brief(best),
            "largest_flop_share_within_loss_bound": brief(max(within, key=lambda r: (r["sparse_flop_share"],
                                                                                      -r["heldout_loss_change_pct"]),
                                                              default=None)),
            "met": best is not None and best["heldout_loss_change_pct"] <= LOSS_BOUND_PCT}


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    # A fresh backend per configuration is a new Dynamo cache entry for the same forward code.
    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    device = torch.device(args.device)
    checkpoint = Path(args.checkpoint)
    model, noise_schedule = load_model(checkpoint, device)
    data, heldout_name = load_data(data_kind(model, args.data), device, args.photos)
    train, test = slice(0, args.training_images), slice(0, args.heldout_images)
    configs, calibrated = layer_configs(args, model, data, noise_schedule)
    all_dense = StepSchedule(args.steps, range(args.steps))
    results, rows, dense_samples, dense_loss = [], [], None, None
    for name, budget, config in configs:
        torch._dynamo.reset()  # a fresh cache per configuration: the last one's graphs are never called again
        sampler = Sampler(model, noise_schedule, device, args.steps, args.guidance_scale, config,
                          inductor=not args.no_inductor)
        calibration = sampler.inputs(args.calibration_samples, args.seed + 1)
        evaluation = sampler.inputs(args.samples, args.seed)
        print(f"[step-schedule] {name}: compiling and measuring {args.steps} step costs ...", flush=True)
        costs = {isolate: measure_step_costs(lambda s=sampler, c=calibration: s.sample(*c), sampler.compiled, args.steps,
                                             isolate=isolate) for isolate in ("sparse", "dense")}
        if dense_samples is None:  # the dense twin is the same graph in every configuration
            dense_samples = sampler.sample_with(all_dense, *evaluation)
        heldout = None
        if data is not None:
            training = DenoisingLoss(sampler, data["x_train"][train], data["y_train"][train], draws=1, seed=args.seed + 2)
            costs["training_loss"] = training.step_costs()
            heldout = DenoisingLoss(sampler, data["x_test"][test], data["y_test"][test])
            dense_loss = heldout(all_dense)
        sparse_layers, budget_dense, layer_share = sampler.layer_flop_shares()
        for fraction in args.fractions:
            for strategy, schedule in schedules(args.steps, fraction, costs).items():
                samples = sampler.sample_with(schedule, *evaluation)
                row = {"layer_config": name, "sparse_fraction": schedule.sparse_fraction, "requested_fraction": fraction,
                       "sparse_steps": schedule.sparse_steps, "strategy": strategy,
                       "dense_steps": sorted(schedule.dense_steps),
                       "sparse_flop_share": layer_share * schedule.sparse_fraction,
                       "rel_error": relative_error(samples, dense_samples), "psnr_db": mean_psnr(samples, dense_samples)}
                if heldout is not None:
                    loss = heldout(schedule)
                    row |= {"heldout_loss": loss, "heldout_loss_change_pct": 100 * (loss / dense_loss - 1)}
                rows.append(row)
                print(f"[step-schedule] {name}, {schedule.sparse_steps} steps sparse, {strategy}: "
                      f"{row['sparse_flop_share']:.0%} of FLOPs sparse, rel error {row['rel_error']:.4f}, "
                      f"PSNR {row['psnr_db']:.1f} dB"
                      + (f", held-out loss {row['heldout_loss_change_pct']:+.2f}%" if heldout else ""), flush=True)
        results.append({
            "name": name, "dense_flop_budget": budget, "sparse_layers": sparse_layers,
            "dense_layers_by_budget": budget_dense, "sparse_layer_flop_share": layer_share,
            "compiled_graphs": sampler.lynx.report.graphs, "step_costs": costs,
            "heldout": None if heldout is None else {"dense_loss": dense_loss, "sparse_loss": heldout(StepSchedule(args.steps))},
        })
    checkpoint = checkpoint.resolve()
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint),
        "model": {"in_channels": sampler.channels, "input_size": sampler.size, "num_classes": sampler.num_classes,
                  "depth": sampler.model.config.depth, "hidden": sampler.model.config.hidden},
        "settings": {"ddim_steps": args.steps, "guidance_scale": args.guidance_scale, "samples": args.samples,
                     "calibration_samples": args.calibration_samples, "seed": args.seed,
                     "noise_schedule": "from checkpoint", "compensation": args.compensation,
                     "inductor": not args.no_inductor, "sparse_op": "reference (LYNX_COMPILE_KERNELS=off)",
                     "config": "LynxConfig(speed_guard=False, compensation=...), default layer selection"},
        "calibration": calibrated or None,
        "heldout_data": None if data is None else {"data": heldout_name,
                                                   "images": data["x_test"][test].shape[0],
                                                   "draws_per_image": 2},
        "training_loss_images": None if data is None else data["x_train"][train].shape[0],
        "timesteps": ddim_timesteps(sampler.noise_schedule, args.steps),
        "layer_configs": results,
        "rows": rows,
        "target": target_findings(rows),
        "seconds": time.time() - started,
    }


def plot(output: dict[str, Any], path: Path, title: str) -> bool:
    """Per-step costs, and each quality measure against the sparse share of the FLOPs; False without matplotlib.
    One line per strategy for a single layer configuration; per configuration, its cost-ranked lines otherwise."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("rel_error", "final-sample relative error vs dense"), ("psnr_db", "PSNR vs dense samples (dB)")]
    if output["target"] is not None:
        measures.append(("heldout_loss_change_pct", "held-out loss change vs dense (%)"))
    configs = output["layer_configs"]
    single = len(configs) == 1
    fig, axes = plt.subplots(1, 1 + len(measures), figsize=(5 * (1 + len(measures)), 4))
    for config in configs:
        costs = config["step_costs"]["sparse"]
        axes[0].plot(range(len(costs)), costs, marker=".", label=config["name"])
    axes[0].set(xlabel="DDIM step (0: noisiest)", ylabel="sample error with this step alone sparse",
                title="per-step cost")
    if not single:
        axes[0].legend(fontsize=7)
    lines = [(config["name"], strategy) for config in configs
             for strategy in (STRATEGIES if single else ("cost-ranked", "cost-ranked (training loss)"))]
    for ax, (key, label) in zip(axes[1:], measures):
        for config_name, strategy in lines:
            rows = [r for r in output["rows"] if r["layer_config"] == config_name and r["strategy"] == strategy]
            if rows:
                ax.plot([r["sparse_flop_share"] for r in rows], [min(r[key], 100) for r in rows], marker="o",
                        label=strategy if single else f"{config_name}, {strategy}")
        ax.set(xlabel="share of the selected layers' FLOPs sparse (layers x steps)", ylabel=label)
        if key == "heldout_loss_change_pct":
            ax.axhline(LOSS_BOUND_PCT, color="grey", linestyle="--", linewidth=0.8)
            ax.axvline(FLOP_SHARE_TARGET, color="grey", linestyle="--", linewidth=0.8)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def floats(text: str) -> list[float]:
    return [float(f) for f in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DIGITS_CHECKPOINT), help="a checkpoint written by train_dit.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--samples", type=int, default=50, help="evaluation samples (labels cycle through the classes)")
    parser.add_argument("--calibration-samples", type=int, default=20, help="samples the step costs are measured on")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--fractions", type=floats, default=list(FRACTIONS), help="comma-separated fractions of sparse steps")
    parser.add_argument("--data", choices=("auto", "digits", "photos", "none"), default="auto",
                        help="held-out data for the denoising loss, and training data for calibration; auto: the data "
                             "whose images have the model's shape")
    parser.add_argument("--photos", default=None, help="an export of photos.py to read the photos from")
    parser.add_argument("--heldout-images", type=int, default=None, help="score on the first N held-out images (all)")
    parser.add_argument("--training-images", type=int, default=2048,
                        help="noised training images (one draw each) that rank the steps by denoising loss")
    parser.add_argument("--compensation", choices=("norm", "lora"), default="norm",
                        help="lora: norm + LoRA factors fitted by calibrate() on noised training images")
    parser.add_argument("--dense-flop-budgets", type=floats, default=[0.0],
                        help="comma-separated LynxConfig.dense_flop_budget values; 0: every selected layer sparse")
    parser.add_argument("--ranking", choices=("model", "layer"), default="model",
                        help="what ranks the layers for a budget: the whole model's error with the layer alone "
                             "sparse, or the layer's own output error")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-batch", type=int, default=64, help="noised training images per batch")
    parser.add_argument("--no-inductor", action="store_true",
                        help="run the rewritten graphs without Inductor: each configuration compiles in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault(KERNELS_OFF_VARIABLE, "off")
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    output = run(args)
    if output["target"] is not None:
        target = output["target"]
        print(f"[step-schedule] at >= {FLOP_SHARE_TARGET:.0%} of FLOPs sparse, best: {target['best_at_flop_share_target']}")
        print(f"[step-schedule] largest share within {LOSS_BOUND_PCT:g}%: {target['largest_flop_share_within_loss_bound']}")
    if args.no_save:
        return
    checkpoint = Path(args.checkpoint)
    stem = "step-schedule" + ("" if checkpoint.resolve() == DIGITS_CHECKPOINT else f"-{checkpoint.stem}")
    stem += ("" if args.compensation == "norm" else f"-{args.compensation}") + f"-{device_slug(args.device)}"
    env = environment(args.device)
    json_path = write_json({"command": " ".join(["python", "benchmarks/step_schedule.py", *(argv or sys.argv[1:])]),
                            **env, **output}, RESULTS / f"{stem}.json")
    plotted = plot(output, RESULTS / f"{stem}.png", f"{checkpoint.name} on {env['device']}, {args.steps} DDIM steps")
    print(f"wrote {json_path}" + (f" and {stem}.png" if plotted else ""))


if __name__ == "__main__":
    main()
