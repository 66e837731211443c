// lynx: the C ABI of liblynx_kernels.so, declared once.
//
// api.cu and sparsify.cu define these functions, torch_ops.cpp takes their types from here (decltype), and
// lynx_compile/kernels/abi.py reads this file to declare them to ctypes. So the file keeps a regular form that
// abi.py parses: `#define LYNX_<NAME> <integer>` constants, `typedef struct` blocks of `type name;` fields, and
// one `LYNX_API <return type> lynx_<name>(<type name>, ...);` declaration per entry point. Argument types are
// int, long long, size_t, float, pointers and cudaStream_t.
//
// Every entry point takes raw device pointers and sizes; the caller allocates every buffer, so nothing here
// allocates or synchronises (CUDA-graph safe).
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

#ifdef __cplusplus
#define LYNX_API extern "C"
#else
#define LYNX_API
#endif

// Bumped on any change below; lynx_compile checks a loaded library against this header.
#define LYNX_ABI_VERSION 5

// The GPUs the kernels are compiled for (sm_90a): compute capability major * 10 + minor.
#define LYNX_COMPUTE_CAPABILITY 90

// The kernels take a layer when in_features (K) and out_features (N) are multiples of these.
#define LYNX_K_MULTIPLE 64
#define LYNX_N_MULTIPLE 8

// The operand and output types of a sparse GEMM (the GEMM type of a configuration): 16-bit activation, weight and
// output of one dtype; or e4m3 activation and weight, dequantized in the epilogue by a per-row activation scale and
// a per-column weight scale, with a 16-bit output.
#define LYNX_GEMM_FP16 0
#define LYNX_GEMM_BF16 1
#define LYNX_GEMM_E4M3_FP16 2
#define LYNX_GEMM_E4M3_BF16 3

// The largest finite e4m3 value: a row's largest kept magnitude is quantized to it.
#define LYNX_E4M3_MAX 448
// A row's amax is floored at 2^LYNX_E4M3_MIN_AMAX_EXP2 before LYNX_E4M3_MAX / amax is taken: below it the multiplier
// overflows float32, and a row of subnormal values would come out NaN (ops.E4M3_SMALLEST_AMAX on the Python side).
#define LYNX_E4M3_MIN_AMAX_EXP2 -119

// Return codes: 0 success; LYNX_ERR_CUDA_BASE - e for CUDA error e. lynx_status_string names any of them.
enum LynxStatus {
  LYNX_OK = 0,
  LYNX_ERR_BAD_ARGUMENT = -1,
  LYNX_ERR_CANNOT_IMPLEMENT = -2,
  LYNX_ERR_WORKSPACE = -3,
  LYNX_ERR_INIT = -4,
  LYNX_ERR_RUN = -5,
  LYNX_ERR_NO_CONFIG = -6,
  LYNX_ERR_BAD_OVERRIDE = -7,
  LYNX_ERR_CUDA_BASE = -1000,
};

// How one GEMM shape runs: configuration index, tile-scheduler swizzle (1/2/4/8) and raster order
// (0 CUTLASS heuristic, 1 along M, 2 along N), and the workspace it needs.
typedef struct LynxGemmPlan {
  int config;
  int swizzle;
  int raster;
  long long workspace_bytes;
} LynxGemmPlan;

// The kernel that produced a sparse layer's input, run by lynx_sparsify_2to4 on the loaded values instead of as a
// kernel of its own that writes them out: layer norm y = (x - mean) / sqrt(var + norm_eps) * mul + add, with the
// fp32 (samples x K) rows mul and add (nullptr: 1 and 0) of the row's sample (the M rows are samples equal runs);
// or an elementwise activation. Computed in fp32 and rounded to x's dtype before the selection, as the framework
// does.
#define LYNX_PRODUCER_NONE 0
#define LYNX_PRODUCER_LAYER_NORM 1
#define LYNX_PRODUCER_GELU 2
#define LYNX_PRODUCER_GELU_TANH 3
#define LYNX_PRODUCER_SILU 4

