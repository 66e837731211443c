import pytest
import torch
from conftest import masked_reference, relative_error

import lynx_compile.ops as ops


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_keeps_exactly_n_per_group_and_the_largest(n, m):
    x = torch.randn(5, 7, 8 * m)
    mask = ops.keep_mask(x, n, m)
    groups = mask.reshape(5, 7, 8, m)
    assert (groups.sum(-1) == n).all()
    kept, _ = torch.ops.lynx.sparsify(x, n, m, False)
    assert torch.equal(kept, masked_reference(x, n, m, norm=False))


def test_ties_go_to_the_lower_index_and_signed_zeros_tie():
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, -0.0, 0.0, -0.0, 2.0, -2.0, 2.0, 3.0]])
    mask = ops.keep_mask(x, 2, 4)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False, True, False, False, True]]


def test_nan_ranks_highest_then_inf():
    x = torch.tensor([[1.0, float("nan"), float("-inf"), 5.0]])
    assert ops.keep_mask(x, 2, 4).tolist() == [[False, True, True, False]]
    out = torch.ops.lynx.sparse_linear(x, torch.ones(3, 4), None, 2, 4, True)
    assert torch.isnan(out).all(), "a NaN token must never come out finite"


def test_norm_compensation_restores_the_token_norm_exactly():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    kept, scale = torch.ops.lynx.sparsify(x, 2, 4, True)
    restored = kept.double() * scale.double()
    # exact up to the fp32 rounding of the scale
    torch.testing.assert_close(restored.norm(dim=-1), x.double().norm(dim=-1), rtol=2e-7, atol=0)


def test_all_zero_token_has_finite_zero_scale():
    x = torch.zeros(3, 8)
    _, scale = torch.ops.lynx.sparsify(x, 2, 4, True)
    assert torch.equal(scale, torch.zeros(3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_linear_matches_masked_dense(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64).to(dtype)
    w, b = torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype)
    out = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)
    expected = torch.nn.functional.linear(masked_reference(x.float(), 2, 4, True), w.float(), b.float())
    assert out.dtype == dtype and out.shape == (2, 9, 48)
    assert relative_error(out, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_lora_branch_sees_the_dense_input():
    x, w = torch.randn(10, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    down, up = torch.randn(4, 32, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    out = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True, 1e-12, down, up)
    base = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)
    torch.testing.assert_close(out - base, x @ down.t() @ up.t())


@pytest.mark.parametrize("rank", [6, 32, 40])
def test_packed_lora_computes_the_unfolded_function(rank):
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 7, 64), (24, 64), (24,)))
    down, up = torch.randn(rank, 64, dtype=torch.float64), torch.randn(24, rank, dtype=torch.float64)
    weight_lora, down_padded = ops.pack_lora(w, down, up)
    padded = -(-rank // ops.LORA_RANK_MULTIPLE) * ops.LORA_RANK_MULTIPLE
    assert weight_lora.shape == (24, 64 + 2 * padded) and down_padded.shape == (padded, 64)
    # The layout the kernel relies on: lora_up's columns 2g, 2g+1 at K+4g, K+4g+1; zeros at K+4g+2, K+4g+3.
    groups = weight_lora[:, 64:].reshape(24, padded // 2, 4)
    assert torch.equal(groups[..., 2:], torch.zeros_like(groups[..., 2:]))
    assert torch.equal(groups[..., :2].reshape(24, padded)[:, :rank], up)
    unpacked_w, unpacked_up = ops.unpack_lora_weight(weight_lora, padded)
    assert torch.equal(unpacked_w, w) and torch.equal(unpacked_up[:, :rank], up)
    folded = torch.ops.lynx.sparse_linear_lora(x, weight_lora, b, 2, 4, True, 1e-12, down_padded)
    torch.testing.assert_close(folded, torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True, 1e-12, down, up))


def test_packed_lora_that_does_not_fit_raises_a_clear_error():
    x, w = torch.randn(3, 32), torch.randn(16, 32)
    weight_lora, down = ops.pack_lora(w, torch.randn(4, 32), torch.randn(16, 4))
    with pytest.raises(RuntimeError, match=r"weight_lora \(16, 96\) must be \(out, in \+ 2r\) = \(out, 160\)"):
        torch.ops.lynx.sparse_linear_lora(x, weight_lora, None, 2, 4, True, 1e-12, torch.randn(64, 32))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.lynx.sparse_linear_lora(x, weight_lora, None, 2, 4, True, 1e-12, down.double())


def test_empty_and_single_token_inputs():
    w = torch.randn(8, 16)
    assert torch.ops.lynx.sparse_linear(torch.randn(0, 16), w, None, 2, 4, True).shape == (0, 8)
    assert torch.ops.lynx.sparse_linear(torch.randn(1, 16), w, None, 2, 4, True).shape == (1, 8)


@pytest.mark.parametrize(
    "x,w,match",
    [
        (torch.randn(3, 10), torch.randn(4, 10), "multiple of m"),
        (torch.randn(3, 16), torch.randn(4, 12), "features"),
        (torch.randn(3, 16), torch.randn(4, 16, dtype=torch.float64), "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)


def test_opcheck():
    x, w, b = torch.randn(3, 5, 32), torch.randn(16, 32), torch.randn(16)
    torch.library.opcheck(torch.ops.lynx.sparse_linear.default, (x, w, b, 2, 4, True, 1e-12, None, None))
    torch.library.opcheck(torch.ops.lynx.sparsify.default, (x, 2, 4, True, 1e-12))
    down, up = torch.randn(4, 32), torch.randn(16, 4)
    torch.library.opcheck(torch.ops.lynx.sparse_linear.default, (x, w, None, 1, 4, False, 1e-12, down, up))
    weight_lora, down = ops.pack_lora(w, down, up)
    torch.library.opcheck(torch.ops.lynx.sparse_linear_lora.default, (x, weight_lora, b, 2, 4, True, 1e-12, down))
