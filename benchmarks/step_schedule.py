"""Timestep-adaptive sparsity on a trained DiT: what each sampling step's sparsity costs the final sample, and the
quality of step schedules that keep the costliest steps dense against schedules that pick the dense steps blindly.

    python benchmarks/step_schedule.py                                  # the digits DiT on CPU (about a minute)
    python benchmarks/step_schedule.py --checkpoint PATH --device cuda  # any DiT checkpoint of train_dit.py's format

The model is compiled once with lynx (norm compensation, the default layer selection) and a ``step_schedule``, so
every graph has a dense twin; the switch then picks sparse or dense per DDIM step, without recompiles.

1. Step costs (``lynx_compile.measure_step_costs``) on calibration noise: the relative error of the final sample
   with one step alone sparse against the all-dense sample ("sparse" isolation), and how much one step alone dense
   lowers the all-sparse sample's error ("dense" isolation).
2. For each fraction of sparse steps, schedules chosen by those costs (``StepSchedule.from_costs``) and, for
   comparison, with the dense steps spread uniformly, first, or last; each is scored on evaluation noise (other
   seeds than the calibration noise) against the all-dense samples from the same noise: relative error and PSNR of
   the final samples, and, where held-out data fits the model (the digits DiT), the held-out denoising loss: every
   (image, timestep, noise) draw is predicted sparse or dense as its nearest DDIM step runs.

Writes ``results/step-schedule-<device>.json`` (``step-schedule-<checkpoint>-<device>`` for another checkpoint) and a
PNG plot of quality against the fraction of sparse steps. Timings are not recorded: on CPU the lynx ops run their
plain-torch reference, slower than dense.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import mean_psnr  # noqa: E402
from train_dit import CHECKPOINT as DIGITS_CHECKPOINT  # noqa: E402
from train_dit import RESULTS, load_checkpoint, load_digits_split  # noqa: E402

import lynx_compile  # noqa: E402
from lynx_compile import LynxConfig, StepSchedule, dense_forward, measure_step_costs  # noqa: E402
from lynx_compile.diffusion import NoiseSchedule, ddim_sample, ddim_timesteps  # noqa: E402
from lynx_compile.metrics import relative_error  # noqa: E402
from lynx_compile.tools.results import device_slug, environment, write_json  # noqa: E402

FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
STRATEGIES = ("cost-ranked", "cost-ranked (dense isolation)", "uniform", "first steps dense", "last steps dense")


def uniform_dense_steps(num_steps: int, num_dense: int) -> frozenset[int]:
    """``num_dense`` steps spread evenly over the run, each in the middle of its share."""
    return frozenset(int((i + 0.5) * num_steps / num_dense) for i in range(num_dense))


def schedules(num_steps: int, fraction: float, costs: dict[str, list[float]]) -> dict[str, StepSchedule]:
    ranked = StepSchedule.from_costs(costs["sparse"], sparse_fraction=fraction)
    num_dense = len(ranked.dense_steps)
    return {
        "cost-ranked": ranked,
        "cost-ranked (dense isolation)": StepSchedule.from_costs(costs["dense"], num_dense=num_dense),
        "uniform": StepSchedule(num_steps, uniform_dense_steps(num_steps, num_dense)),
        "first steps dense": StepSchedule.from_costs(range(num_steps, 0, -1), num_dense=num_dense),
        "last steps dense": StepSchedule.from_costs(range(num_steps), num_dense=num_dense),
    }


class Sampler:
    """DDIM sampling of one checkpoint from fixed noise, through the lynx-compiled model."""

    def __init__(self, checkpoint: Path, device: torch.device, steps: int, guidance_scale: float):
        self.model = load_checkpoint(checkpoint, device)
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.noise_schedule = NoiseSchedule.named(payload.get("schedule", "linear"))
        config = self.model.config
        self.channels, self.size, self.num_classes = config.in_channels, config.input_size, config.num_classes
        self.learn_sigma = config.learn_sigma
        self.device, self.steps, self.guidance_scale = device, steps, guidance_scale
        self.lynx = lynx_compile.backend(LynxConfig(step_schedule=StepSchedule(steps)))
        self.compiled = torch.compile(self.model, backend=self.lynx)

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


class HeldOutLoss:
    """Per-draw epsilon errors of the held-out split, dense and sparse, so that any schedule's loss is a selection."""

    def __init__(self, sampler: Sampler, x: Tensor, y: Tensor, draws: int = 2, seed: int = 1234, batch: int = 512):
        gen = torch.Generator().manual_seed(seed)
        xs, ys = x.repeat(draws, 1, 1, 1), y.repeat(draws)
        t = torch.randint(0, sampler.noise_schedule.steps, (xs.shape[0],), generator=gen).to(x.device)
        noise = torch.randn(xs.shape, generator=gen).to(x)
        noisy = sampler.noise_schedule.add_noise(xs, noise, t)
        timesteps = torch.tensor(ddim_timesteps(sampler.noise_schedule, sampler.steps), device=x.device)
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


