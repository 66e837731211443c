"""Data-parallel generation: each torchrun rank compiles its own lynx model and samples its own
prompts; rank 0 gathers the images.

    torchrun --nproc-per-node=2 benchmarks/generate_parallel.py --labels 0 1 2 3 4 5 6 7 8 9
    python benchmarks/generate_parallel.py                  # one process, the same images

The model is the shipped digits DiT (``checkpoints/dit_digits.pt``) and a prompt is a class
label. Prompt i is dealt to rank i % world and starts from the noise of seed i, and lynx
sparsifies every token on its own, so the images do not depend on how many ranks share the work.
With several GPUs each rank takes ``cuda:LOCAL_RANK``; without GPUs the ranks run on CPU (gloo).

Writes ``results/generate-parallel.png`` (one row of digits, in prompt order) and prints the time
each rank spent sampling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dit import CHECKPOINT, NULL_CLASS, RESULTS, SCHEDULE, load_checkpoint  # noqa: E402

from lynx_compile.diffusion import NoiseSchedule, ddim_sample  # noqa: E402


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def generate(labels: list[int], steps: int = 50, guidance_scale: float = 2.0, backend: str | Callable = "lynx",
             device: str | torch.device = "cpu", checkpoint: Path = CHECKPOINT) -> dict[str, Any]:
    """Sample one image per label, this rank's share only, and gather them on every rank.

    Returns ``images`` (all prompts, in prompt order), ``labels``, ``per_rank`` (prompts each rank
    took) and ``seconds`` (each rank's sampling time, compile included)."""
    rank, world = _rank_world()
    mine = list(range(rank, len(labels), world))
    model = load_checkpoint(checkpoint, device)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    size = (model.config.in_channels, model.config.input_size, model.config.input_size)
    noise = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(i)) for i in mine]).to(device)
    start = time.perf_counter()
    images = ddim_sample(compiled, NoiseSchedule.named(SCHEDULE), noise, torch.tensor([labels[i] for i in mine], device=device),
                         steps=steps, guidance_scale=guidance_scale, null_class=NULL_CLASS)
    seconds = time.perf_counter() - start
    shares: list[Any] = [(mine, images.cpu(), seconds)]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, (mine, images.cpu(), seconds))
    ordered = torch.empty((len(labels), *size))
    for indices, share, _ in shares:
        ordered[indices] = share
    return {"images": ordered, "labels": list(labels), "per_rank": [len(s[0]) for s in shares],
            "seconds": [s[2] for s in shares]}


def save_row(images: torch.Tensor, path: Path, zoom: int = 6) -> None:
    from PIL import Image

    cell, gap = 8 * zoom, 2
    row = Image.new("L", (len(images) * (cell + gap) + gap, cell + 2 * gap), color=255)
    for i, image in enumerate(images):
        digit = ((1 - image[0].clamp(-1, 1)) * 127.5).round().byte().numpy()  # dark ink on white
        row.paste(Image.fromarray(digit, mode="L").resize((cell, cell), Image.NEAREST), (gap + i * (cell + gap), gap))
    row.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=list(range(10)), help="one prompt (class label) per image")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--backend", default="lynx", help="torch.compile backend of every rank")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate-parallel.png")
    args = parser.parse_args()
    if "RANK" in os.environ:
        from lynx_compile.parallel import init_distributed

        rank, _, device = init_distributed()
    else:
        rank, device = 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = generate(args.labels, args.steps, backend=args.backend, device=device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        save_row(result["images"], args.out)
        for r, (count, seconds) in enumerate(zip(result["per_rank"], result["seconds"])):
            print(f"rank {r}: {count} prompts in {seconds:.1f} s (compile included)")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
