"""The photo data, the photo DiT's training script and its int8 checkpoint, and the quality harness on a tiny photo model."""

import importlib
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS

pytest.importorskip("skimage", reason="the photos ship with scikit-image")
pytest.importorskip("sklearn", reason="two of the photos ship with scikit-learn")

sys.path.insert(0, str(BENCHMARKS))
photos = importlib.import_module("photos")
train_dit = importlib.import_module("train_dit")
quality = importlib.import_module("quality")

TINY = ["--hidden", "256", "--depth", "1", "--mlp-ratio", "1"]
"""The smallest photo model whose qkv, fc1 and fc2 all reach lynx's default min_features (256)."""


@pytest.fixture(scope="module")
def pictures():
    return photos.load_photos()


@pytest.fixture(scope="module")
def exported(pictures, tmp_path_factory):
    """The photos as the GPU machine reads them: through an export."""
    return photos.export(tmp_path_factory.mktemp("photos") / "photos.npz", pictures)


@pytest.fixture(scope="module")
def tiny_run(exported, tmp_path_factory):
    """One training step of a tiny photo model on the CPU (the time budget ends the loop), int8 checkpoint."""
    out = tmp_path_factory.mktemp("train")
    checkpoint = out / "tiny.pt"
    train_dit.main(["--dataset", "photos", "--photos", str(exported), "--steps", "50", "--minutes", "0.0001",
                    "--batch", "4", "--eval-images", "8", "--log-every", "1", *TINY,
                    "--checkpoint", str(checkpoint), "--results", str(out)])
    return checkpoint, json.loads((out / "train_dit_photos.json").read_text()), (out / "train_dit_photos.csv").read_text()


def test_split_is_by_photograph(pictures, exported):
    assert set(photos.TRAIN_PHOTOS).isdisjoint(photos.HELDOUT_PHOTOS)
    assert set(photos.TRAIN_PHOTOS) | set(photos.HELDOUT_PHOTOS) == set(photos.SOURCES) == set(pictures)
    # The random-crop sampler holds the training photos, and nothing of a held-out one.
    sampler = photos.training_crops(source=exported)
    assert sampler.pixels.shape[0] == len(photos.TRAIN_PHOTOS)
    for index, name in enumerate(photos.TRAIN_PHOTOS):
        h, w, _ = pictures[name].shape
        assert torch.equal(sampler.pixels[index, :h, :w], torch.from_numpy(pictures[name]))
    # The fixed crops: test crops are exactly the held-out photos' grid, training crops exactly the training photos'.
    split = photos.load_photo_split(source=exported)

    def as_set(images):
        return {bytes(((x + 1) * 127.5).round().byte().numpy().tobytes()) for x in images}

    test, train = as_set(split["x_test"]), as_set(split["x_train"])
    assert test == as_set(photos.to_unit_range(photos.grid_crops([pictures[n] for n in photos.HELDOUT_PHOTOS],
                                                                  photos.TEST_STRIDE)))
    assert train == as_set(photos.to_unit_range(photos.grid_crops([pictures[n] for n in photos.TRAIN_PHOTOS],
                                                                   photos.TRAIN_STRIDE)))
    assert test.isdisjoint(train)


def found_in(crop: torch.Tensor, photo: np.ndarray) -> bool:
    """Whether the (3, S, S) uint8 crop, or its mirror image, is a window of the (H, W, 3) photo."""
    size = crop.shape[-1]
    windows = torch.from_numpy(photo).permute(2, 0, 1).unfold(1, size, 1).unfold(2, size, 1)  # a view: (3, R, C, S, S)
    for candidate in (crop, crop.flip(-1)):
        rows, cols = torch.nonzero((windows[..., 0, 0] == candidate[:, None, None, 0, 0]).all(0), as_tuple=True)
        if (windows[:, rows, cols] == candidate[:, None]).flatten(2).all(2).all(0).any():
            return True
    return False


