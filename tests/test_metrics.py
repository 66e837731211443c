"""The error measures: relative error of one tensor, and of a model's whole output."""

import math

import pytest
import torch

from lynx_compile.metrics import output_error, relative_error


def test_relative_error_is_the_norm_of_the_difference_over_the_reference_norm():
    reference = torch.tensor([3.0, 4.0])
    assert relative_error(torch.tensor([3.0, 5.0]), reference) == pytest.approx(1 / 5, rel=1e-12)
    assert relative_error(reference, reference) == 0.0
    assert relative_error(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) == 0.0  # computed in float64


def test_relative_error_against_a_zero_reference_stays_finite_only_when_equal():
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3)) > 1e20


def test_output_error_pools_every_tensor_of_a_nested_output():
    reference = {"sample": torch.tensor([3.0, 0.0]), "extra": (torch.tensor([0.0, 4.0]), "not a tensor")}
    output = {"sample": torch.tensor([3.0, 0.0]), "extra": (torch.tensor([0.0, 5.0]), "not a tensor")}
    assert output_error(output, reference) == pytest.approx(1 / 5, rel=1e-6)  # ||(0, 1)|| / ||(3, 4)||
    assert output_error(reference, reference) == 0.0


def test_output_error_against_a_zero_reference():
    assert output_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert math.isinf(output_error(torch.ones(2), torch.zeros(2)))