def has_digits_shape(model: nn.Module) -> bool:
    config = model.config
    return (config.in_channels, config.input_size, config.num_classes) == (1, 8, 10)


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    device = torch.device(args.device)
    sampler = Sampler(Path(args.checkpoint), device, args.steps, args.guidance_scale)
    calibration = sampler.inputs(args.calibration_samples, args.seed + 1)
    evaluation = sampler.inputs(args.samples, args.seed)
    print(f"[step-schedule] compiling and measuring {args.steps} step costs ...", flush=True)
    costs = {isolate: measure_step_costs(lambda: sampler.sample(*calibration), sampler.compiled, args.steps,
                                         isolate=isolate) for isolate in ("sparse", "dense")}
    all_dense = StepSchedule(args.steps, range(args.steps))
    dense_samples = sampler.sample_with(all_dense, *evaluation)
    use_digits = args.data == "digits" or (args.data == "auto" and has_digits_shape(sampler.model))
    heldout, dense_loss = None, None
    if use_digits:
        data = load_digits_split(device)
        heldout = HeldOutLoss(sampler, data["x_test"], data["y_test"])
        dense_loss = heldout(all_dense)
    rows = []
    for fraction in args.fractions:
        for strategy, schedule in schedules(args.steps, fraction, costs).items():
            samples = sampler.sample_with(schedule, *evaluation)
            row = {"sparse_fraction": schedule.sparse_fraction, "requested_fraction": fraction, "strategy": strategy,
                   "dense_steps": sorted(schedule.dense_steps), "rel_error": relative_error(samples, dense_samples),
                   "psnr_db": mean_psnr(samples, dense_samples)}
            if heldout is not None:
                loss = heldout(schedule)
                row |= {"heldout_loss": loss, "heldout_loss_change_pct": 100 * (loss / dense_loss - 1)}
            rows.append(row)
            print(f"[step-schedule] {schedule.sparse_fraction:.2f} sparse, {strategy}: rel error {row['rel_error']:.4f}, "
                  f"PSNR {row['psnr_db']:.1f} dB" + (f", held-out loss {row['heldout_loss']:.5f}" if heldout else ""),
                  flush=True)
    checkpoint = Path(args.checkpoint).resolve()
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint),
        "model": {"in_channels": sampler.channels, "input_size": sampler.size, "num_classes": sampler.num_classes,
                  "depth": sampler.model.config.depth, "hidden": sampler.model.config.hidden},
        "settings": {"ddim_steps": args.steps, "guidance_scale": args.guidance_scale, "samples": args.samples,
                     "calibration_samples": args.calibration_samples, "seed": args.seed,
                     "noise_schedule": "from checkpoint", "config": "LynxConfig() (norm compensation, default layers)"},
        # One Dynamo graph per input batch shape (sampling, held-out batches), each listing the same layers.
        "sparse_layers": list(dict.fromkeys(d.name for d in sampler.lynx.report.sparse)),
        "compiled_graphs": sampler.lynx.report.graphs,
        "timesteps": ddim_timesteps(sampler.noise_schedule, args.steps),
        "step_costs": costs,
        "heldout": None if heldout is None else {"data": "digits test split", "draws_per_image": 2,
                                                 "dense_loss": dense_loss,
                                                 "sparse_loss": heldout(StepSchedule(args.steps))},
        "rows": rows,
        "seconds": time.time() - started,
    }


def plot(output: dict[str, Any], path: Path, title: str) -> bool:
    """Per-step costs, and each quality measure against the fraction of sparse steps; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("rel_error", "final-sample relative error vs dense"), ("psnr_db", "PSNR vs dense samples (dB)")]
    if output["heldout"] is not None:
        measures.append(("heldout_loss_change_pct", "held-out loss change vs dense (%)"))
    fig, axes = plt.subplots(1, 1 + len(measures), figsize=(5 * (1 + len(measures)), 4))
    steps = range(len(output["step_costs"]["sparse"]))
    axes[0].bar(steps, output["step_costs"]["sparse"], color="tab:orange")
    axes[0].set(xlabel="DDIM step (0: noisiest)", ylabel="sample error with this step alone sparse",
                title="per-step cost")
    for ax, (key, label) in zip(axes[1:], measures):
        for strategy in STRATEGIES:
            rows = [r for r in output["rows"] if r["strategy"] == strategy]
            ax.plot([r["sparse_fraction"] for r in rows], [min(r[key], 100) for r in rows], marker="o", label=strategy)
        ax.set(xlabel="fraction of sparse steps", ylabel=label)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DIGITS_CHECKPOINT), help="a checkpoint written by train_dit.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--samples", type=int, default=50, help="evaluation samples (labels cycle through the classes)")
    parser.add_argument("--calibration-samples", type=int, default=20, help="samples the step costs are measured on")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--fractions", type=lambda s: [float(f) for f in s.split(",")], default=list(FRACTIONS),
                        help="comma-separated fractions of sparse steps")
    parser.add_argument("--data", choices=("auto", "digits", "none"), default="auto",
                        help="held-out data for the denoising loss; auto: the digits split where the model fits it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    output = run(args)
    if args.no_save:
        return
    checkpoint = Path(args.checkpoint)
    stem = "step-schedule" + ("" if checkpoint.resolve() == DIGITS_CHECKPOINT else f"-{checkpoint.stem}")
    stem += f"-{device_slug(args.device)}"
    env = environment(args.device)
    json_path = write_json({"command": " ".join(["python", "benchmarks/step_schedule.py", *(argv or sys.argv[1:])]),
                            **env, **output}, RESULTS / f"{stem}.json")
    plotted = plot(output, RESULTS / f"{stem}.png", f"{checkpoint.name} on {env['device']}, {args.steps} DDIM steps")
    print(f"wrote {json_path}" + (f" and {stem}.png" if plotted else ""))


if __name__ == "__main__":
    main()
