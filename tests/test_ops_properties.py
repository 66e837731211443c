"""Property tests (hypothesis) of the lynx ops: any shape, dtype and value, ties, ±0, subnormals, inf, NaN."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lynx_compile.ops as ops

PATTERNS = st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 2)])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 5e-324, float("inf"), float("-inf"), float("nan"), 3.0, -3.0]


@st.composite
def activations(draw):
    n, m = draw(PATTERNS)
    dtype = draw(DTYPES)
    rows = draw(st.integers(0, 5))
    groups = draw(st.integers(1, 6))
    size = rows * groups * m
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32)), min_size=size, max_size=size))
    x = torch.tensor(values, dtype=torch.float64).reshape(rows, groups * m).to(dtype)
    return x, n, m


def expected_keep(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Top-n by magnitude per group with NaN first, ties to the lower index: a plain Python sort."""
    keep = torch.zeros(x.shape, dtype=torch.bool)
    for r in range(x.shape[0]):
        for g in range(x.shape[1] // m):
            entries = [abs(float(x[r, g * m + i])) for i in range(m)]
            nan = [math.isnan(e) for e in entries]
            order = sorted(range(m), key=lambda i: (not nan[i], 0 if nan[i] else -entries[i], i))
            for i in order[:n]:
                keep[r, g * m + i] = True
    return keep


@settings(max_examples=150, deadline=None)
@given(activations())
def test_keeps_exactly_the_top_n_by_magnitude_ties_to_the_lower_index(case):
    x, n, m = case
    mask = ops.keep_mask(x, n, m)
    assert (mask.reshape(x.shape[0], x.shape[1] // m, m).sum(-1) == n).all()
    assert torch.equal(mask, expected_keep(x, n, m))
    kept, scale = torch.ops.lynx.sparsify(x, n, m, True)
    assert torch.equal(kept.isnan(), (x.isnan() & mask))
    finite_rows = torch.isfinite(x.float()).all(-1)
    assert torch.isfinite(scale[finite_rows]).all(), "the scale is finite for every finite token, all-zero ones included"


@settings(max_examples=80, deadline=None)
@given(activations(), st.integers(1, 5), st.booleans())
def test_sparse_linear_is_the_masked_dense_product(case, out_features, norm):
    x, n, m = case
    torch.manual_seed(0)
    w = torch.randn(out_features, x.shape[1]).to(x.dtype)
    out = torch.ops.lynx.sparse_linear(x, w, None, n, m, norm)
    kept, scale = ops.sparsify_reference(x, n, m, norm, ops.NORM_EPS)
    expected = ((kept.double() @ w.double().t()) * scale.double()).to(x.dtype)
    assert out.shape == (x.shape[0], out_features) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=2e-2 if x.dtype != torch.float32 else 1e-4, atol=1e-3)
    rows_with_nan = x.isnan().any(-1)
    assert out[rows_with_nan].isnan().all(), "a NaN anywhere in a token poisons its output row"


@settings(max_examples=60, deadline=None)
@given(activations(), st.integers(1, 5), st.booleans())
def test_sparse_linear_e4m3_is_the_quantized_masked_product(case, out_features, norm):
    """The e4m3 op is the masked product of the per-token e4m3 kept values and the per-channel e4m3 weight, and a
    non-finite token comes out non-finite."""
    x, n, m = case
    torch.manual_seed(0)
    w8, w_scale = ops.quantize_weight_e4m3(torch.randn(out_features, x.shape[1]))
    out = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, None, n, m, norm, ops.NORM_EPS)
    kept, scale = ops.sparsify_reference(x, n, m, norm, ops.NORM_EPS)
    amax = kept.double().abs().amax(dim=-1, keepdim=True)
    q = (kept.double() * torch.where(amax > 0, 448 / amax, 0)).clamp(-448, 448).to(ops.E4M3)
    expected = (q.double() @ (w8.double() * w_scale.double()[:, None]).t()) * scale.double() * amax / 448
    assert out.shape == (x.shape[0], out_features) and out.dtype == x.dtype
    finite = torch.isfinite(x).all(-1)
    torch.testing.assert_close(out[finite], expected[finite].to(x.dtype), rtol=2e-2, atol=1e-3)
    assert not torch.isfinite(out[~finite]).any(), "a token holding inf or NaN never comes out finite"
