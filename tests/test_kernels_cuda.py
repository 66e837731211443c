"""GPU tests of the CUDA kernels (``lynx_compile.kernels``) against the reference ops.

One file, past the usual size: every test shares one loaded kernel library and the same references.

Skipped cleanly where there is no CUDA device, no sm_90 GPU, or the kernel library is unavailable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import relative_error, sparse_kernels_or_skip

from lynx_compile import ops

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def K():
    return sparse_kernels_or_skip()


DTYPES = [torch.bfloat16, torch.float16]
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def decode(values: torch.Tensor, meta: torch.Tensor, M: int, Kf: int) -> torch.Tensor:
    """Dense (M, K) tensor from compressed values + CUTLASS sm90 metadata (layout as in cuda/sparsify.cu)."""
    dev = values.device
    m_pad = (M + 63) // 64 * 64
    m = torch.arange(M, device=dev).view(M, 1)
    g = torch.arange(Kf // 4, device=dev).view(1, -1)
    k = (g // 4) * 16
    am, mi, ak, ki = m // 64, m % 64, k // 128, k % 128
    off = (am * 8192 + ak * m_pad * 128 + ((mi // 8) % 2) * 16 + (ki // 32) * 32 + (mi % 8) * 128
           + ((ki // 16) % 2) * 1024 + (mi // 16) * 2048)
    byte = off // 8 + (g % 4) // 2
    nib = (meta.long()[byte] >> (4 * (g % 2))) & 0xF
    i0, i1 = nib & 3, nib >> 2
    assert bool((i0 < i1).all()), "invalid metadata code"
    dense = torch.zeros((M, Kf), dtype=values.dtype, device=dev)
    dense.scatter_(1, (4 * g + i0).expand(M, -1), values[:, 0::2])
    dense.scatter_(1, (4 * g + i1).expand(M, -1), values[:, 1::2])
    return dense


def reference64(x, w, bias, norm, lora_down=None, lora_up=None):
    kept, scale = ops.sparsify_reference(x, 2, 4, norm, ops.NORM_EPS)
    out = (kept.double() @ w.double().t()) * scale.double()
    if lora_down is not None:
        out = out + (x.double() @ lora_down.double().t()) @ lora_up.double().t()
    if bias is not None:
        out = out + bias.double()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,Kf", [(1, 64), (5, 128), (63, 192), (64, 1152), (200, 1024), (1000, 3072), (70, 4608), (9, 15360),
                                  (3, 20480)])
def test_compress_matches_reference_selection(K, dtype, M, Kf):
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    # ties and signed zeros in some rows
    x[0, :16] = torch.tensor([1, -1, 1, -1, 0, -0.0, 0, -0.0, 2, 2, -2, 1, 0, 0, 0, -0.0], dtype=dtype)
    values, meta, scale = K.compress_2to4(x, True)
    kept, ref_scale = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    dense = decode(values, meta, M, Kf)
    assert torch.equal(dense.view(torch.int16), kept.view(torch.int16)), "compressed values differ"
    assert torch.equal(ops.keep_mask(x, 2, 4), _mask_from(values, meta, M, Kf)), "selection differs"
    torch.testing.assert_close(scale, ref_scale.view(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M,Kf,rank", [(5, 128, 8), (200, 1152, 64), (70, 4608, 32), (3, 20480, 64)])
def test_compress_appends_the_lora_tail_divided_by_the_scale(K, M, Kf, rank):
    x = torch.randn(M, Kf, device="cuda").to(torch.bfloat16)
    x[1] = 0  # s = 0: its tail must be 0, not 0/0
    tail = torch.randn(M, rank, device="cuda").to(torch.bfloat16)
    values, meta, scale = K.compress_2to4(x, True, lora_tail=tail)
    assert values.shape == (M, Kf // 2 + rank)
    dense = decode(values, meta, M, Kf + 2 * rank)
    kept, ref_scale = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    assert torch.equal(dense[:, :Kf].view(torch.int16), kept.view(torch.int16))
    groups = dense[:, Kf:].reshape(M, rank // 2, 4)
    assert torch.equal(groups[..., 2:], torch.zeros_like(groups[..., 2:])), "tail not in entries 0 and 1"
    scale_col = ref_scale.view(-1, 1)
    expected = torch.where(scale_col > 0, tail.float() / scale_col, 0.0)
    torch.testing.assert_close(groups[..., :2].reshape(M, rank).float(), expected, rtol=1e-2, atol=0)


def _mask_from(values, meta, M, Kf):
    # mark kept positions with 1 regardless of value (a kept value can be 0)
    ones = torch.ones_like(values)
    return decode(ones, meta, M, Kf) != 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_nan_inf(K, dtype):
    M, Kf = 8, 128
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    x[1, 0:4] = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    x[2, 4:8] = torch.tensor([float("nan"), float("nan"), float("nan"), 1.0], dtype=dtype)
    x[3, 8:12] = torch.tensor([-float("inf"), 5.0, float("inf"), float("nan")], dtype=dtype)
    x[4] = 0
    values, meta, scale = K.compress_2to4(x, True)
    assert torch.equal(ops.keep_mask(x, 2, 4), _mask_from(values, meta, M, Kf))
    _, ref_scale = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    ref_scale = ref_scale.view(-1)
    assert torch.equal(torch.isfinite(scale), torch.isfinite(ref_scale))
    assert scale[4].item() == 0.0
    fin = torch.isfinite(ref_scale)
    torch.testing.assert_close(scale[fin], ref_scale[fin], rtol=1e-5, atol=1e-6)


def _poisoned_call(fn, shape, dtype):
    """Run fn after filling the block the caching allocator will hand out next with NaN."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del poison
    return fn()


