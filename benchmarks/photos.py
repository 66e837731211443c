"""Crops of real colour photographs for the photo DiT (``checkpoints/dit_photos.pt``).

The photographs are the colour photos that ship inside the scikit-image and scikit-learn wheels,
so they install offline from PyPI and nothing is fetched at run time. Synthetic images (colour
wheel, logo, phantoms, blobs), greyscale scans and images scikit-image downloads on demand are
left out. The split is by photograph: ``HELDOUT_PHOTOS`` are never seen in training.

    training  astronaut, coffee, rocket, motorcycle_left, motorcycle_right (the two views of one
              stereo pair, so both on the same side), flower, hubble_deep_field,
              immunohistochemistry, retina
    held out  chelsea (a cat, scikit-image), china (a temple, scikit-learn)

Each photo is downscaled (Lanczos) so that its short side is ``SHORT_SIDE`` = 128 px: a 32x32
crop then covers a quarter of the short side and shows recognisable structure (an eye, a cup's
rim, a wheel) rather than flat colour. Pixels go to [-1, 1].

* Training draws random 32x32 crops, every valid position of every training photo equally likely,
  flipped horizontally half the time (``PhotoCrops``, on the training device).
* Evaluation uses fixed crops: a grid with stride ``TEST_STRIDE`` over the held-out photos
  (546 crops), shuffled once with a fixed seed so that any prefix mixes both photos.
  ``load_photo_split()`` returns them with the same keys as ``train_dit.load_digits_split()``:
  ``x_train`` (a grid with stride ``TRAIN_STRIDE`` over the training photos: calibration and the
  training loss), ``x_test``, and labels ``y_*`` that are all 0 (the model is unconditional).

A machine without the packages' images reads them from one small file instead, written by

    python benchmarks/photos.py --export .gpu/photos.npz

(uint8, the downscaled photos, about 0.6 MB; kept out of git). Every loader takes
``source=<that file>``; without it the packages are read, and where they fail the file at
``DEFAULT_EXPORT`` is used if it exists. ``fingerprint()`` names the exact pixels either way.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = ROOT / ".gpu" / "photos.npz"

SHORT_SIDE = 128
CROP = 32
TRAIN_STRIDE = 16
TEST_STRIDE = 8
SHUFFLE_SEED = 0


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _stereo_motorcycle(view: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[view]

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _stereo_motorcycle(0),
    "motorcycle_right": _stereo_motorcycle(1),
    "flower": _sklearn("flower.jpg"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "chelsea": _skimage("chelsea"),
    "china": _sklearn("china.jpg"),
}
"""Every photo, by name, as the package loads it ((H, W, 3) uint8 RGB, full size)."""

HELDOUT_PHOTOS = ("chelsea", "china")
TRAIN_PHOTOS = tuple(name for name in SOURCES if name not in HELDOUT_PHOTOS)


def downscale(photo: np.ndarray, short_side: int = SHORT_SIDE) -> np.ndarray:
    """(H, W, 3) uint8 -> the same photo with its short side ``short_side`` px (Lanczos), uint8."""
    from PIL import Image

    height, width = photo.shape[:2]
    scale = short_side / min(height, width)
    size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
    return np.array(Image.fromarray(photo[..., :3]).resize(size, Image.Resampling.LANCZOS))


def _from_packages() -> dict[str, np.ndarray]:
    return {name: downscale(load()) for name, load in SOURCES.items()}


def load_photos(source: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every photo of ``SOURCES``, downscaled, as (H, W, 3) uint8, in ``SOURCES`` order.

    ``source``: an exported ``.npz``; None reads the packages, falling back to ``DEFAULT_EXPORT``.
    """
    if source is None:
        try:
            return _from_packages()
        except Exception as err:  # noqa: BLE001 - any missing package or image: the exported file, if there is one
            if not DEFAULT_EXPORT.exists():
                raise RuntimeError(f"photos: the packages' images do not load ({type(err).__name__}: {err}) and "
                                   f"there is no {DEFAULT_EXPORT}; write it where they do: "
                                   "python benchmarks/photos.py --export") from err
            source = DEFAULT_EXPORT
    with np.load(source) as archive:
        missing = [name for name in SOURCES if name not in archive.files]
        if missing:
            raise ValueError(f"photos: {source} lacks {', '.join(missing)}")
        return {name: archive[name] for name in SOURCES}


