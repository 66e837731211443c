#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

// Plain-data parameters shared by all GEMM configurations (no torch, no CUTLASS types).
struct LynxGemmParams {
  const void* a_comp;  // compressed sparse activation values (M x K/2)
  const void* e;       // metadata (lynx_metadata_bytes(M, K) bytes)
  const void* w;       // dense weight (N x K, row-major)
  const float* scale;  // per-row scale (M) or nullptr (-> 1)
  const void* bias;    // per-column bias (N) or nullptr (-> 0)
  void* d;             // output (M x N, row-major)
  int M, N, K;
  int swizzle, raster; // tile-scheduler knobs: max swizzle 1/2/4/8; raster 0 heuristic, 1 along M, 2 along N
  int device_id, sm_count;
  int pdl;             // launch with programmatic dependent launch (overlaps the prologue with the previous kernel)
  void* workspace;
  size_t workspace_bytes;
};

enum {
  LYNX_ERR_CANNOT_IMPLEMENT = -2,
  LYNX_ERR_WORKSPACE = -3,
  LYNX_ERR_INIT = -4,
  LYNX_ERR_RUN = -5,
  LYNX_ERR_NO_CONFIG = -6,
  LYNX_ERR_CUDA_BASE = -1000,
};
