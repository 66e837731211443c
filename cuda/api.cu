// lynx: the GEMM entry points of lynx_api.h: the configuration table, the per-shape plan, launch and status text.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_params.h"
#include "lynx_api.h"

#define LYNX_CONFIG(NAME, GEMM_TYPE)                                   \
  int lynx_gemm_##NAME##_run(const LynxGemmParams& p, cudaStream_t s); \
  size_t lynx_gemm_##NAME##_ws(const LynxGemmParams& p);
#include "configs.inc"
#undef LYNX_CONFIG

namespace {
struct ConfigEntry {
  const char* name;
  int gemm_type;
  int (*run)(const LynxGemmParams&, cudaStream_t);
  size_t (*ws)(const LynxGemmParams&);
};
#define LYNX_CONFIG(NAME, GEMM_TYPE) {#NAME, GEMM_TYPE, lynx_gemm_##NAME##_run, lynx_gemm_##NAME##_ws},
const ConfigEntry kConfigs[] = {
#include "configs.inc"
};
#undef LYNX_CONFIG
constexpr int kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);

struct TunedShape {
  int M, N, K;
  const char* tile;
  int swizzle, raster;
};
struct FallbackRule {
  int min_m, few_large_tiles, large_tile_m, large_tile_n, short_k;
  const char* short_k_tile;
  const char* long_k_tile;
  const char* large_tile;
};
#include "tuning.inc"

struct TileChoice {
  const char* tile;
  int swizzle, raster;
};

// The entry of a tuning table for this shape, or nullptr.
template <size_t kSize>
const TunedShape* find_tuned(const TunedShape (&table)[kSize], int M, int N, int layer_k) {
  for (const TunedShape& t : table) {
    if (t.M == M && t.N == N && t.K == layer_k) return &t;
  }
  return nullptr;
}

TileChoice choose_tile(int gemm_type, int M, int N, int layer_k) {
  const bool e4m3 = gemm_type == LYNX_GEMM_E4M3_FP16 || gemm_type == LYNX_GEMM_E4M3_BF16;
  const TunedShape* t = e4m3 ? find_tuned(kTunedE4M3, M, N, layer_k) : nullptr;
  if (t == nullptr) t = find_tuned(kTuned, M, N, layer_k);
  if (t != nullptr) return {t->tile, t->swizzle, t->raster};
  const long long tiles_m = (static_cast<long long>(M) + kFallback.large_tile_m - 1) / kFallback.large_tile_m;
  const long long tiles_n = (static_cast<long long>(N) + kFallback.large_tile_n - 1) / kFallback.large_tile_n;
  const long long large_tiles = tiles_m * tiles_n;
  if (M >= kFallback.min_m && large_tiles < kFallback.few_large_tiles) {
    return {layer_k <= kFallback.short_k ? kFallback.short_k_tile : kFallback.long_k_tile, 1, 1};
  }
  return {kFallback.large_tile, 1, 1};
}

// The configuration-name prefix of each GEMM type, indexed by LYNX_GEMM_*.
constexpr const char* kGemmTypePrefix[] = {"fp16_", "bf16_", "e4m3_fp16_", "e4m3_bf16_"};
constexpr int kNumGemmTypes = sizeof(kGemmTypePrefix) / sizeof(kGemmTypePrefix[0]);

// The index of the configuration of this GEMM type and tile; a tile given with a GEMM-type prefix has it replaced.
// -1 when there is none.
int config_index(int gemm_type, const char* tile) {
  if (gemm_type < 0 || gemm_type >= kNumGemmTypes) return -1;
  for (const char* prefix : kGemmTypePrefix) {
    // No prefix starts another one, so at most one matches.
    if (strncmp(tile, prefix, strlen(prefix)) == 0) {
      tile += strlen(prefix);
      break;
    }
  }
  char name[96];
  snprintf(name, sizeof(name), "%s%s", kGemmTypePrefix[gemm_type], tile);
  for (int i = 0; i < kNumConfigs; ++i) {
    if (strcmp(kConfigs[i].name, name) == 0 && kConfigs[i].gemm_type == gemm_type) return i;
  }
  return -1;
}

// LYNX_GEMM_CONFIG=<config>[:swizzle[:raster]], for tuning by hand; read on the first plan.
struct ConfigOverride {
  bool set = false, valid = false;
  char tile[80] = {};
  int swizzle = 1, raster = 0;
};

// Reads the integer at text, moving text past it; false when there is none.
bool parse_int(const char*& text, int& value) {
  char* end = nullptr;
  const long parsed = strtol(text, &end, 10);
  if (end == text) return false;
  value = static_cast<int>(parsed);
  text = end;
  return true;
}