def export(path: str | Path = DEFAULT_EXPORT, photos: dict[str, np.ndarray] | None = None) -> Path:
    """Write the downscaled photos (``photos``, or read from the packages) to one uint8 ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if photos is None:
        photos = _from_packages()
    np.savez_compressed(path, **photos)
    return path


def fingerprint(photos: dict[str, np.ndarray]) -> str:
    """sha256 (first 16 hex digits) of the names, shapes and pixels: whether two runs saw the same data."""
    digest = hashlib.sha256()
    for name, photo in photos.items():
        digest.update(f"{name}:{photo.shape}".encode())
        digest.update(np.ascontiguousarray(photo).tobytes())
    return digest.hexdigest()[:16]


def to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def grid_crops(photos: list[np.ndarray], stride: int, size: int = CROP) -> Tensor:
    """Every ``size`` x ``size`` crop on a grid with ``stride`` over each photo, as (B, 3, size, size) uint8."""
    crops = []
    for photo in photos:
        pixels = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)
        windows = pixels.unfold(1, size, stride).unfold(2, size, stride)  # (3, rows, cols, size, size)
        crops.append(windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size))
    return torch.cat(crops)


def load_photo_split(device: str | torch.device = "cpu", source: str | Path | None = None) -> dict[str, Tensor]:
    """Fixed crops as (B, 3, 32, 32) images in [-1, 1], with the keys of ``train_dit.load_digits_split``.

    ``x_test``: every crop with stride ``TEST_STRIDE`` of the held-out photos; ``x_train``: with
    stride ``TRAIN_STRIDE`` of the training photos. Each is shuffled once (``SHUFFLE_SEED``) so a
    prefix mixes the photos. Labels are all 0: the photo model has one class.
    """
    return photo_split(load_photos(source), device)


def photo_split(photos: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """``load_photo_split`` of photos already loaded."""
    gen = torch.Generator().manual_seed(SHUFFLE_SEED)
    split = {}
    for name, names, stride in (("train", TRAIN_PHOTOS, TRAIN_STRIDE), ("test", HELDOUT_PHOTOS, TEST_STRIDE)):
        crops = grid_crops([photos[n] for n in names], stride)
        crops = crops[torch.randperm(crops.shape[0], generator=gen)]
        split[f"x_{name}"] = to_unit_range(crops).to(device)
        split[f"y_{name}"] = torch.zeros(crops.shape[0], dtype=torch.long, device=device)
    return split


class PhotoCrops:
    """Random training crops, drawn on the device of the generator passed to ``sample``.

    Every valid crop position of every photo is equally likely (a photo is chosen in proportion to
    its number of positions); a horizontal flip is applied with probability one half.
    """

    def __init__(self, photos: list[np.ndarray], device: str | torch.device = "cpu", size: int = CROP):
        self.size = size
        height = max(p.shape[0] for p in photos)
        width = max(p.shape[1] for p in photos)
        padded = torch.zeros((len(photos), height, width, 3), dtype=torch.uint8)
        for i, photo in enumerate(photos):
            padded[i, : photo.shape[0], : photo.shape[1]] = torch.from_numpy(np.ascontiguousarray(photo))
        self.pixels = padded.to(device)
        self.rows = torch.tensor([p.shape[0] - size + 1 for p in photos], device=device)
        self.cols = torch.tensor([p.shape[1] - size + 1 for p in photos], device=device)
        self.weights = (self.rows * self.cols).double()

    def sample(self, batch: int, generator: torch.Generator, flip: bool = True) -> Tensor:
        """(batch, 3, size, size) float32 in [-1, 1]; no host synchronisation when the generator is on the GPU."""
        device = generator.device
        photo = torch.multinomial(self.weights.to(device), batch, replacement=True, generator=generator)
        # floor(u * n) with u < 1 can still round up to n in float32: clamp to the last position.
        top = (torch.rand(batch, generator=generator, device=device) * self.rows[photo]).long()
        left = (torch.rand(batch, generator=generator, device=device) * self.cols[photo]).long()
        top, left = torch.minimum(top, self.rows[photo] - 1), torch.minimum(left, self.cols[photo] - 1)
        offsets = torch.arange(self.size, device=device)
        flipped = torch.rand(batch, generator=generator, device=device) < (0.5 if flip else 0.0)
        columns = torch.where(flipped[:, None], self.size - 1 - offsets, offsets)
        rows = top[:, None] + offsets  # (B, size)
        columns = left[:, None] + columns  # (B, size)
        crops = self.pixels[photo[:, None, None], rows[:, :, None], columns[:, None, :]]  # (B, size, size, 3)
        return to_unit_range(crops.permute(0, 3, 1, 2))


def training_crops(device: str | torch.device = "cpu", source: str | Path | None = None) -> PhotoCrops:
    """The random-crop sampler over ``TRAIN_PHOTOS``."""
    photos = load_photos(source)
    return PhotoCrops([photos[name] for name in TRAIN_PHOTOS], device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", nargs="?", const=str(DEFAULT_EXPORT), metavar="PATH",
                        help=f"write the downscaled photos to PATH (default {DEFAULT_EXPORT.relative_to(ROOT)})")
    args = parser.parse_args()
    photos = load_photos()
    for name, photo in photos.items():
        print(f"{name:22s} {photo.shape[0]:4d} x {photo.shape[1]:4d}  {'held out' if name in HELDOUT_PHOTOS else 'training'}")
    print(f"fingerprint {fingerprint(photos)}")
    if args.export:
        path = export(args.export, photos)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