def test_sampled_crops_come_from_training_photos(pictures, exported):
    sampler = photos.training_crops(source=exported)
    crops = ((sampler.sample(8, torch.Generator().manual_seed(0)) + 1) * 127.5).round().byte()
    for crop in crops:
        assert any(found_in(crop, pictures[name]) for name in photos.TRAIN_PHOTOS)
        assert not any(found_in(crop, pictures[name]) for name in photos.HELDOUT_PHOTOS)


def test_crops_are_shaped_and_in_range(exported):
    split = photos.load_photo_split(source=exported)
    assert split["x_test"].shape == (546, 3, photos.CROP, photos.CROP)
    assert split["x_train"].shape == (574, 3, photos.CROP, photos.CROP)
    for key in ("x_train", "x_test"):
        assert split[key].dtype == torch.float32 and -1 <= split[key].min() < split[key].max() <= 1
    assert not split["y_train"].any() and not split["y_test"].any()
    assert torch.equal(split["x_test"], photos.load_photo_split(source=exported)["x_test"])  # fixed
    sampler = photos.training_crops(source=exported)
    plain = sampler.sample(64, torch.Generator().manual_seed(1), flip=False)
    maybe_flipped = sampler.sample(64, torch.Generator().manual_seed(1))
    assert plain.shape == (64, 3, photos.CROP, photos.CROP) and -1 <= plain.min() < plain.max() <= 1
    mirrored = (maybe_flipped == plain.flip(-1)).flatten(1).all(1)
    assert ((maybe_flipped == plain).flatten(1).all(1) | mirrored).all()
    assert 0 < mirrored.sum() < 64


def test_export_round_trip(pictures, exported):
    loaded = photos.load_photos(exported)
    assert list(loaded) == list(pictures)
    assert photos.fingerprint(loaded) == photos.fingerprint(pictures)
    assert all(p.dtype == np.uint8 and min(p.shape[:2]) == photos.SHORT_SIDE for p in loaded.values())


def test_int8_checkpoint_round_trip(tmp_path):
    overrides = dict(train_dit.PHOTO_OVERRIDES, hidden=128, heads=2, depth=1)
    torch.manual_seed(0)
    model = train_dit.build_model(overrides)
    path = tmp_path / "model.pt"
    payload = train_dit.checkpoint_payload(model, overrides, "int8")
    torch.save(payload, path)
    loaded = train_dit.load_checkpoint(path)
    linear = train_dit.linear_weight_names(model)
    assert set(payload["int8_weights"]) == set(linear) and all(q.dtype == torch.int8 for q in payload["int8_weights"].values())
    # The shipped model is the dequantized one, bit for bit, and each weight is within half a step of the original.
    expected = train_dit.payload_state_dict(payload)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
        if name in linear:
            q, scale = train_dit.quantize_int8(model.state_dict()[name])
            assert torch.equal(tensor, q.float() * scale[:, None])
            assert (tensor - model.state_dict()[name]).abs().le(scale[:, None] / 2 + 1e-7).all()
        else:
            assert torch.equal(tensor, model.state_dict()[name])
    assert loaded.config.num_classes == 1
    tensor_bytes = train_dit.int8_checkpoint_bytes(model)
    assert tensor_bytes <= path.stat().st_size <= tensor_bytes + 4096 + 1024 * len(model.state_dict())


def test_shipped_photo_model_fits_the_size_limit():
    with torch.device("meta"):
        model = train_dit.build_model(train_dit.PHOTO_OVERRIDES)
    headroom = 1024 * len(model.state_dict()) + 4096  # the zip archive's headers
    assert train_dit.int8_checkpoint_bytes(model) + headroom <= train_dit.CHECKPOINT_LIMIT_BYTES
    assert model.config.hidden >= 384 and model.config.depth >= 8
    if train_dit.PHOTO_CHECKPOINT.exists():
        assert train_dit.PHOTO_CHECKPOINT.stat().st_size <= train_dit.CHECKPOINT_LIMIT_BYTES
        payload = torch.load(train_dit.PHOTO_CHECKPOINT, map_location="meta", weights_only=True)
        assert payload["overrides"] == train_dit.PHOTO_OVERRIDES


