"""The quality harness on the shipped digits DiT: orderings that must hold, not exact figures.
(The same harness on a photo model: tests/test_photos.py.)"""

import importlib
import json
import math
import sys

import pytest
import torch
from conftest import BENCHMARKS

pytest.importorskip("sklearn", reason="the quality harness needs scikit-learn (digits data, classifier)")

sys.path.insert(0, str(BENCHMARKS))
quality = importlib.import_module("quality")

# The variants whose orderings are asserted; LoRA calibration is tested with calibrate itself.
BY_MODEL_ERROR = f"act 2:4 + norm, B={quality.DENSE_FLOP_BUDGET:g} by model error"
WITH_ATTN_OUT = "act 2:4 + norm, + attn_out"
VARIANT_NAMES = ("dense", "weight 2:4", "act 2:4", "act 2:4 + norm", WITH_ATTN_OUT, BY_MODEL_ERROR, "fp8 act 2:4 + norm")


@pytest.fixture(scope="module")
def output():
    if not quality.CHECKPOINT.exists():
        pytest.fail(f"shipped checkpoint missing: {quality.CHECKPOINT} (benchmarks/train_dit.py makes it)")
    variants = tuple(v for v in quality.VARIANTS if v.name in VARIANT_NAMES)
    return quality.run(quality.QUICK, "cpu", variants=variants, progress=False)


def test_every_variant_measured_and_finite(output):
    assert set(output["variants"]) == set(VARIANT_NAMES)
    assert len(output["layers"]) == 6  # qkv, fc1, fc2 of both blocks, with lynx's default selection
    for name, metrics in output["variants"].items():
        for key, value in metrics.items():
            if isinstance(value, float):
                assert math.isfinite(value), (name, key)
    dense = output["variants"]["dense"]
    assert dense["layer_error_worst"] == 0.0
    sweep = [str(t) for t in quality.QUICK.sweep]
    for name, metrics in output["variants"].items():
        assert list(metrics["heldout_loss_by_t"]) == sweep
        assert name == "dense" or list(metrics["eps_error_by_t"]) == sweep
    # The shipped model has learned the digits: its samples are recognisable.
    assert dense["digit_accuracy"] >= 0.7
    assert output["classifier_test_accuracy"] >= 0.9


def test_norm_compensation_beats_naive_activation_sparsity(output):
    v = output["variants"]
    # On the mean over layers and end to end. Not on every layer: on the attention qkv
    # layers norm compensation is slightly worse (see benchmarks/results/quality-cpu.md).
    assert v["act 2:4 + norm"]["layer_error_mean"] < v["act 2:4"]["layer_error_mean"]
    assert v["act 2:4 + norm"]["eps_error_mean"] < v["act 2:4"]["eps_error_mean"]
    assert v["act 2:4 + norm"]["heldout_loss"] < v["act 2:4"]["heldout_loss"]


def test_activation_sparsity_beats_weight_sparsity_per_layer(output):
    # The paper's claim holds layer by layer (on the dense model's own inputs). End to end it
    # does NOT on this checkpoint: weight 2:4 has the lower noise-prediction error and held-out
    # loss (benchmarks/results/quality-cpu.md), so no end-to-end ordering is asserted here.
    v = output["variants"]
    assert v["act 2:4 + norm"]["layer_error_mean"] < v["weight 2:4"]["layer_error_mean"]
    assert v["act 2:4"]["layer_error_mean"] < v["weight 2:4"]["layer_error_mean"]


def test_budget_ranked_by_model_error_keeps_the_costly_layer_dense(output):
    """Calibration's whole-model sensitivity (training images) singles out the first block's
    MLP up-projection, and keeping it dense removes most of the end-to-end gap."""
    v = output["variants"]
    assert v[BY_MODEL_ERROR]["dense_layers"] == ["blocks.0.mlp.fc1"]
    assert v[BY_MODEL_ERROR]["eps_error_mean"] < 0.6 * v["act 2:4 + norm"]["eps_error_mean"]
    assert v[BY_MODEL_ERROR]["heldout_loss"] < v["weight 2:4"]["heldout_loss"]


def test_fp8_keeps_the_quality_of_the_same_variant(output):
    """Every linear in e4m3 (the sparse ones on the e4m3 op) costs little next to the sparsity itself."""
    v = output["variants"]
    assert v["fp8 act 2:4 + norm"]["heldout_loss"] < quality.FP8_LOSS_RATIO_BOUND * v["act 2:4 + norm"]["heldout_loss"]
    assert v["fp8 act 2:4 + norm"]["eps_error_mean"] < 1.2 * v["act 2:4 + norm"]["eps_error_mean"]


