"""GPU tests of the e4m3 kernels (``lynx::sparse_linear_e4m3``, the e4m3 sparsify pass and sparse GEMM) against the
reference op, and of ``precision="fp8"`` compiled on the GPU.

Skipped cleanly where there is no CUDA device, no sm_90 GPU, or the kernel library is unavailable.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import relative_error, sparse_kernels_or_skip

from lynx_compile import LynxConfig, backend, convert_to_fp8, models, ops

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def K():
    return sparse_kernels_or_skip()


def decode_e4m3(values: torch.Tensor, meta: torch.Tensor, M: int, Kf: int) -> torch.Tensor:
    """Dense fp32 (M, Kf) from e4m3 compressed values + the 8-bit CUTLASS sm90 metadata layout (cuda/sparsify.cu)."""
    dev = values.device
    m_pad = (M + 63) // 64 * 64
    m = torch.arange(M, device=dev).view(M, 1)
    g = torch.arange(Kf // 4, device=dev).view(1, -1)
    k = 4 * g
    byte = (k // 128) * m_pad * 16 + m * 16 + (k % 128) // 8
    nib = (meta.long()[byte] >> (4 * (g % 2))) & 0xF
    i0, i1 = nib & 3, nib >> 2
    assert bool((i0 < i1).all()), "invalid metadata code"
    v = values[:, : Kf // 2].float()
    dense = torch.zeros((M, Kf), device=dev)
    dense.scatter_(1, 4 * g + i0, v[:, 0::2])
    dense.scatter_(1, 4 * g + i1, v[:, 1::2])
    return dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,Kf", [(1, 64), (63, 192), (200, 1152), (70, 4608), (9, 15360)])
def test_e4m3_compress_matches_the_reference_quantization(K, dtype, M, Kf):
    torch.manual_seed(M + Kf)
    x = (torch.randn(M, Kf, device="cuda") * torch.rand(M, 1, device="cuda") * 10).to(dtype)
    values, meta, scale = K.compress_2to4(x, True, e4m3=True)
    assert values.dtype == ops.E4M3 and values.shape == (M, Kf // 2)
    kept, s = ops.sparsify_reference(x, 2, 4, True, ops.NORM_EPS)
    decoded = decode_e4m3(values, meta, M, Kf)
    # The selection is exact: every kept entry sits where the reference keeps it.
    assert bool(((decoded != 0) <= ops.keep_mask(x, 2, 4)).all())
    expected, row_scale = ops.quantize_e4m3(kept.float(), kept.float().abs().amax(dim=-1, keepdim=True))
    torch.testing.assert_close(scale, (s * row_scale).reshape(-1), rtol=1e-5, atol=0)
    # Values: the same e4m3 codes, but for rounding ties of the multiplier (one e4m3 step at most).
    assert (decoded != expected.float()).float().mean() < 1e-3
    torch.testing.assert_close(decoded, expected.float(), rtol=0.125, atol=0)


def test_e4m3_compress_of_rows_below_the_amax_floor_matches_the_reference(K):
    """bf16 tokens whose amax is below 2**-119 (subnormal values) or zero: the kernel floors the amax as the reference
    does, so no multiplier overflows to inf and no code comes out NaN. (fp16 has no value that small.)"""
    smallest = torch.finfo(torch.bfloat16).tiny * torch.finfo(torch.bfloat16).eps  # the smallest bf16 subnormal
    x = torch.randn(4, 256, device="cuda").to(torch.bfloat16)
    x[0] = smallest * torch.randint(-3, 4, (256,), device="cuda").to(torch.bfloat16)
    x[1] = 0
    values, meta, scale = K.compress_2to4(x, False, e4m3=True)
    kept, _ = ops.sparsify_reference(x, 2, 4, False, ops.NORM_EPS)
    expected, row_scale = ops.quantize_e4m3(kept.float(), kept.float().abs().amax(dim=-1, keepdim=True))
    decoded = decode_e4m3(values, meta, 4, 256)
    assert torch.isfinite(decoded).all() and torch.isfinite(scale).all()
    # Dequantized, as the GEMM sees them; absolute slack for a kernel that flushes subnormals to zero.
    torch.testing.assert_close(decoded * scale[:, None], expected.float() * row_scale, rtol=0.125, atol=1e-35)
    torch.testing.assert_close(decoded[2:], expected[2:].float(), rtol=0.125, atol=0)
    assert not (decoded[1] * scale[1]).any()  # an all-zero token stays zero


SHAPES = [((0,), 128, 64), ((1,), 128, 64), ((7,), 64, 16), ((2, 77), 1152, 3456), ((300,), 1024, 1008),
          ((1000,), 4608, 1152), ((33,), 15360, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,Kf,N", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_e4m3_matches_the_reference(K, dtype, lead, Kf, N, with_bias):
    torch.manual_seed(Kf + N)
    x = torch.randn(*lead, Kf, device="cuda").to(dtype)
    w8, w_scale = ops.quantize_weight_e4m3((torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype))
    b = torch.randn(N, device="cuda").to(dtype) if with_bias else None
    out = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, b, 2, 4, True, ops.NORM_EPS)
    assert out.shape == (*lead, N) and out.dtype == dtype
    if x.numel() == 0:
        return
    ref = ops.sparse_linear_e4m3_reference(x.double(), w8, w_scale, b, 2, 4, True, ops.NORM_EPS, None)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("M,Kf,N,rank", [(200, 1152, 1152, 0), (1000, 1152, 3456, 64), (64, 64, 128, 0),
                                         (300, 4608, 1152, 16)])
def test_every_compiled_e4m3_configuration_matches_the_reference(K, M, Kf, N, rank):
    """Every e4m3 tile, both rasters: M and N not multiples of a tile, K (with the folded LoRA's 2r columns) not a
    multiple of a 256-deep K tile, and K below one tile."""
    torch.manual_seed(M + Kf + N)
    x = torch.randn(M, Kf, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(torch.bfloat16)
    b = torch.randn(N, device="cuda").to(torch.bfloat16)
    down_padded = None
    if rank:
        down = (torch.randn(rank, Kf, device="cuda") / Kf ** 0.5).to(torch.bfloat16)
        w, down_padded = ops.pack_lora(w, down, (torch.randn(N, rank, device="cuda") / rank ** 0.5).to(torch.bfloat16))
    w8, w_scale = ops.quantize_weight_e4m3(w)
    tail = None if down_padded is None else x @ down_padded.t()
    values, meta, scale = K.compress_2to4(x, True, lora_tail=tail, e4m3=True)
    ref = ops.sparse_linear_e4m3_reference(x.float(), w8, w_scale, b, 2, 4, True, ops.NORM_EPS,
                                           None if down_padded is None else down_padded.float())
    configs = {name: index for name, index in K.gemm_configs().items() if name.startswith("e4m3_bf16_")}
    assert any("x256_" in name for name in configs), "the 256-deep K tiles are compiled"
    for name, index in configs.items():
        for raster in (1, 2):
            out = K.sparse_mm_compressed(values, meta, scale, w8, b, config=(index, 1, raster), col_scale=w_scale,
                                         out_dtype=torch.bfloat16)
            assert relative_error(out, ref) < 1e-2, (name, raster)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [16, 64])
def test_folded_lora_in_e4m3_matches_the_reference(K, dtype, rank):
    torch.manual_seed(rank)
    Kf, N = 1152, 640
    x = torch.randn(3, 100, Kf, device="cuda").to(dtype)
    w = (torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    down = (torch.randn(rank, Kf, device="cuda") / Kf ** 0.5).to(dtype)
    up = (torch.randn(N, rank, device="cuda") / rank ** 0.5).to(dtype)
    weight_lora, down_padded = ops.pack_lora(w, down, up)
    w8, w_scale = ops.quantize_weight_e4m3(weight_lora)
    out = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, None, 2, 4, True, ops.NORM_EPS, down_padded)
    ref = ops.sparse_linear_e4m3_reference(x.float(), w8, w_scale, None, 2, 4, True, ops.NORM_EPS, down_padded.float())
    assert relative_error(out, ref) < 1e-2
    # And the whole is the bf16 op's function, to FP8 accuracy.
    # (the fp32 op on the CPU: on the GPU it would warn of its reference fallback, once per process)
    bf16_op = torch.ops.lynx.sparse_linear(*(t.float().cpu() for t in (x, w)), None, 2, 4, True, ops.NORM_EPS,
                                           down.float().cpu(), up.float().cpu())
    assert relative_error(out.cpu(), bf16_op) < 6e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("producer,samples,Kf,N", [("layer_norm", 2, 1152, 3456), ("layer_norm", 1, 3072, 1024),
                                                   ("gelu_tanh", 1, 4608, 1152), ("silu", 1, 256, 512)])
def test_producer_fused_into_the_e4m3_sparsify_step(K, dtype, producer, samples, Kf, N):
    """The producer runs inside the e4m3 sparsify pass: the op is the e4m3 layer of the producer's output."""
    torch.manual_seed(Kf + N)
    x = torch.randn(samples, 150, Kf, device="cuda").to(dtype)
    rows = [torch.randn(samples, Kf, device="cuda") for _ in range(2)] if producer == "layer_norm" else [None, None]
    w8, w_scale = ops.quantize_weight_e4m3((torch.randn(N, Kf, device="cuda") / Kf ** 0.5).to(dtype))
    b = torch.randn(N, device="cuda").to(dtype)
    args = (x, producer, *rows, 1e-6, w8, b, 2, 4, True, ops.NORM_EPS, w_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reference fallback
        out = torch.ops.lynx.producer_sparse_linear(*args)
    produced = ops.produce_reference(x, producer, *rows, 1e-6)
    ref = ops.sparse_linear_e4m3_reference(produced.double(), w8, w_scale, b, 2, 4, True, ops.NORM_EPS, None)
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2
    assert torch.equal(out, K.registry.producer_sparse_linear_cuda(*args)), "C++ and Python kernels differ"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.lynx.producer_sparse_linear(*args)
    graph.replay()
    assert torch.equal(captured, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_inf_nan_tokens(K, dtype):
    x = torch.randn(6, 256, device="cuda").to(dtype)
    x[1] = 0
    x[2, 5] = float("inf")
    x[3, 7] = float("nan")
    w8, w_scale = ops.quantize_weight_e4m3(torch.randn(128, 256, device="cuda").to(dtype))
    b = torch.randn(128, device="cuda").to(dtype)
    out = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, b, 2, 4, True, ops.NORM_EPS)
    torch.testing.assert_close(out[1], b)
    assert not torch.isfinite(out[2]).any() and not torch.isfinite(out[3]).any()
    assert torch.isfinite(out[[0, 4, 5]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_and_python_kernels_agree_bitwise(K, dtype):
    x = torch.randn(2, 150, 1152, device="cuda").to(dtype)
    weight_lora, down = ops.pack_lora((torch.randn(640, 1152, device="cuda") / 34).to(dtype),
                                      (torch.randn(48, 1152, device="cuda") / 34).to(dtype),
                                      torch.randn(640, 48, device="cuda").to(dtype))
    w8, w_scale = ops.quantize_weight_e4m3(weight_lora)
    b = torch.randn(640, device="cuda").to(dtype)
    for lora_down in (None, down):
        weight = w8 if lora_down is not None else ops.quantize_weight_e4m3(weight_lora[:, :1152])[0]
        scale = w_scale if lora_down is not None else ops.quantize_weight_e4m3(weight_lora[:, :1152])[1]
        assert torch.equal(torch.ops.lynx.sparse_linear_e4m3(x, weight, scale, b, 2, 4, True, ops.NORM_EPS, lora_down),
                           K.sparse_linear_e4m3_cuda(x, weight, scale, b, 2, 4, True, ops.NORM_EPS, lora_down))


def test_cuda_graph_capture_and_opcheck(K):
    x = torch.randn(256, 1152, device="cuda", dtype=torch.bfloat16)
    w8, w_scale = ops.quantize_weight_e4m3(torch.randn(1152, 1152, device="cuda", dtype=torch.bfloat16))
    expected = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, None, 2, 4, True, ops.NORM_EPS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.lynx.sparse_linear_e4m3(x, w8, w_scale, None, 2, 4, True, ops.NORM_EPS)
    graph.replay()
    assert torch.equal(out, expected)
    # torch's schema check compares the e4m3 inputs with allclose, which float8 tensors do not support.
    torch.library.opcheck(torch.ops.lynx.sparse_linear_e4m3.default, (x, w8, w_scale, None, 2, 4, True, ops.NORM_EPS),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_precision_fp8_compiles_to_the_e4m3_kernels(K):
    torch.manual_seed(0)
    model = models.build("dit-xl-2", depth=2).eval().to("cuda", torch.bfloat16)
    args = models.example_inputs(model, batch=2, dtype=torch.bfloat16, device="cuda")
    recorder = backend(LynxConfig(precision="fp8", speed_guard=False))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend=recorder)(*args)
        dense = model(*args)
    assert not [w for w in caught if "lynx" in str(w.message)], "a reference fallback or a LynxWarning"
    layers = recorder.report.layers
    assert {layer.precision for layer in layers if layer.decision == "sparse"} == {"e4m3"}
    assert all(layer.reason.startswith("CUDA sparse kernel (e4m3)") for layer in layers if layer.decision == "sparse")
    assert all(layer.precision == "e4m3" for layer in layers if layer.decision == "dense" and layer.tokens > 2)
    assert torch.isfinite(out).all() and relative_error(out, dense) < 0.2


def test_a_converted_model_runs_its_own_e4m3_weights_on_the_kernels(K):
    torch.manual_seed(0)
    model = models.build("dit-xl-2", depth=2).eval().to("cuda", torch.bfloat16)
    args = models.example_inputs(model, batch=2, dtype=torch.bfloat16, device="cuda")
    # Inductor keeps a fused kernel's intermediates in float32 unless told to round them as eager does, and the two
    # graphs (weights as constants, weights as parameters) fuse the adaLN rows differently: without this, the
    # outputs differ by e4m3 rounding flips (2.8% relative in a CPU run of the same models), though each layer
    # computes the same function.
    with torch.no_grad(), torch._inductor.config.patch(emulate_precision_casts=True):
        expected = torch.compile(model, backend=backend(LynxConfig(precision="fp8", speed_guard=False)))(*args)
        convert_to_fp8(model)
        torch._dynamo.reset()
        recorder = backend(LynxConfig(speed_guard=False))
        out = torch.compile(model, backend=recorder)(*args)
    assert any(layer.decision == "sparse" for layer in recorder.report.layers)
    assert {layer.precision for layer in recorder.report.layers} == {"e4m3"}
    torch.testing.assert_close(out, expected)
