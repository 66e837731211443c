"""Train the small DiTs that the quality harness (``quality.py``) measures: ``--dataset digits``
(``benchmarks/checkpoints/dit_digits.pt``) or ``--dataset photos`` (``dit_photos.pt``).

Digits: scikit-learn's bundled ``load_digits`` (UCI optdigits: 1797 8x8 grayscale digits, 10
labelled classes). Chosen because it ships inside the scikit-learn wheel, so it installs offline
from PyPI with no download at run time, it is real (not synthetic) image data, it is labelled
(class-conditional generation and a classifier check of the samples) and it is small enough to
train on a 2-core CPU in minutes. 8x8x1 plays the role of the latent: with patch 2 the DiT sees
16 tokens. MNIST / CIFAR would need a download, which these machines cannot do. The model is
``dit-s-2`` overridden to hidden 256, depth 2, 4 heads, so every selected linear has at least 256
features (qkv 256->768, fc1 256->1024, fc2 1024->256) and lynx's default selection
(``min_features=256``) applies unchanged; the fp32 checkpoint is about 10.5 MB. Depth is the
price of training in about 10 minutes on a 2-core CPU.

Photos: 32x32 RGB crops of the colour photographs bundled with scikit-image and scikit-learn,
split by photograph (``photos.py``); 256 tokens per image. The model is ``dit-s-2`` at its own
width (hidden 384, 6 heads) with depth 8 and MLP ratio 3, unconditional (one class, label 0,
plus the null class), 19.5 M parameters, trained on a GPU in bf16 autocast for a wall-clock budget
(``--minutes``). It ships with every linear weight in int8 with one fp32 scale per output channel
(other tensors fp32): 19.8 MB, where MLP ratio 4 would not fit 20 MB. The shipped model *is* the
dequantized one: ``load_checkpoint`` rebuilds it, and the summary gives the held-out loss before
and after the rounding.

    python benchmarks/train_dit.py                          # CPU: the digits checkpoint's recipe
    python benchmarks/train_dit.py --device cuda            # the same recipe on a GPU (not timed: made on CPU)
    python benchmarks/photos.py --export                    # where the packages have the photos
    python benchmarks/train_dit.py --dataset photos --device cuda --photos .gpu/photos.npz
    python benchmarks/train_dit.py --dataset photos --minutes 0.2 --hidden 64 --depth 1 \
        --checkpoint /tmp/tiny.pt --results /tmp                # a CPU smoke run

Writes the checkpoint (EMA weights; also at every held-out evaluation, so a run cut short keeps
its last one), ``benchmarks/results/train_dit_<dataset>.csv`` (loss curve) and
``train_dit_<dataset>.json`` (summary: arguments, versions, device, losses).

Other scripts import ``load_checkpoint(path, device)`` (either checkpoint; the model's ``config``
has ``num_classes``), ``load_digits_split(device)`` and ``photos.load_photo_split(device)`` (the
same keys: ``x_train``, ``y_train``, ``x_test``, ``y_test``).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import photos  # noqa: E402

from lynx_compile.diffusion import NoiseSchedule, denoising_loss  # noqa: E402
from lynx_compile.models import build  # noqa: E402
from lynx_compile.tools.results import write_json  # noqa: E402

CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "dit_digits.pt"
PHOTO_CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "dit_photos.pt"
RESULTS = ROOT / "benchmarks" / "results"

MODEL_NAME = "dit-s-2"
MODEL_OVERRIDES = dict(depth=2, hidden=256, heads=4, input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
NULL_CLASS = MODEL_OVERRIDES["num_classes"]
"""Label index of "no class" of the digits model: the DiT's extra embedding row, for classifier-free guidance."""
PHOTO_OVERRIDES = dict(depth=8, hidden=384, heads=6, mlp_ratio=3.0, input_size=photos.CROP, in_channels=3, num_classes=1,
                       learn_sigma=False)