def test_digits_recipe_is_the_default():
    args = train_dit.build_parser().parse_args([])
    recipe, overrides = train_dit.resolve(args)
    assert overrides == train_dit.MODEL_OVERRIDES
    assert (args.steps, args.minutes, args.batch, args.lr, args.ema, args.storage, args.bf16) == (
        450, None, 64, 1e-3, 0.995, "fp32", False)
    assert args.checkpoint == str(train_dit.CHECKPOINT)


def test_cpu_smoke_training(tiny_run):
    checkpoint, summary, curve = tiny_run
    assert summary["steps"] == 1  # the wall-clock budget ended the loop, not --steps
    assert summary["storage"] == "int8" and summary["data"]["heldout_photos"] == list(photos.HELDOUT_PHOTOS)
    final = summary["final"]
    for key in ("train_loss_ema", "heldout_loss_ema", "train_loss_ema_int8", "heldout_loss_ema_int8"):
        assert math.isfinite(final[key])
    assert curve.splitlines()[0] == "step,train_loss,heldout_loss_ema,elapsed_s" and len(curve.splitlines()) == 2
    model = train_dit.load_checkpoint(checkpoint)
    assert (model.config.hidden, model.config.depth, model.config.in_channels, model.config.num_classes) == (256, 1, 3, 1)
    assert summary["checkpoint_bytes"] == checkpoint.stat().st_size


def test_quality_quick_path_on_a_tiny_photo_model(tiny_run, exported, tmp_path):
    checkpoint, _, _ = tiny_run
    variants = tuple(v for v in quality.VARIANTS if v.name in ("dense",) + quality.ORDERING)
    output = quality.run(quality.PHOTO_QUICK, "cpu", variants=variants, checkpoint=checkpoint, progress=False,
                         model="photos", photo_source=exported)
    assert output["pending"] == {}
    assert set(output["variants"]) == {v.name for v in variants}
    assert output["layers"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert output["classifier_test_accuracy"] is None
    sweep = [str(t) for t in quality.PHOTO_QUICK.sweep]
    assert len(sweep) >= 5
    for name, metrics in output["variants"].items():
        assert "digit_accuracy" not in metrics
        assert list(metrics["heldout_loss_by_t"]) == sweep
        if name != "dense":
            assert list(metrics["eps_error_by_t"]) == sweep
            assert math.isfinite(metrics["psnr_db"]) and -1 <= metrics["ssim"] <= 1
    assert set(output["layer_statistics"]) == set(output["layers"])
    found = quality.findings(output)
    assert found["eps_error_ordering_complete"] and list(found["eps_error_ordering"]) == list(quality.ORDERING)
    assert isinstance(found["eps_error_ordering_holds"], bool)
    assert found["plain_default_heldout_loss_ratio"] > 0
    text = quality.findings_text(found)
    assert "weight 2:4 > act 2:4 > act 2:4 + norm > act 2:4 + norm + LoRA" in text and "plain default" in text
    assert "digit acc" not in quality.table(output)
    grid = tmp_path / "grid.png"
    quality.sample_grid(output, grid)
    from PIL import Image

    with Image.open(grid) as image:
        assert image.mode == "RGB" and image.height >= len(variants) * photos.CROP * 2
    payload = {"command": "python benchmarks/quality.py --model photos --quick", "torch": torch.__version__, "date": "-",
               "device_name": "cpu", "checkpoint": str(checkpoint)}
    summary = quality.markdown(output, payload, quality.table(output), text)
    assert "## Per timestep" in summary and "t=900" in summary
    json.dumps(quality.json_ready(output))
    assert quality.result_stem("photos", "cuda", False) == "quality-cuda-photos"
    assert quality.grid_name("photos", False) == "quality-samples-photos.png"