ConfigOverride read_override() {
  ConfigOverride o;
  const char* text = getenv("LYNX_GEMM_CONFIG");
  if (text == nullptr || text[0] == '\0') return o;
  o.set = true;
  const char* colon = strchr(text, ':');
  const size_t len = colon ? static_cast<size_t>(colon - text) : strlen(text);
  if (len == 0 || len >= sizeof(o.tile)) return o;
  memcpy(o.tile, text, len);
  if (colon) {
    const char* rest = colon + 1;
    if (!parse_int(rest, o.swizzle)) return o;
    if (*rest == ':' && !parse_int(++rest, o.raster)) return o;
    if (*rest != '\0') return o;
  }
  const bool swizzle_ok = o.swizzle == 1 || o.swizzle == 2 || o.swizzle == 4 || o.swizzle == 8;
  // Some tiles are compiled for the e4m3 GEMM types only; the plan of a GEMM type without the tile fails.
  bool some_type = false;
  for (int gemm_type = 0; gemm_type < kNumGemmTypes; ++gemm_type) some_type |= config_index(gemm_type, o.tile) >= 0;
  o.valid = swizzle_ok && o.raster >= 0 && o.raster <= 2 && some_type;
  return o;
}

const ConfigOverride& config_override() {
  static const ConfigOverride o = read_override();
  return o;
}
}  // namespace

LYNX_API int lynx_abi_version(void) { return LYNX_ABI_VERSION; }

LYNX_API const char* lynx_status_string(int status) {
  if (status <= LYNX_ERR_CUDA_BASE) return cudaGetErrorString(static_cast<cudaError_t>(LYNX_ERR_CUDA_BASE - status));
  switch (status) {
    case LYNX_OK: return "success";
    case LYNX_ERR_BAD_ARGUMENT: return "bad argument (a size, alignment or LoRA rank the kernels do not take)";
    case LYNX_ERR_CANNOT_IMPLEMENT: return "CUTLASS cannot implement this GEMM (shape or alignment)";
    case LYNX_ERR_WORKSPACE: return "GEMM workspace smaller than the plan's";
    case LYNX_ERR_INIT: return "CUTLASS GEMM initialisation failed";
    case LYNX_ERR_RUN: return "GEMM launch failed";
    case LYNX_ERR_NO_CONFIG: return "no such GEMM configuration for this GEMM type";
    case LYNX_ERR_BAD_OVERRIDE:
      return "LYNX_GEMM_CONFIG is not <config>[:swizzle[:raster]] with a compiled configuration, swizzle 1/2/4/8 "
             "and raster 0/1/2";
    default: return "unknown lynx status";
  }
}

LYNX_API int lynx_num_configs(void) { return kNumConfigs; }

LYNX_API const char* lynx_config_name(int config) {
  return (config >= 0 && config < kNumConfigs) ? kConfigs[config].name : nullptr;
}

LYNX_API long long lynx_sparse_gemm_workspace(int config, int M, int N, int K, int sm_count) {
  if (config < 0 || config >= kNumConfigs) return -1;
  LynxGemmParams p{};
  p.M = M; p.N = N; p.K = K; p.swizzle = 1; p.sm_count = sm_count;
  return static_cast<long long>(kConfigs[config].ws(p));
}

LYNX_API int lynx_gemm_plan(int gemm_type, int M, int N, int K, int layer_k, int sm_count, LynxGemmPlan* plan) {
  if (plan == nullptr || M < 0 || N < 0 || K <= 0 || layer_k <= 0) return LYNX_ERR_BAD_ARGUMENT;
  const ConfigOverride& forced = config_override();
  if (forced.set && !forced.valid) return LYNX_ERR_BAD_OVERRIDE;
  const TileChoice choice = forced.set ? TileChoice{forced.tile, forced.swizzle, forced.raster}
                                       : choose_tile(gemm_type, M, N, layer_k);
  const int config = config_index(gemm_type, choice.tile);
  if (config < 0) return LYNX_ERR_NO_CONFIG;
  const long long workspace = lynx_sparse_gemm_workspace(config, M, N, K, sm_count);
  if (workspace < 0) return LYNX_ERR_NO_CONFIG;
  *plan = LynxGemmPlan{config, choice.swizzle, choice.raster, workspace};
  return LYNX_OK;
}

LYNX_API int lynx_sparse_gemm(int config, const void* a_comp, const void* e, const void* w, const float* scale,
                              const float* col_scale, const void* bias, void* d, int M, int N, int K, int swizzle,
                              int raster, int device_id, int sm_count, int pdl, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  if (config < 0 || config >= kNumConfigs) return LYNX_ERR_NO_CONFIG;
  if (M == 0 || N == 0) return LYNX_OK;
  LynxGemmParams p{a_comp, e, w, scale, col_scale, bias, d, M, N, K, swizzle, raster, device_id, sm_count, pdl,
                   workspace, workspace_bytes};
  return kConfigs[config].run(p, stream);
}
