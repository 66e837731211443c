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


def test_e4m3_weight_quantization_is_per_output_channel():
    w = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]
    w[2] = 0
    w8, scale = ops.quantize_weight_e4m3(w)
    assert w8.dtype == ops.E4M3 and scale.shape == (6,) and scale.dtype == torch.float32
    assert scale[2] == 1 and (w8[2].float() == 0).all()
    assert torch.allclose(w8.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.full((5,), ops.E4M3_MAX))
    assert relative_error(w8.float() * scale[:, None], w) < 0.05


def test_e4m3_linear_zero_tokens_give_the_bias_and_lora_rides_in_the_gemm():
    torch.manual_seed(0)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    x[1] = 0
    w = torch.randn(64, 128, dtype=torch.bfloat16) / 11
    down, up = torch.randn(8, 128, dtype=torch.bfloat16) / 11, torch.randn(64, 8, dtype=torch.bfloat16) / 3
    b = torch.randn(64, dtype=torch.bfloat16)
    weight_lora, down_padded = ops.pack_lora(w, down, up)
    w8, scale = ops.quantize_weight_e4m3(weight_lora)
    out = torch.ops.lynx.sparse_linear_e4m3(x, w8, scale, b, 2, 4, True, ops.NORM_EPS, down_padded)
    torch.testing.assert_close(out[1], b)
    bf16 = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True, ops.NORM_EPS, down, up)
    assert relative_error(out, bf16) < 0.06


@pytest.mark.parametrize("bad,match", [
    ({"weight": "bf16"}, "float8_e4m3fn"),
    ({"weight_scale": "shape"}, "weight_scale"),
    ({"lora_down": "rank"}, r"in \+ 2r"),
])
def test_e4m3_op_bad_arguments_raise(bad, match):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w8, scale = ops.quantize_weight_e4m3(torch.randn(32, 64))
    lora_down = None
    if bad.get("weight") == "bf16":
        w8 = w8.to(torch.bfloat16)
    if bad.get("weight_scale") == "shape":
        scale = scale[:5]
    if bad.get("lora_down") == "rank":
        lora_down = torch.randn(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lynx.sparse_linear_e4m3(x, w8, scale, None, 2, 4, True, ops.NORM_EPS, lora_down)


def test_e4m3_opcheck():
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    w8, scale = ops.quantize_weight_e4m3(torch.randn(48, 128))
    # torch's schema check compares the e4m3 inputs with allclose, which float8 tensors do not support on CPU.
    torch.library.opcheck(torch.ops.lynx.sparse_linear_e4m3.default, (x, w8, scale, None, 2, 4, True, ops.NORM_EPS),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_e4m3_ops_keep_a_token_of_subnormal_values_finite():
    """448 / amax overflows float32 for amax below about 1.3e-36: such a token quantizes against a floor instead,
    and comes out (about) zero rather than NaN."""
    x = torch.tensor([[0.0, 1e-40, 0.0, -3e-41]])
    w8, scale = ops.quantize_weight_e4m3(torch.randn(3, 4))
    for out in (torch.ops.lynx.sparse_linear_e4m3(x, w8, scale, None, 2, 4, True, ops.NORM_EPS),
                ops.e4m3_linear(x, w8, scale)):
        assert torch.isfinite(out).all() and out.abs().max() < 1e-30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_e4m3_linear_is_the_rowwise_scaled_product(dtype):
    """float32 too: CUDA's rowwise _scaled_mm takes no bias with a float32 output, so the op adds it after."""
    x = torch.randn(2, 7, 64, dtype=dtype)
    x[0, 3] = 0
    w8, scale = ops.quantize_weight_e4m3(torch.randn(32, 64))
    b = torch.randn(32, dtype=dtype)
    out = ops.e4m3_linear(x, w8, scale, b)
    amax = x.float().abs().amax(-1, keepdim=True)
    q, x_scale = ops.quantize_e4m3(x, amax)
    expected = (q.float() * x_scale) @ (w8.float() * scale[:, None]).t() + b.float()
    assert out.shape == (2, 7, 32) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_producer_op_with_an_e4m3_weight_is_the_e4m3_layer_of_the_producer_output():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 128, dtype=torch.bfloat16)
    mul, add = torch.randn(2, 128), torch.randn(2, 128)
    w8, scale = ops.quantize_weight_e4m3(torch.randn(48, 128))
    b = torch.randn(48, dtype=torch.bfloat16)
    out = torch.ops.lynx.producer_sparse_linear(x, "layer_norm", mul, add, 1e-6, w8, b, 2, 4, True, ops.NORM_EPS, scale)
    produced = ops.produce_reference(x, "layer_norm", mul, add, 1e-6)
    assert torch.equal(out, ops.sparse_linear_e4m3(produced, w8, scale, b, 2, 4, True, ops.NORM_EPS))
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        torch.ops.lynx.producer_sparse_linear(x, "gelu", None, None, 0.0, w8.to(torch.bfloat16), b, 2, 4, True,
                                              ops.NORM_EPS, scale)
    torch.library.opcheck(torch.ops.lynx.producer_sparse_linear.default,
                          (x, "layer_norm", mul, add, 1e-6, w8, b, 2, 4, True, ops.NORM_EPS, scale),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
