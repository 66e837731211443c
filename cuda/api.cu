// lynx: C entry points (raw device pointers, sizes, a cudaStream_t), loaded from Python with ctypes.
#include <cuda_runtime.h>
#include <string.h>
#include "lynx_gemm_api.h"

#define LYNX_CONFIG(NAME, IS_BF16)                                          \
  int lynx_gemm_##NAME##_run(const LynxGemmParams& p, cudaStream_t s); \
  size_t lynx_gemm_##NAME##_ws(const LynxGemmParams& p);
#include "configs.inc"
#undef LYNX_CONFIG

namespace {
struct ConfigEntry {
  const char* name;
  int is_bf16;
  int (*run)(const LynxGemmParams&, cudaStream_t);
  size_t (*ws)(const LynxGemmParams&);
};
#define LYNX_CONFIG(NAME, IS_BF16) {#NAME, IS_BF16, lynx_gemm_##NAME##_run, lynx_gemm_##NAME##_ws},
const ConfigEntry kConfigs[] = {
#include "configs.inc"
};
#undef LYNX_CONFIG
constexpr int kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);
}  // namespace

extern "C" {

int lynx_abi_version() { return 2; }
int lynx_num_configs() { return kNumConfigs; }
const char* lynx_config_name(int i) { return (i >= 0 && i < kNumConfigs) ? kConfigs[i].name : nullptr; }
int lynx_config_is_bf16(int i) { return (i >= 0 && i < kNumConfigs) ? kConfigs[i].is_bf16 : -1; }

// D = scale[m] * (A~ W^T) + bias[n]. Returns 0 on success, a negative LYNX_ERR_* otherwise.
int lynx_sparse_gemm(int config, const void* a_comp, const void* e, const void* w, const float* scale,
                     const void* bias, void* d, int M, int N, int K, int swizzle, int raster,
                     int device_id, int sm_count, int pdl, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  if (config < 0 || config >= kNumConfigs) return LYNX_ERR_NO_CONFIG;
  if (M == 0 || N == 0) return 0;
  LynxGemmParams p{a_comp, e, w, scale, bias, d, M, N, K, swizzle, raster, device_id, sm_count, pdl, workspace,
                   workspace_bytes};
  return kConfigs[config].run(p, stream);
}

long long lynx_sparse_gemm_workspace(int config, int M, int N, int K, int sm_count) {
  if (config < 0 || config >= kNumConfigs) return -1;
  LynxGemmParams p{};
  p.M = M; p.N = N; p.K = K; p.swizzle = 1; p.sm_count = sm_count;
  return static_cast<long long>(kConfigs[config].ws(p));
}

const char* lynx_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
