"""The quality harness on the shipped digits DiT: orderings that must hold, not exact figures."""

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
VARIANT_NAMES = ("dense", "weight 2:4", "act 2:4", "act 2:4 + norm", BY_MODEL_ERROR, "fp8 act 2:4 + norm")


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


def test_sample_grid_and_json(output, tmp_path):
    path = tmp_path / "grid.png"
    quality.sample_grid(output, path)
    from PIL import Image

    with Image.open(path) as image:
        assert image.height > len(VARIANT_NAMES) * 8 * 6
    text = quality.table(output)
    assert all(name in text for name in VARIANT_NAMES)
    json.dumps(quality.json_ready(output))  # the tensors are left out, the rest serialises


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