"""MLP ratio 3 is the largest in steps of 1/8 whose int8 checkpoint fits 20 MB (3.125: 20.1 MB)."""
SCHEDULE = "linear"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
CHECKPOINT_LIMIT_BYTES = 20_000_000


@dataclass(frozen=True)
class Recipe:
    """One dataset's model and training defaults; unset command-line options take these (the model's through --hidden & co)."""

    overrides: dict[str, Any]
    checkpoint: Path
    storage: str
    """``fp32`` (the state dict as is) or ``int8`` (linear weights int8, one fp32 scale per output channel)."""
    steps: int | None
    minutes: float | None
    """Wall-clock budget of the training loop; the cosine decay follows whichever of steps / time runs out first."""
    batch: int
    lr: float
    ema: float
    warmup: int | None
    """Linear LR warmup steps (None: a twentieth of ``steps``)."""
    log_every: int
    eval_every: int
    bf16: bool
    """bf16 autocast for the training forward on CUDA (evaluation stays fp32)."""
    draws_on_device: bool
    """Draw batches, timesteps and noise with a generator on the training device (no host sync per step);
    the digits recipe draws on the CPU, as its checkpoint was made."""
    label_dropout: float = 0.1
    seed: int = 0


RECIPES = {
    "digits": Recipe(MODEL_OVERRIDES, CHECKPOINT, "fp32", steps=450, minutes=None, batch=64, lr=1e-3, ema=0.995,
                     warmup=None, log_every=50, eval_every=150, bf16=False, draws_on_device=False),
    "photos": Recipe(PHOTO_OVERRIDES, PHOTO_CHECKPOINT, "int8", steps=None, minutes=6.3, batch=256, lr=3e-4, ema=0.999,
                     warmup=200, log_every=100, eval_every=1000, bf16=True, draws_on_device=True),
}


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


def build_model(overrides: dict[str, Any] = MODEL_OVERRIDES) -> nn.Module:
    return build(MODEL_NAME, **overrides)


