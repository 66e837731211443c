"""Train the small class-conditional DiT on real handwritten digits that ships as
``benchmarks/checkpoints/dit_digits.pt``, the model the quality harness (``quality.py``) measures.

Data: scikit-learn's bundled ``load_digits`` (UCI optdigits: 1797 8x8 grayscale digits, 10
labelled classes). Chosen because it ships inside the scikit-learn wheel, so it installs offline
from PyPI with no download at run time, it is real (not synthetic) image data, it is labelled
(class-conditional generation and a classifier check of the samples) and it is small enough to
train on a 2-core CPU in minutes. 8x8x1 plays the role of the latent: with patch 2 the DiT sees
16 tokens. MNIST / CIFAR would need a download, which these machines cannot do.

Model: ``dit-s-2`` overridden to hidden 256, depth 2, 4 heads, so every selected linear has at
least 256 features (qkv 256->768, fc1 256->1024, fc2 1024->256) and lynx's default selection
(``min_features=256``) applies unchanged; the fp32 checkpoint is about 10.5 MB. Depth is the
price of training in about 10 minutes on a 2-core CPU (the shipped run took 14 minutes because
other jobs shared the cores).

    python benchmarks/train_dit.py                  # CPU: the shipped checkpoint's recipe
    python benchmarks/train_dit.py --device cuda    # the same recipe on a GPU (not timed: made on CPU)

Writes the checkpoint (EMA weights), ``benchmarks/results/train_dit_digits.csv`` (loss curve)
and ``benchmarks/results/train_dit_digits.json`` (summary).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lynx_compile.diffusion import NoiseSchedule, denoising_loss  # noqa: E402
from lynx_compile.models import build  # noqa: E402
from lynx_compile.tools.results import write_json  # noqa: E402

CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "dit_digits.pt"
RESULTS = ROOT / "benchmarks" / "results"

MODEL_NAME = "dit-s-2"
MODEL_OVERRIDES = dict(depth=2, hidden=256, heads=4, input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
NULL_CLASS = MODEL_OVERRIDES["num_classes"]
"""Label index of "no class": the DiT's extra embedding row, for classifier-free guidance."""
SCHEDULE = "linear"
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_split(device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Stratified train / test split of the digits as (B, 1, 8, 8) images in [-1, 1] and labels.

    The split is fixed (``SPLIT_SEED``) so the harness evaluates on the images the checkpoint
    never saw. ``pixels_*`` keep sklearn's 0..16 scale for the digit classifier.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(
        range(len(digits.target)), test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    images = torch.tensor(digits.images, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    split = {}
    for name, idx in (("train", train_idx), ("test", test_idx)):
        idx = torch.tensor(idx)
        split[f"x_{name}"] = (images[idx] / 8.0 - 1.0).unsqueeze(1).to(device)
        split[f"y_{name}"] = labels[idx].to(device)
    return split


def build_model() -> nn.Module:
    return build(MODEL_NAME, **MODEL_OVERRIDES)


def load_checkpoint(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu") -> nn.Module:
    """The trained DiT in eval mode, fp32."""
    payload = torch.load(path, map_location=device, weights_only=True)
    model = build(payload["model"], **payload["overrides"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


def adaln_zero_init(model: nn.Module) -> None:
    """DiT's adaLN-Zero: zero the modulation and output layers so each block starts as the
    identity. The repo's reference init is deliberately non-zero (so untrained models exercise
    every layer); for training, the DiT paper's init converges markedly faster."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.endswith("adaLN_modulation.1") or name == "final_layer.linear"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def heldout_loss(model: nn.Module, schedule: NoiseSchedule, x: Tensor, y: Tensor, draws: int = 4, seed: int = 1234,
                 batch: int = 512) -> float:
    """Mean epsilon MSE over ``draws`` fixed (timestep, noise) draws per held-out image.

    Seeded, so every model (and every sparsity variant) is scored on exactly the same draws.
    """
    gen = torch.Generator().manual_seed(seed)
    xs, ys = x.repeat(draws, 1, 1, 1), y.repeat(draws)
    t = torch.randint(0, schedule.steps, (xs.shape[0],), generator=gen).to(x.device)
    noise = torch.randn(xs.shape, generator=gen).to(x)
    total = 0.0
    for start in range(0, xs.shape[0], batch):
        part = slice(start, start + batch)
        loss = denoising_loss(model, schedule, xs[part], ys[part], t=t[part], noise=noise[part])
        total += loss.item() * xs[part].shape[0]
    return total / xs.shape[0]


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_digits_split(device)
    schedule = NoiseSchedule.named(SCHEDULE)
    model = build_model().to(device)
    adaln_zero_init(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Short warmup: adaLN-Zero makes early gradients tiny everywhere but the output layer, and
    # a full-size first step on it is what destabilises small DiTs.
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = data["x_train"], data["y_train"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_rows, running, start = [], [], time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (args.batch,), generator=gen).to(device)
        y = y_train[idx]
        # Label dropout trains the unconditional model that classifier-free guidance needs.
        drop = (torch.rand(args.batch, generator=gen) < args.label_dropout).to(device)
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        loss = denoising_loss(model, schedule, x_train[idx], y, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # EMA weights sample far cleaner than the last iterate; the checkpoint ships them.
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, "train_loss": sum(running) / len(running), "elapsed_s": round(time.time() - start, 1)}
            running = []
            if step % args.eval_every == 0 or step == args.steps:
                row["heldout_loss_ema"] = heldout_loss(ema, schedule, data["x_test"], data["y_test"])
            log_rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    elapsed = time.time() - start

    final = {
        "train_loss_ema": heldout_loss(ema, schedule, x_train, y_train, draws=1),
        "heldout_loss_ema": heldout_loss(ema, schedule, data["x_test"], data["y_test"]),
    }
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": MODEL_NAME,
            "overrides": MODEL_OVERRIDES,
            "state_dict": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "schedule": SCHEDULE,
            "null_class": NULL_CLASS,
        },
        CHECKPOINT,
    )
    with open(RESULTS / "train_dit_digits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train_loss", "heldout_loss_ema", "elapsed_s"])
        writer.writeheader()
        writer.writerows(log_rows)
    summary = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "data": {"dataset": "sklearn load_digits", "train": len(y_train), "test": len(data["y_test"]), "split_seed": SPLIT_SEED},
        "model": {"name": MODEL_NAME, **MODEL_OVERRIDES, "parameters": sum(p.numel() for p in ema.parameters())},
        "schedule": SCHEDULE,
        "train_seconds": round(elapsed, 1),
        "final": final,
        "checkpoint_bytes": CHECKPOINT.stat().st_size,
        "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(summary, RESULTS / "train_dit_digits.json")
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=150)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