SHAPES = [  # (leading dims, K, N)
    ((0,), 128, 64),
    ((1,), 128, 64),
    ((1,), 1152, 3456),
    ((7,), 64, 8),
    ((130,), 192, 72),
    ((2, 77), 1152, 264),
    ((300,), 1024, 1000),
    ((3, 5, 67), 3072, 512),
    ((1000,), 4608, 1152),
    ((33,), 12288, 256),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,Kf,N", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_matches_reference(K, dtype, lead, Kf, N, with_bias):
    torch.manual_seed(hash((lead, Kf, N)) % 1000)
    x = torch.randn(*lead, Kf, device="cuda").to(dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if with_bias else None
    M = x.numel() // Kf
    out = _poisoned_call(lambda: torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True), (M, N), dtype)
    assert out.shape == (*lead, N) and out.dtype == dtype
    if M == 0:
        return
    ref = reference64(x.reshape(-1, Kf), w, b, True).view(*lead, N)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    assert relative_error(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_compiled_configuration_matches_the_reference(K, dtype):
    """Every 16-bit tile of the dtype, both rasters, at M and N that are not multiples of a tile."""
    torch.manual_seed(0)
    M, Kf, N = 200, 1152, 1000
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    values, meta, scale = K.compress_2to4(x, True)
    ref = reference64(x, w, b, True)
    prefix = "bf16_" if dtype == torch.bfloat16 else "fp16_"
    configs = {name: index for name, index in K.gemm_configs().items() if name.startswith(prefix)}
    assert configs
    for name, index in configs.items():
        for raster in (1, 2):
            out = K.sparse_mm_compressed(values, meta, scale, w, b, config=(index, 1, raster))
            assert relative_error(out, ref) < REL_TOL[dtype], (name, raster)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffer_fully_written(K, dtype):
    M, Kf, N = 333, 1152, 1160
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    values, meta, scale = K.compress_2to4(x, True)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    K.sparse_mm_compressed(values, meta, scale, w, None, out=out)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference64(x, w, None, True)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_norm_compensation_and_lora(K, dtype):
    M, Kf, N, r = 257, 1152, 576, 16
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    down = (torch.randn(r, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    up = (torch.randn(N, r, device="cuda") / r ** 0.5).to(dtype)
    out = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, False)
    assert relative_error(out, reference64(x, w, b, False)) < REL_TOL[dtype]
    out = _poisoned_call(lambda: torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True, ops.NORM_EPS, down, up),
                         (M, N), dtype)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference64(x, w, b, True, down, up)) < REL_TOL[dtype]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,Kf,N,rank", [(257, 1152, 576, 64), (64, 256, 128, 8), (1000, 3072, 1024, 40)])
def test_folded_lora_matches_the_reference(K, dtype, norm, M, Kf, N, rank):
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    x[0] = 0  # s = 0 and no LoRA term: the row is the bias
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    down = (torch.randn(rank, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    up = (torch.randn(N, rank, device="cuda") / rank ** 0.5).to(dtype)
    weight_lora, down_padded = ops.pack_lora(w, down, up)
    out = _poisoned_call(
        lambda: torch.ops.lynx.sparse_linear_lora(x, weight_lora, b, 2, 4, norm, ops.NORM_EPS, down_padded), (M, N), dtype)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference64(x, w, b, norm, down, up)) < REL_TOL[dtype]
    torch.testing.assert_close(out[0], b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_zeros_inf_nan_rows(K, dtype):
    M, Kf, N = 70, 256, 128
    x = torch.randn(M, Kf, device="cuda").to(dtype)
    x[0] = 0  # all-zero token -> s = 0 -> output = bias
    x[1] = torch.tensor([1.0, -1.0, 1.0, -1.0] * (Kf // 4), dtype=dtype)  # ties
    x[2] = torch.tensor([0.0, -0.0, 0.0, -0.0] * (Kf // 4), dtype=dtype)  # signed zeros
    x[3, 5] = float("inf")
    x[4, 9] = float("nan")
    x[5, 0:4] = torch.tensor([-float("inf"), float("inf"), 1.0, 2.0], dtype=dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    out = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)
    ref = ops.sparse_linear_reference(x, w, b, 2, 4, True, ops.NORM_EPS, None, None)
    bad = torch.tensor([3, 4, 5], device="cuda")
    for r in bad.tolist():
        assert not torch.isfinite(out[r]).any(), f"row {r} must be non-finite"
        assert not torch.isfinite(ref[r]).any()
    good = torch.ones(M, dtype=torch.bool, device="cuda")
    good[bad] = False
    assert torch.isfinite(out[good]).all()
    torch.testing.assert_close(out[0], b)
    ref64 = reference64(x[good], w, b, True)
    assert relative_error(out[good], ref64) < REL_TOL[dtype]


def test_fp32_and_odd_k_fall_back_to_reference(K):
    x = torch.randn(9, 128, device="cuda")
    w = torch.randn(64, 128, device="cuda")
    with pytest.warns(UserWarning):
        out = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)
    torch.testing.assert_close(out, ops.sparse_linear_reference(x, w, None, 2, 4, True, ops.NORM_EPS, None, None))
    x = torch.randn(9, 100, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning):
        out = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)
    torch.testing.assert_close(out, ops.sparse_linear_reference(x, w, None, 2, 4, True, ops.NORM_EPS, None, None))


def test_non_contiguous_input(K):
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16).t()  # (64, 256) non-contiguous
    w = (torch.randn(128, 256, device="cuda") / 16).to(torch.bfloat16)
    out = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)
    assert relative_error(out, reference64(x.contiguous(), w, None, True)) < 1e-2


def test_cuda_graph_capture(K):
    x = torch.randn(4, 100, 1152, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(3456, 1152, device="cuda") / 34).to(torch.bfloat16)
    b = torch.randn(3456, device="cuda", dtype=torch.bfloat16)
    torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)  # warm up (loads the library, allocates workspace)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert relative_error(out, reference64(x.reshape(-1, 1152), w, b, True).view(4, 100, 3456)) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(K, dtype):
    x = torch.randn(3, 50, 256, device="cuda").to(dtype)
    w = (torch.randn(128, 256, device="cuda") / 16).to(dtype)
    b = torch.randn(128, device="cuda").to(dtype)
    torch.library.opcheck(torch.ops.lynx.sparse_linear.default, (x, w, b, 2, 4, True))
    down = (torch.randn(8, 256, device="cuda") / 16).to(dtype)
    up = (torch.randn(128, 8, device="cuda") / 3).to(dtype)
    torch.library.opcheck(torch.ops.lynx.sparse_linear.default, (x, w, None, 2, 4, False, 1e-12, down, up))
    weight_lora, down = ops.pack_lora(w, down, up)
    torch.library.opcheck(torch.ops.lynx.sparse_linear_lora.default, (x, weight_lora, b, 2, 4, True, 1e-12, down))


SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, 1e-40, float("inf"), float("-inf"), float("nan"), 2.0, -2.0]


def test_fuzz_selection_and_output_against_the_reference(K):
    """hypothesis: random shapes and values incl. ties, ±0, subnormals, inf and NaN."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(
        rows=st.integers(0, 300),
        k_tiles=st.integers(1, 6),
        dtype=st.sampled_from(DTYPES),
        specials=st.integers(0, 40),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(rows, k_tiles, dtype, specials, seed):
        gen = torch.Generator().manual_seed(seed)
        kf = 64 * k_tiles
        x = torch.randn(rows, kf, generator=gen)
        x = torch.where(torch.rand(rows, kf, generator=gen) < 0.2, x.round(), x)  # ties
        if rows and specials:
            idx = torch.randint(0, rows * kf, (specials,), generator=gen)
            vals = torch.tensor(SPECIAL_VALUES)[torch.randint(0, len(SPECIAL_VALUES), (specials,), generator=gen)]
            x.view(-1)[idx] = vals
        x = x.to(dtype).cuda()
        values, meta, scale = K.compress_2to4(x)
        if rows:
            assert torch.equal(decode(values, meta, rows, kf) != 0, ops.keep_mask(x, 2, 4) & (x != 0))
        w = torch.randn(48, kf, generator=gen).to(dtype).cuda()
        out = torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True)
        expected = reference64(x, w, None, True)
        finite = torch.isfinite(x.float()).all(-1)
        assert torch.equal(torch.isfinite(out.float()).all(-1)[~finite], torch.zeros_like(finite[~finite]))
        if finite.any():
            assert relative_error(out[finite], expected[finite]) < REL_TOL[dtype]

    check()


def test_the_cpp_kernels_serve_the_ops(K):
    assert K.torch_ops_error is None, K.torch_ops_error
    assert K.load() is True and K.load_error() is None  # load() is idempotent
    assert K.unsupported_reason(torch.device("cuda"), torch.bfloat16, 1152, 3456, 2, 4) is None


def test_metadata_bytes(K):
    assert K.metadata_bytes(1, 64) == 64 * 128 // 8
    assert K.metadata_bytes(4096, 1152) == 4096 * 1152 // 8


def test_the_library_plans_tuned_shapes_from_the_table(K):
    if "LYNX_GEMM_CONFIG" in os.environ:
        pytest.skip("LYNX_GEMM_CONFIG forces every plan")
    configs = K.gemm_configs()
    assert K.choose_config(torch.bfloat16, 4096, 3456, 1152) == (configs["bf16_128x128_c1x2_pp"], 1, 1)
    assert K.choose_config(torch.float16, 4096, 4096, 3072) == (configs["fp16_256x128_c2x1_coop"], 4, 2)


def test_lynx_gemm_config_forces_the_ops_plan(K):
    """The override is read by the library, so the C++ op kernels follow it too (one process per setting)."""
    code = ("import torch, lynx_compile.kernels as k; assert k.load(), k.load_error(); "
            "x = torch.randn(256, 1152, device='cuda', dtype=torch.bfloat16); "
            "w = torch.randn(640, 1152, device='cuda', dtype=torch.bfloat16); "
            "torch.ops.lynx.sparse_linear(x, w, None, 2, 4, True); "
            "c = k.choose_config(torch.bfloat16, 256, 640, 1152); "
            "print({v: n for n, v in k.gemm_configs().items()}[c[0]], c[1], c[2])")
    env = {**os.environ, "LYNX_GEMM_CONFIG": "256x128_c1x2_coop:2:1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bf16_256x128_c1x2_coop", "2", "1"]
    env["LYNX_GEMM_CONFIG"] = "no_such_config"
    code = "import lynx_compile.kernels as k; print(k.load(), k.load_error())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("False") and "LYNX_GEMM_CONFIG is not <config>" in out.stdout


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_and_python_kernels_agree_bitwise(K, dtype):
    """The C++ kernels launch the same CUDA kernels as the Python ones, with the same plans."""
    x = torch.randn(2, 150, 1152, device="cuda").to(dtype)
    w = (torch.randn(640, 1152, device="cuda") / 34).to(dtype)
    b = torch.randn(640, device="cuda").to(dtype)
    assert torch.equal(torch.ops.lynx.sparse_linear(x, w, b, 2, 4, True), K.sparse_linear_cuda(x, w, b, 2, 4, True))
    weight_lora, down = ops.pack_lora(w, (torch.randn(48, 1152, device="cuda") / 34).to(dtype),
                                      torch.randn(640, 48, device="cuda").to(dtype))
    assert torch.equal(torch.ops.lynx.sparse_linear_lora(x, weight_lora, b, 2, 4, True, ops.NORM_EPS, down),
                       K.sparse_linear_lora_cuda(x, weight_lora, b, 2, 4, True, ops.NORM_EPS, down))


def test_lora_down_in_any_layout(K):
    """The C++ kernel projects through cuBLAS directly only for contiguous factors; others take the Python path."""
    x = torch.randn(300, 1152, device="cuda", dtype=torch.bfloat16)
    weight_lora, down = ops.pack_lora((torch.randn(640, 1152, device="cuda") / 34).to(torch.bfloat16),
                                      (torch.randn(64, 1152, device="cuda") / 34).to(torch.bfloat16),
                                      torch.randn(640, 64, device="cuda", dtype=torch.bfloat16))
    column_major = down.t().contiguous().t()
    assert not column_major.is_contiguous()
    expected = torch.ops.lynx.sparse_linear_lora(x, weight_lora, None, 2, 4, True, ops.NORM_EPS, down)
    out = torch.ops.lynx.sparse_linear_lora(x, weight_lora, None, 2, 4, True, ops.NORM_EPS, column_major)
    assert relative_error(out, expected) < 1e-2


def test_bad_arguments_raise_the_ops_errors_on_gpu(K):
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.lynx.sparse_linear(x, torch.randn(64, 128, device="cuda", dtype=torch.bfloat16), None, 2, 4, True)
    weight_lora, down = ops.pack_lora(torch.randn(64, 256, device="cuda", dtype=torch.bfloat16),
                                      torch.randn(32, 256, device="cuda", dtype=torch.bfloat16),
                                      torch.randn(64, 32, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be \\(out, in \\+ 2r\\)"):
        torch.ops.lynx.sparse_linear_lora(x, weight_lora[:, :300], None, 2, 4, True, ops.NORM_EPS, down)


# ---- producers fused into the sparsify step (lynx::producer_sparse_linear) ----------------------------------------

PRODUCER_CASES = [  # (producer, mul rows, add rows, samples)
    ("layer_norm", True, True, 2),
    ("layer_norm", True, False, 1),
    ("layer_norm", False, True, 3),
    ("layer_norm", False, False, 1),
    ("gelu", False, False, 1),
    ("gelu_tanh", False, False, 1),
    ("silu", False, False, 1),
]
PRODUCER_SHAPES = [((6, 77), 1152, 264), ((6, 40), 3072, 512), ((6, 43), 4608, 128), ((6, 3), 15360, 64)]


def _producer_inputs(producer, with_mul, with_add, samples, lead, Kf, N, dtype):
    torch.manual_seed(hash((producer, lead, Kf)) % 1000)
    x = (2 * torch.randn(*lead, Kf, device="cuda") + 0.5).to(dtype)  # an offset mean: layer norm must remove it
    mul = 1 + 0.3 * torch.randn(samples, Kf, device="cuda") if with_mul else None
    add = 0.2 * torch.randn(samples, Kf, device="cuda") if with_add else None
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    return x, mul, add, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("producer,with_mul,with_add,samples", PRODUCER_CASES)
@pytest.mark.parametrize("lead,Kf,N", PRODUCER_SHAPES)
def test_producer_sparse_linear_matches_reference(K, dtype, producer, with_mul, with_add, samples, lead, Kf, N):
    x, mul, add, w, b = _producer_inputs(producer, with_mul, with_add, samples, lead, Kf, N, dtype)
    M = x.numel() // Kf
    out = _poisoned_call(lambda: torch.ops.lynx.producer_sparse_linear(x, producer, mul, add, 1e-6, w, b, 2, 4, True,
                                                                       ops.NORM_EPS), (M, N), dtype)
    assert out.shape == (*lead, N) and torch.isfinite(out).all()
    y = ops.produce_reference(x, producer, mul, add, 1e-6)
    assert relative_error(out, reference64(y.reshape(-1, Kf), w, b, True).view(*lead, N)) < REL_TOL[dtype]


@pytest.mark.parametrize("producer,with_mul,with_add,samples", PRODUCER_CASES)
def test_producer_runs_before_the_selection(K, producer, with_mul, with_add, samples):
    """The kernel selects on the producer's output, rounded once as the reference rounds it: the compressed values
    and metadata decode to the reference's kept entries, but for the rare entry whose fp32 statistics round the
    other way."""
    dtype, Kf = torch.bfloat16, 1152
    x, mul, add, _, _ = _producer_inputs(producer, with_mul, with_add, samples, (6, 50), Kf, 8, dtype)
    x2 = x.reshape(-1, Kf)
    values, meta, scale = K.compress_2to4(x2, True, producer=K.launch.producer(producer, mul, add, 1e-6))
    kept, ref_scale = ops.sparsify_reference(ops.produce_reference(x2, producer, mul, add, 1e-6), 2, 4, True, ops.NORM_EPS)
    differ = decode(values, meta, x2.shape[0], Kf) != kept
    assert differ.float().mean().item() < 2e-3
    torch.testing.assert_close(scale, ref_scale.squeeze(-1).float(), rtol=1e-2, atol=1e-3)


def test_producer_cpp_and_python_kernels_agree_bitwise(K):
    x, mul, add, w, b = _producer_inputs("layer_norm", True, True, 2, (2, 150), 1152, 640, torch.bfloat16)
    args = (x, "layer_norm", mul, add, 1e-6, w, b, 2, 4, True, ops.NORM_EPS)
    assert torch.equal(torch.ops.lynx.producer_sparse_linear(*args), K.registry.producer_sparse_linear_cuda(*args))


def test_producer_cases_the_kernel_does_not_take_run_the_reference(K):
    x, mul, add, w, b = _producer_inputs("layer_norm", True, True, 2, (2, 5), 16448, 64, torch.bfloat16)
    with pytest.warns(UserWarning, match="layer norm over 16448"):
        out = torch.ops.lynx.producer_sparse_linear(x, "layer_norm", mul, add, 1e-6, w, b, 2, 4, True, ops.NORM_EPS)
    assert torch.equal(out, ops.producer_sparse_linear(x, "layer_norm", mul, add, 1e-6, w, b, 2, 4, True, ops.NORM_EPS))
    with pytest.raises(RuntimeError, match="do not split into 4 samples"):
        torch.ops.lynx.producer_sparse_linear(x[..., :1152].contiguous(), "layer_norm", mul[:1, :1152].repeat(4, 1), None,
                                              1e-6, w[:, :1152].contiguous(), b, 2, 4, True, ops.NORM_EPS)


def test_producer_cuda_graph_capture_and_opcheck(K):
    x, mul, add, w, b = _producer_inputs("layer_norm", True, True, 4, (4, 100), 1152, 3456, torch.bfloat16)
    args = (x, "layer_norm", mul, add, 1e-6, w, b, 2, 4, True, ops.NORM_EPS)
    torch.ops.lynx.producer_sparse_linear(*args)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.lynx.producer_sparse_linear(*args)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    y = ops.produce_reference(x, "layer_norm", mul, add, 1e-6)
    assert relative_error(out, reference64(y.reshape(-1, 1152), w, b, True).view(4, 100, 3456)) < 1e-2
    torch.library.opcheck(torch.ops.lynx.producer_sparse_linear.default, args)