def test_mlp_down_inputs_are_heavy_tailed_and_keep_more_energy_under_2of4_than_weights(output):
    """Why activations tolerate 2:4 where weights do not: after GELU a few large features carry the token."""
    for name in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2"):
        stats = output["layer_statistics"][name]
        assert stats["input_kurtosis"] > 3 > stats["weight_kurtosis"]
        assert stats["input_2of4_energy_kept"] > 0.9 > stats["weight_2of4_energy_kept"]


def test_findings_state_the_ordering_and_the_plain_default(output):
    found = quality.findings(output)
    v = output["variants"]
    # The LoRA variant is not in this run: the ordering is checked on the three measured.
    assert list(found["eps_error_ordering"]) == ["weight 2:4", "act 2:4", "act 2:4 + norm"]
    assert not found["eps_error_ordering_complete"]
    assert found["eps_error_ordering_holds"] == (
        v["weight 2:4"]["eps_error_mean"] > v["act 2:4"]["eps_error_mean"] > v["act 2:4 + norm"]["eps_error_mean"])
    assert found["plain_default_heldout_loss_ratio"] == v["act 2:4 + norm"]["heldout_loss"] / v["dense"]["heldout_loss"]
    assert found["plain_default_psnr_db"] == v["act 2:4 + norm"]["psnr_db"]
    text = quality.findings_text(found)
    assert ("holds" if found["eps_error_ordering_holds"] else "does NOT hold") in text.splitlines()[0]
    assert "plain default" in text.splitlines()[1]


def test_sample_grid_and_json(output, tmp_path):
    path = tmp_path / "grid.png"
    quality.sample_grid(output, path)
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        assert image.height > len(VARIANT_NAMES) * 8 * 6
        pixels = np.asarray(image)
    # The labels end before the samples start: a white margin separates the label column from the first tile.
    columns = quality.QUICK.samples_per_class * 10
    label_width = image.width - columns * (8 * 6 + 2)
    assert (pixels[:, label_width - 4 : label_width] == 255).all()
    assert (pixels[:, : label_width - 4] < 128).any(axis=0).sum() > 100  # and there is text
    text = quality.table(output)
    assert all(name in text for name in VARIANT_NAMES)
    json.dumps(quality.json_ready(output))  # the tensors are left out, the rest serialises


def test_result_file_names_keep_the_digits_ones():
    assert quality.result_stem("digits", "cpu", False) == "quality-cpu"
    assert quality.result_stem("digits", "cpu", True) == "quality-cpu-quick"
    assert quality.grid_name("digits", False) == "quality-samples.png"
    assert quality.result_stem("photos", "cuda:0", False) == "quality-cuda-photos"
    assert quality.grid_name("photos", True) == "quality-samples-photos-quick.png"


def test_ssim_and_psnr_sanity():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    torch.testing.assert_close(quality.ssim(images, images), torch.ones(4, dtype=torch.float64))
    slightly = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
    very = (images + 0.5 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
    assert (quality.ssim(slightly, images) > quality.ssim(very, images)).all()
    assert (quality.psnr(slightly, images) > quality.psnr(very, images)).all()
    # PSNR on the [0, 1] scale: a uniform error of 0.1 there (0.2 in [-1, 1]) is 20 dB.
    torch.testing.assert_close(quality.psnr(torch.full_like(images, 0.2), torch.zeros_like(images)), torch.full((4,), 20.0))


def test_colour_ssim_matches_scikit_image():
    """Per channel, then the mean: scikit-image's Gaussian-weighted SSIM with channel_axis, on valid positions."""
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    images = (reference + 0.3 * torch.randn(reference.shape, generator=gen)).clamp(-1, 1)
    ours = quality.ssim(images, reference, window=11, sigma=1.5)
    theirs = [metrics.structural_similarity(((a + 1) / 2).permute(1, 2, 0).double().numpy(),
                                            ((b + 1) / 2).permute(1, 2, 0).double().numpy(), data_range=1.0,
                                            channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
              for a, b in zip(images, reference)]
    torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float64), atol=1e-6, rtol=0)


def test_the_attn_out_variant_sparsifies_the_output_projections_too(output):
    plain, wider = output["variants"]["act 2:4 + norm"], output["variants"][WITH_ATTN_OUT]
    # The same layers plus attn.proj: a different prediction, and the layer table still lists the default layers.
    assert wider["eps_error_mean"] != plain["eps_error_mean"]
    assert set(wider["layer_errors"]) == set(plain["layer_errors"])
