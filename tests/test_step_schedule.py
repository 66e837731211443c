"""benchmarks/step_schedule.py on the shipped digits DiT: the loss bookkeeping and the layers x steps FLOP shares,
not the figures."""

import importlib
import math
import sys

import pytest
import torch
from conftest import BENCHMARKS

from lynx_compile import LynxConfig, StepSchedule

pytest.importorskip("sklearn", reason="the harness reads the digits data from scikit-learn")

sys.path.insert(0, str(BENCHMARKS))
step_schedule = importlib.import_module("step_schedule")

STEPS = 3


@pytest.fixture(scope="module")
def output():
    args = ["--steps", str(STEPS), "--samples", "2", "--calibration-samples", "1", "--fractions", "0,0.67,1",
            "--compensation", "lora", "--dense-flop-budgets", "0,0.3", "--calibration-batches", "1",
            "--calibration-batch", "8", "--lora-rank", "4", "--heldout-images", "16", "--training-images", "16",
            "--no-inductor"]
    return step_schedule.run(step_schedule.parse_args(args))


def test_a_budget_keeps_layers_dense_and_the_flop_share_counts_layers_and_steps(output):
    every, budget = output["layer_configs"]
    assert every["name"] == "every selected layer" and every["sparse_layer_flop_share"] == 1.0
    assert budget["dense_flop_budget"] == 0.3 and budget["dense_layers_by_budget"]
    assert set(budget["sparse_layers"]).isdisjoint(budget["dense_layers_by_budget"])
    assert set(budget["sparse_layers"]) | set(budget["dense_layers_by_budget"]) == set(every["sparse_layers"])
    assert 0.7 - 1e-9 <= budget["sparse_layer_flop_share"] < 1.0
    shares = {config["name"]: config["sparse_layer_flop_share"] for config in output["layer_configs"]}
    for row in output["rows"]:
        assert math.isclose(row["sparse_flop_share"], shares[row["layer_config"]] * row["sparse_fraction"])
    strategies = {row["strategy"] for row in output["rows"]}
    assert strategies == set(step_schedule.STRATEGIES)  # training data given: the training-loss ranking too


def test_all_dense_steps_score_as_dense_and_the_target_is_read_off_the_rows(output):
    for row in output["rows"]:
        if row["sparse_fraction"] == 0:
            assert row["heldout_loss_change_pct"] == 0.0 and row["rel_error"] == 0.0
    target = output["target"]
    best = target["best_at_flop_share_target"]
    at_share = [r for r in output["rows"] if r["sparse_flop_share"] >= step_schedule.FLOP_SHARE_TARGET - 1e-9]
    assert best["heldout_loss_change_pct"] == min(r["heldout_loss_change_pct"] for r in at_share)
    assert target["met"] == (best["heldout_loss_change_pct"] <= step_schedule.LOSS_BOUND_PCT)


def test_step_costs_add_up_to_the_whole_runs_loss_increase(digits_split):
    model, noise_schedule = step_schedule.load_model(step_schedule.DIGITS_CHECKPOINT, torch.device("cpu"))
    sampler = step_schedule.Sampler(model, noise_schedule, torch.device("cpu"), STEPS, 1.0,
                                    LynxConfig(speed_guard=False), inductor=False)
    loss = step_schedule.DenoisingLoss(sampler, digits_split["x_test"][:24], digits_split["y_test"][:24], draws=1)
    costs = loss.step_costs()
    all_sparse, all_dense = loss(StepSchedule(STEPS)), loss(StepSchedule(STEPS, range(STEPS)))
    assert len(costs) == STEPS and all_sparse != all_dense
    assert math.isclose(sum(costs), all_sparse - all_dense, rel_tol=1e-4, abs_tol=1e-9)
    # Keeping one step dense removes exactly that step's share.
    assert math.isclose(loss(StepSchedule(STEPS, {1})), all_sparse - costs[1], rel_tol=1e-4, abs_tol=1e-9)


@pytest.fixture(scope="module")
def digits_split():
    return step_schedule.load_digits_split("cpu")
