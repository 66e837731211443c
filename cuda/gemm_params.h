// lynx: the plain-data parameters every GEMM configuration takes (no torch, no CUTLASS types); internal to the
// library, between api.cu and the per-configuration translation units (gemm_sm90.cuh).
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

struct LynxGemmParams {
  const void* a_comp;     // compressed sparse activation values (M x K/2)
  const void* e;          // metadata (lynx_metadata_bytes(M, K) bytes)
  const void* w;          // dense weight (N x K, row-major)
  const float* scale;     // per-row scale (M) or nullptr (-> 1)
  const float* col_scale; // per-column scale (N) or nullptr (-> 1); read by e4m3 configurations only
  const void* bias;       // per-column bias (N) or nullptr (-> 0)
  void* d;                // output (M x N, row-major)
  int M, N, K;
  int swizzle, raster;    // tile-scheduler knobs: max swizzle 1/2/4/8; raster 0 heuristic, 1 along M, 2 along N
  int device_id, sm_count;
  int pdl;                // launch with programmatic dependent launch (overlaps the prologue with the previous kernel)
  void* workspace;
  size_t workspace_bytes;
};
