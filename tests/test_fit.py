"""The LoRA fit on CPU: reservoir sampling, the closed form against a float64 reference, its linear algebra."""

import pytest
import torch
from conftest import relative_error

from lynx_compile import fit
from lynx_compile.fit import NormalEquations, Reservoir, fit_lora, refine, top_right_singular_vectors


def reference_fit(x, residual, rank, ridge):
    """The fit's formula written out in float64: C = (X^T X + lam I)^-1 X^T R with lam relative to
    mean(diag(X^T X)), V = top right singular vectors of X C (full SVD), A = (C V)^T, B = V."""
    x, residual = x.double(), residual.double()
    gram = x.t() @ x
    coef = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype), x.t() @ residual)
    _, _, vh = torch.linalg.svd(x @ coef, full_matrices=False)
    top = vh[:rank].t()
    return (coef @ top).t(), top


def outlier_problem(rows, in_features, out_features, seed=0):
    """Correlated features whose scales span three orders of magnitude (as activation outliers do),
    and a residual that is a rank-8 map of them with a decaying spectrum, plus noise."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 3, in_features, dtype=torch.float64)[torch.randperm(in_features, generator=g)]
    mix = torch.eye(in_features, dtype=torch.float64) + 0.3 * torch.randn(in_features, in_features, generator=g,
                                                                           dtype=torch.float64) / in_features**0.5
    x = (torch.randn(rows, in_features, generator=g, dtype=torch.float64) @ mix) * scales
    spectrum = torch.logspace(0, -1, 8, dtype=torch.float64).unsqueeze(1)
    truth = torch.randn(in_features, 8, generator=g, dtype=torch.float64) @ (
        spectrum * torch.randn(8, out_features, generator=g, dtype=torch.float64))
    residual = x @ truth / scales.mean() + 3 * torch.randn(rows, out_features, generator=g, dtype=torch.float64)
    return x.float(), residual.float()


def test_reservoir_is_bounded_and_samples_all_rows_uniformly():
    reservoir = Reservoir(200, torch.Generator().manual_seed(0))
    for start in range(0, 4000, 100):
        reservoir.add(torch.arange(start, start + 100, dtype=torch.float32).unsqueeze(1).expand(100, 4))
    rows = reservoir.sample()
    assert rows.shape == (200, 4) and reservoir.seen == 4000
    assert rows[:, 0].unique().numel() == 200
    assert 1500 < rows[:, 0].mean().item() < 2500  # uniform over 0..3999, not the first rows


def test_closed_form_recovers_a_low_rank_linear_residual_and_adam_does_not_undo_it():
    torch.manual_seed(0)
    x = torch.randn(512, 48)
    truth = torch.randn(48, 4) @ torch.randn(4, 40)  # rank 4
    residual = x @ truth
    down, up = fit_lora(x, residual, 4, ridge=1e-9)
    assert down.shape == (4, 48) and up.shape == (40, 4)
    assert relative_error(x @ down.t() @ up.t(), residual) < 1e-5
    noisy = residual + 0.3 * torch.randn_like(residual)
    down, up = fit_lora(x, noisy, 4, ridge=1e-9)
    loss = ((x @ down.t() @ up.t() - noisy) ** 2).mean()
    refined = refine(x, noisy, down, up, steps=20, lr=1e-3)
    assert ((x @ refined[0].t() @ refined[1].t() - noisy) ** 2).mean() >= loss * (1 - 1e-4)  # already optimal


@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 1.0])
@pytest.mark.parametrize(("in_features", "out_features"), [(128, 384), (384, 128)])  # both solve paths: K <= N, K > N
def test_fit_matches_a_float64_reference_of_the_same_formula(in_features, out_features, ridge):
    x, residual = outlier_problem(1024, in_features, out_features)
    down, up = fit_lora(x, residual, 8, ridge)
    ref_down, ref_up = reference_fit(x, residual, 8, ridge)
    assert down.shape == (8, in_features) and up.shape == (out_features, 8) and down.dtype == up.dtype == torch.float32
    product, ref_product = down.t() @ up.t(), ref_down.t() @ ref_up.t()
    assert relative_error(product, ref_product) < 1e-5
    assert relative_error(x @ product, x.double() @ ref_product) < 1e-5


def test_the_problem_needs_float64_normal_equations():
    """The same formula solved in float32 misses the reference on this problem by over ten times
    the tolerance the fit meets, so the tests above do check the float64 solve."""
    x, residual = outlier_problem(1024, 384, 128)
    ref_down, ref_up = reference_fit(x, residual, 8, 1e-6)
    gram = x.t() @ x
    coef = torch.linalg.solve(gram + 1e-6 * gram.diagonal().mean() * torch.eye(384), x.t() @ residual)
    _, _, vh = torch.linalg.svd(x @ coef, full_matrices=False)
    assert relative_error(coef @ vh[:8].t() @ vh[:8], ref_down.t() @ ref_up.t()) > 1e-4


@pytest.mark.parametrize(("in_features", "out_features"), [(48, 96), (96, 48)])
def test_a_singular_unregularised_fit_is_refused(in_features, out_features):
    torch.manual_seed(0)
    x = torch.randn(20, in_features)  # fewer rows than features: x^T x is singular
    with pytest.raises(ValueError, match="singular at ridge=0 .*use a ridge > 0"):
        fit_lora(x, torch.randn(20, out_features), 4, ridge=0.0)
    down, up = fit_lora(x, torch.randn(20, out_features), 4, ridge=1e-2)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()


@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_top_right_singular_vectors_span_the_svds_top_subspace(shape):
    torch.manual_seed(0)
    matrix = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    top = top_right_singular_vectors(matrix, 6)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert top.shape == (shape[1], 6)
    torch.testing.assert_close(top.t() @ top, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(top @ top.t(), vh[:6].t() @ vh[:6], rtol=0, atol=1e-9)  # same projector


def test_top_right_singular_vectors_of_a_rank_deficient_matrix_are_zero_beyond_its_rank():
    torch.manual_seed(0)
    matrix = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 90, dtype=torch.float64)  # rank 2, K < N
    top = top_right_singular_vectors(matrix, 5)
    assert top[:, 2:].abs().max() == 0 and torch.isfinite(top).all()
    torch.testing.assert_close(matrix @ top[:, :2] @ top[:, :2].t(), matrix, rtol=0, atol=1e-9)


def test_normal_equations_add_up_over_row_blocks():
    torch.manual_seed(0)
    x, residual = torch.randn(60, 12), torch.randn(60, 5)
    whole = NormalEquations.of(x, residual)
    parts = NormalEquations.of(x[:25], residual[:25]) + NormalEquations.of(x[25:], residual[25:])
    assert whole.gram.dtype == whole.cross.dtype == torch.float64
    torch.testing.assert_close(parts.gram, whole.gram)
    torch.testing.assert_close(parts.cross, whole.cross)


@pytest.mark.parametrize(("in_features", "out_features"), [(32, 64), (64, 32)])
def test_cpu_decompositions_run_on_one_thread_and_the_thread_count_comes_back(monkeypatch, in_features, out_features):
    """A multithreaded float64 eigensolver spin-waits on busy cores: the fit's run on one thread."""
    threads_seen, eigh = [], torch.linalg.eigh

    def recording_eigh(matrix):
        threads_seen.append(torch.get_num_threads())
        return eigh(matrix)

    monkeypatch.setattr(fit.torch.linalg, "eigh", recording_eigh)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_lora(torch.randn(200, in_features), torch.randn(200, out_features), 4, 1e-2)
        assert threads_seen and set(threads_seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