def linear_weight_names(model: nn.Module) -> list[str]:
    """State-dict keys of every ``nn.Linear`` weight: what int8 storage quantizes."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q (N, K) int8, scale (N,) fp32) with weight ~= q * scale[:, None]."""
    scale = weight.detach().float().abs().amax(dim=1) / 127
    q = torch.round(weight.detach().float() / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    return q.clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The shipped weight: fp32, exactly reproducible on any device (one rounded product per element)."""
    return q.float() * scale.float()[:, None]


def checkpoint_payload(model: nn.Module, overrides: dict[str, Any], storage: str,
                       metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``torch.save`` writes: model name and overrides, the weights (``storage`` fp32 or int8), schedule, null class."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"model": MODEL_NAME, "overrides": dict(overrides)}
    if storage == "fp32":
        payload["state_dict"] = state
    elif storage == "int8":
        quantized = {name: quantize_int8(state.pop(name)) for name in linear_weight_names(model)}
        payload |= {"state_dict": state, "int8_weights": {n: q for n, (q, _) in quantized.items()},
                    "int8_scales": {n: s for n, (_, s) in quantized.items()}}
    else:
        raise ValueError(f"checkpoint storage: expected 'fp32' or 'int8', got {storage!r}")
    return payload | {"schedule": SCHEDULE, "null_class": overrides["num_classes"]} | (metadata or {})


def payload_state_dict(payload: dict[str, Any]) -> dict[str, Tensor]:
    """The model's fp32 state dict from a checkpoint payload: int8 linear weights dequantized."""
    state = dict(payload["state_dict"])
    for name, q in payload.get("int8_weights", {}).items():
        state[name] = dequantize_int8(q, payload["int8_scales"][name])
    return state


def int8_checkpoint_bytes(model: nn.Module) -> int:
    """Tensor bytes of the int8 storage: linear weights 1 byte per element plus a 4-byte scale per row, the rest 4 bytes
    per element. The file adds the zip archive's headers (a few hundred bytes per tensor)."""
    linear = set(linear_weight_names(model))
    return sum(v.numel() + 4 * v.shape[0] if k in linear else 4 * v.numel() for k, v in model.state_dict().items())


def load_checkpoint(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu") -> nn.Module:
    """The trained DiT in eval mode, fp32 (an int8 checkpoint dequantized: the model it ships)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    model = build(payload["model"], **payload["overrides"])
    model.load_state_dict(payload_state_dict(payload))
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


@dataclass
class TrainingData:
    split: dict[str, Tensor]
    """Fixed images: ``x_train`` / ``y_train`` (the training loss), ``x_test`` / ``y_test`` (the held-out loss)."""
    draw: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    """(batch size, generator) -> a training batch (x, y) on the training device."""
    description: dict[str, Any]


def digits_data(device: torch.device) -> TrainingData:
    split = load_digits_split(device)
    x_train, y_train = split["x_train"], split["y_train"]

    def draw(batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, x_train.shape[0], (batch,), generator=gen, device=gen.device).to(device)
        return x_train[idx], y_train[idx]

    description = {"dataset": "sklearn load_digits", "train": len(y_train), "test": len(split["y_test"]),
                   "split_seed": SPLIT_SEED}
    return TrainingData(split, draw, description)


def photo_data(device: torch.device, source: str | Path | None) -> TrainingData:
    pictures = photos.load_photos(source)
    crops = photos.PhotoCrops([pictures[name] for name in photos.TRAIN_PHOTOS], device)
    split = photos.photo_split(pictures, device)

    def draw(batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return crops.sample(batch, gen), torch.zeros(batch, dtype=torch.long, device=device)

    description = {
        "dataset": "photos (benchmarks/photos.py)", "train_photos": list(photos.TRAIN_PHOTOS),
        "heldout_photos": list(photos.HELDOUT_PHOTOS), "short_side": photos.SHORT_SIDE, "crop": photos.CROP,
        "train_fixed_crops": len(split["y_train"]), "test_crops": len(split["y_test"]),
        "source": str(source) if source else "packages", "fingerprint": photos.fingerprint(pictures),
    }
    return TrainingData(split, draw, description)


def resolve(args: argparse.Namespace) -> tuple[Recipe, dict[str, Any]]:
    """Fill the arguments left unset from the dataset's recipe; the model overrides with --hidden & co applied."""
    recipe = RECIPES[args.dataset]
    for name in ("steps", "minutes", "batch", "lr", "ema", "warmup", "label_dropout", "seed", "log_every", "eval_every",
                 "storage", "bf16"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.checkpoint is None:
        args.checkpoint = str(recipe.checkpoint)
    if not args.steps and not args.minutes:
        raise SystemExit("train_dit: give --steps or --minutes")
    overrides = dict(recipe.overrides)
    for name in ("hidden", "depth", "heads", "mlp_ratio"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.hidden is not None and args.heads is None:
        overrides.pop("heads")  # build() then keeps dit-s-2's head width (64), here and when loading
    return recipe, overrides


def train(args: argparse.Namespace) -> None:
    recipe, overrides = resolve(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = digits_data(device) if args.dataset == "digits" else photo_data(device, args.photos)
    schedule = NoiseSchedule.named(SCHEDULE)
    model = build_model(overrides).to(device)
    adaln_zero_init(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=True if device.type == "cuda" else None)
    # Short warmup: adaLN-Zero makes early gradients tiny everywhere but the output layer, and
    # a full-size first step on it is what destabilises small DiTs.
    warmup = args.warmup or max(1, (args.steps or 0) // 20)
    budget_s = args.minutes * 60 if args.minutes else None
    start = time.time()

    def cosine_angle(s: int) -> float:
        angles = [math.pi * min(s, args.steps) / args.steps] if args.steps else []
        if budget_s is not None:
            angles.append(math.pi * min((time.time() - start) / budget_s, 1.0))
        return max(angles)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(cosine_angle(s)))
    )
    gen = torch.Generator(device=device if recipe.draws_on_device else "cpu").manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    checkpoint = Path(args.checkpoint)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    # --eval-images: a prefix of the (shuffled) fixed crops, for smoke runs.
    x_test, y_test = data.split["x_test"][: args.eval_images], data.split["y_test"][: args.eval_images]
    log_rows, running, step = [], [], 0
    while True:
        step += 1
        x, y = data.draw(args.batch, gen)
        # Label dropout trains the unconditional model that classifier-free guidance needs.
        drop = (torch.rand(args.batch, generator=gen, device=gen.device) < args.label_dropout).to(device)
        y = torch.where(drop, torch.full_like(y, overrides["num_classes"]), y)
        # Drawn in denoising_loss's own order (t, then noise), on the generator's device.
        t = torch.randint(0, schedule.steps, (args.batch,), generator=gen, device=gen.device).to(device)
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x)
        with autocast:
            loss = denoising_loss(model, schedule, x, y, t=t, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # EMA weights sample far cleaner than the last iterate; the checkpoint ships them.
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        running.append(loss.detach())  # read at the log step: no host sync per step on a GPU
        last = step == args.steps or (budget_s is not None and time.time() - start >= budget_s)
        if step % args.log_every == 0 or last:
            row = {"step": step, "train_loss": sum(r.item() for r in running) / len(running),
                   "elapsed_s": round(time.time() - start, 1)}
            running = []
            if step % args.eval_every == 0 or last:
                row["heldout_loss_ema"] = heldout_loss(ema, schedule, x_test, y_test)
                torch.save(checkpoint_payload(ema, overrides, args.storage), checkpoint)
            log_rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if last:
            break
    elapsed = time.time() - start

    x_train, y_train = data.split["x_train"][: args.eval_images], data.split["y_train"][: args.eval_images]
    final = {
        "train_loss_ema": heldout_loss(ema, schedule, x_train, y_train, draws=1),
        "heldout_loss_ema": heldout_loss(ema, schedule, x_test, y_test),
    }
    if args.storage == "int8":
        shipped = copy.deepcopy(ema)
        shipped.load_state_dict(payload_state_dict(checkpoint_payload(ema, overrides, "int8")))
        final |= {"train_loss_ema_int8": heldout_loss(shipped, schedule, x_train, y_train, draws=1),
                  "heldout_loss_ema_int8": heldout_loss(shipped, schedule, x_test, y_test)}
    with open(results / f"train_dit_{args.dataset}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train_loss", "heldout_loss_ema", "elapsed_s"])
        writer.writeheader()
        writer.writerows(log_rows)
    summary = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "data": data.description,
        "model": {"name": MODEL_NAME, **overrides, "parameters": sum(p.numel() for p in ema.parameters())},
        "schedule": SCHEDULE,
        "train_seconds": round(elapsed, 1),
        "steps": step,
        "final": final,
        "storage": args.storage,
        "checkpoint_bytes": checkpoint.stat().st_size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.storage == "int8":
        summary["checkpoint_tensor_bytes"] = int8_checkpoint_bytes(ema)
    write_json(summary, results / f"train_dit_{args.dataset}.json")
    print(json.dumps(summary, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Unset options take the dataset's recipe (RECIPES).")
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", default=None, metavar="NPZ",
                        help="read the photos from this export of photos.py (default: the packages)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the training loop")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ema", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--label-dropout", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-images", type=int, help="score the losses on this many fixed images (default: all)")
    parser.add_argument("--storage", choices=("fp32", "int8"))
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--mlp-ratio", type=float)
    parser.add_argument("--checkpoint", help="where to write the checkpoint (default: the dataset's under checkpoints/)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of train_dit_<dataset>.{csv,json}")
    return parser


def main(argv: list[str] | None = None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