// A sparsify pass that needs a row's statistics before it writes the row (a layer-norm producer, the e4m3 scale) holds
// the whole row in registers: logical columns (in_features plus a folded LoRA's, rounded up to 128) up to this.
#define LYNX_WHOLE_ROW_MAX_K 16384

typedef struct LynxProducer {
  int kind;
  const float* mul;
  const float* add;
  int samples;
  float norm_eps;
} LynxProducer;

LYNX_API int lynx_abi_version(void);

// A one-line message for any return code of this ABI.
LYNX_API const char* lynx_status_string(int status);

// The compiled GEMM configurations, by index (names: <bf16|fp16|e4m3_bf16|e4m3_fp16>_<tile>_<cluster>_<schedule>).
LYNX_API int lynx_num_configs(void);
LYNX_API const char* lynx_config_name(int config);

// Bytes of metadata for an M x K activation (K logical columns, padding included).
LYNX_API long long lynx_metadata_bytes(int M, int K);

// 2:4-sparsifies x (M x K, row stride ldx) into a_comp (M rows of K/2 + rank values), the metadata e
// (lynx_metadata_bytes(M, K + 2 rank) bytes) and the per-row scale (M floats; 1 when norm is 0). tail (M x rank,
// or nullptr with rank 0) is the folded LoRA's down-projection, appended to each row (see sparsify.cu). producer
// (nullptr: none) is applied to x first; it takes no tail.
LYNX_API int lynx_sparsify_2to4(int is_bf16, const void* x, long long ldx, int M, int K, void* a_comp, void* e,
                                float* scale, int norm, float eps, const void* tail, int rank,
                                const LynxProducer* producer, cudaStream_t stream);

// lynx_sparsify_2to4 for the e4m3 GEMM: the same selection, producer and LoRA tail, with the kept values (and the
// tail divided by the row's norm scale) quantized to e4m3 with one scale per row, taken from their largest
// magnitude (LYNX_E4M3_MAX / amax, 0 for an all-zero row). a_comp gets M rows of K/2 + rank e4m3 bytes
// ((K/2 + rank) % 16 == 0, rank a multiple of 16); scale gets each row's dequantization scale: the norm scale
// times amax / LYNX_E4M3_MAX. The whole row is held in registers (LYNX_WHOLE_ROW_MAX_K).
LYNX_API int lynx_sparsify_2to4_e4m3(int is_bf16, const void* x, long long ldx, int M, int K, void* a_comp, void* e,
                                     float* scale, int norm, float eps, const void* tail, int rank,
                                     const LynxProducer* producer, cudaStream_t stream);

// The plan of an M x N x K GEMM of one GEMM type (LYNX_GEMM_*) whose layer has layer_k input features (K less a
// folded LoRA's columns): the tuned entry for (M, N, layer_k), else the rule fitted to the tuned shapes
// (tuning.inc). The environment variable LYNX_GEMM_CONFIG=<config>[:swizzle[:raster]], read once, forces a tile
// (its GEMM-type prefix optional) for every GEMM.
LYNX_API int lynx_gemm_plan(int gemm_type, int M, int N, int K, int layer_k, int sm_count, LynxGemmPlan* plan);

// Workspace bytes of one configuration for an M x N x K GEMM.
LYNX_API long long lynx_sparse_gemm_workspace(int config, int M, int N, int K, int sm_count);

// d = scale[m] * col_scale[n] * (A~ w^T) + bias[n], A~ given by a_comp and e (from lynx_sparsify_2to4, or
// lynx_sparsify_2to4_e4m3 for an e4m3 configuration); scale, col_scale and bias may be nullptr (1, 1 and 0);
// col_scale is read by e4m3 configurations only. bias has the output's dtype. pdl: launch with programmatic
// dependent launch.
LYNX_API int lynx_sparse_gemm(int config, const void* a_comp, const void* e, const void* w, const float* scale,
                              const float* col_scale, const void* bias, void* d, int M, int N, int K, int swizzle,
                              int raster, int device_id, int sm_count, int pdl, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);
