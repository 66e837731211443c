// lynx: online 2:4 activation sparsification for the sm90 sparse GEMM.
//
// One read of X (M x K, row-major, bf16/fp16) produces (32..256 threads per token row, by K)
//   * the compressed values A_c (M x K/2, row-major): the two kept entries of each group of 4, in index order;
//   * the metadata E in the exact layout the CUTLASS sm90 sparse mainloop (TileK = 128) loads with TMA;
//   * the per-token norm-compensation scale s = sqrt(||x||^2 / (||x~||^2 + eps)) in fp32 (1 without compensation).
// For the e4m3 GEMM (lynx_sparsify_2to4_e4m3) the kept values are quantized to e4m3 with a per-token scale from
// their largest magnitude, found once the whole row is in registers, and the row's scale carries both: s * amax / 448.
//
// Optional LoRA tail (the folded low-rank term): T (M x r, x's dtype) = x . lora_down^T, computed before this kernel.
// Each row's T / s is appended to its compressed values (A_c then has row stride K/2 + r) as r dense values over
// 2r logical columns, entries 0 and 1 of each group of 4 (metadata code 0x4, the same as padding). Against the weight
// [W | lora_up spread the same way] the one sparse GEMM then adds T . lora_up^T, and the epilogue's scale s turns
// T / s back into T. An all-zero token (s = 0) has T = 0 and gets a zero tail.
//
// Selection: top-2 |x| of each group of 4; ties go to the lower index; -0 and +0 tie; NaN ranks above
// everything (all NaNs tie), then +-inf. Done on the magnitude bits, which order like the magnitudes.
//
// E layout (logical units, 8 logical elements per metadata byte; from cute's Sm90GemmSparseConfig::fill_layoutE):
// atoms of 64 (m) x 128 (k), atoms along m first (stride 8192), then along k (stride M_padE * 128). Inside an
// atom, for 16-bit values, with m = m0 + 8 m1 + 16 m2 and k = k0 + 16 k1 + 32 k2:
// offset = k0 + 16 m1 + 32 k2 + 128 m0 + 1024 k1 + 2048 m2; for 8-bit values, offset = k + 128 m.
// Each group's 4-bit code is idx0 | idx1 << 2 (idx0 < idx1); the lower group of a byte sits in its low nibble.
// Padding (rows M..M_padE, columns K..K_padE) gets the valid code 0x4 (entries 0 and 1).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "lynx_api.h"

namespace {

constexpr int kBlockThreads = 256;
constexpr int kUnroll = 4;         // 16-element units per lane in flight

template <bool kBF16>
__device__ __forceinline__ uint16_t from_float(float f) {
  if constexpr (kBF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  } else {
    return __half_as_ushort(__float2half_rn(f));
  }
}

// The two values packed in a 32-bit word, as floats (low half first).
template <bool kBF16>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (kBF16) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
}

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op (Sum or Max) of v over the kRowThreads threads of one token row, returned to each of them. red: kBlockThreads / 32
// floats of shared memory, free on entry (the first barrier waits for the previous call's readers).
template <int kRowThreads, class Op = Sum>
__device__ __forceinline__ float row_reduce(float v, float* red, Op op = Op{}) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (kRowThreads > 32) {
    constexpr int kWarpsPerRow = kRowThreads / 32;
    const int warp = threadIdx.x >> 5, first_warp = warp - warp % kWarpsPerRow;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    v = red[first_warp];
#pragma unroll
    for (int i = 1; i < kWarpsPerRow; ++i) v = op(v, red[first_warp + i]);
  }
  return v;
}

// The elementwise producers, in fp32 as the framework computes them before rounding to the activation's dtype.
template <int kProducer>
__device__ __forceinline__ float activation(float v) {
  if constexpr (kProducer == LYNX_PRODUCER_GELU) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  } else if constexpr (kProducer == LYNX_PRODUCER_GELU_TANH) {
    return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  } else {
    static_assert(kProducer == LYNX_PRODUCER_SILU, "not an elementwise producer");
    return v / (1.f + expf(-v));
  }
}

// Applies the producer to one unit of 16 values (two uint4 of packed pairs) in place.
// Layer norm: y = (x - mean) * rstd * mul[k] + add[k], mul/add the row's sample's fp32 rows (nullptr: 1 and 0).
template <bool kBF16, int kProducer>
__device__ __forceinline__ void produce_unit(uint4 (&unit)[2], float mean, float rstd, const float* mul,
                                             const float* add) {
  uint32_t* w = reinterpret_cast<uint32_t*>(unit);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float2 f = unpack2<kBF16>(w[i]);
    if constexpr (kProducer == LYNX_PRODUCER_LAYER_NORM) {
      f.x = (f.x - mean) * rstd;
      f.y = (f.y - mean) * rstd;
      if (mul != nullptr) {
        const float2 a = __ldg(reinterpret_cast<const float2*>(mul) + i);
        f.x *= a.x;
        f.y *= a.y;
      }
      if (add != nullptr) {
        const float2 b = __ldg(reinterpret_cast<const float2*>(add) + i);
        f.x += b.x;
        f.y += b.y;
      }
    } else {
      f.x = activation<kProducer>(f.x);
      f.y = activation<kProducer>(f.y);
    }
    w[i] = uint32_t(from_float<kBF16>(f.x)) | (uint32_t(from_float<kBF16>(f.y)) << 16);
  }
}

// Sum over the 16 values of a unit of f(value).
template <bool kBF16, class F>
__device__ __forceinline__ float unit_sum(const uint4 (&unit)[2], F f) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(unit);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 v = unpack2<kBF16>(w[i]);
    acc += f(v.x) + f(v.y);
  }
  return acc;
}

// One group of 4 values in two words (value i in bits 16(i%2).. of word i/2). Returns the two kept values packed in
// a word (lower index in the low half) and the 4-bit code; adds the squares.
//
// Most of the kernel's instructions are here, hence the branch-free form: each rank key is |x|'s bits (every NaN
// clamped to one key just above inf, both with one 16x2 op per word) shifted left by 2 with 3 - index in the low
// bits, so all four keys differ and a tie goes to the lower index. A 4-input top-2 network of 8 min/max then yields
// the two winners, whose low bits give back their indices, and one byte permute gathers their values.
template <bool kBF16>
__device__ __forceinline__ uint32_t select_group(uint32_t lo, uint32_t hi, uint32_t& code, float& dense_sq,
                                                 float& kept_sq, float& kept_amax) {
  constexpr uint32_t kNaNKey = kBF16 ? 0x7f817f81u : 0x7c017c01u;
  uint32_t mlo, mhi;
  asm("min.u16x2 %0, %1, %2;" : "=r"(mlo) : "r"(lo & 0x7fff7fffu), "r"(kNaNKey));
  asm("min.u16x2 %0, %1, %2;" : "=r"(mhi) : "r"(hi & 0x7fff7fffu), "r"(kNaNKey));
  const uint32_t k0 = ((mlo << 2) & 0x3fffcu) | 3u, k1 = ((mlo >> 14) & ~3u) | 2u;
  const uint32_t k2 = ((mhi << 2) & 0x3fffcu) | 1u, k3 = (mhi >> 14) & ~3u;
  const uint32_t w01 = max(k0, k1), l01 = min(k0, k1), w23 = max(k2, k3), l23 = min(k2, k3);
  const uint32_t first = max(w01, w23), second = max(min(w01, w23), max(l01, l23));
  const uint32_t ia = ~first & 3u, ib = ~second & 3u;
  const uint32_t i0 = min(ia, ib), i1 = max(ia, ib);
  code = i0 | (i1 << 2);
  // Bytes 2i and 2i + 1 of {lo, hi} hold value i.
  const uint32_t kept = __byte_perm(lo, hi, i0 * 0x22u + i1 * 0x2200u + 0x1010u);
  const float2 f01 = unpack2<kBF16>(lo), f23 = unpack2<kBF16>(hi), fk = unpack2<kBF16>(kept);
  dense_sq += f01.x * f01.x + f01.y * f01.y + f23.x * f23.x + f23.y * f23.y;
  kept_sq += fk.x * fk.x + fk.y * fk.y;
  kept_amax = fmaxf(kept_amax, fmaxf(fabsf(fk.x), fabsf(fk.y)));
  return kept;
}

template <bool kE4M3>
__device__ __forceinline__ int64_t e_byte_offset(int m, int k, int64_t m_pad) {
  // k is a multiple of 16 (k0 = 0).
  if constexpr (kE4M3) return (int64_t(k >> 7) * m_pad * 128 + int64_t(m) * 128 + (k & 127)) >> 3;
  const int am = m >> 6, mi = m & 63, ak = k >> 7, ki = k & 127;
  const int64_t off = int64_t(am) * 8192 + int64_t(ak) * m_pad * 128 + ((mi >> 3) & 1) * 16 + (ki >> 5) * 32 +
                      (mi & 7) * 128 + ((ki >> 4) & 1) * 1024 + (mi >> 4) * 2048;
  return off >> 3;
}

// Two floats as two e4m3 bytes (low byte first); out-of-range values saturate to +-448, NaN stays NaN.
__device__ __forceinline__ uint32_t to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// The four kept pairs of a unit (8 values, 16-bit) times q, as 8 e4m3 bytes.
template <bool kBF16>
__device__ __forceinline__ uint2 quantize_unit(const uint4& kept, float q) {
  const float2 a = unpack2<kBF16>(kept.x), b = unpack2<kBF16>(kept.y), c = unpack2<kBF16>(kept.z),
               d = unpack2<kBF16>(kept.w);
  return make_uint2(to_e4m3x2(a.x * q, a.y * q) | (to_e4m3x2(b.x * q, b.y * q) << 16),
                    to_e4m3x2(c.x * q, c.y * q) | (to_e4m3x2(d.x * q, d.y * q) << 16));
}

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// kE4M3: the values are written as e4m3 once the whole row (one round of loads: the entry point checks K) is
// selected, with the row's dequantization scale.
// kE4M3 holds a row's kept values until amax is known: with a layer-norm or erf-GELU producer that takes the registers
// of 3 blocks per SM (4 spill); the others fit 4 blocks, the most memory in flight.
template <int kProducer, bool kE4M3>
constexpr int kMinBlocksPerSM = kE4M3 && (kProducer == LYNX_PRODUCER_LAYER_NORM || kProducer == LYNX_PRODUCER_GELU) ? 3 : 4;

template <bool kBF16, int kRowThreads, int kProducer, bool kE4M3>
__global__ void __launch_bounds__(kBlockThreads, (kMinBlocksPerSM<kProducer, kE4M3>))
sparsify_2to4_kernel(const uint16_t* __restrict__ x, int64_t ldx, int M, int K, int m_pad, int k_pad,
                     void* __restrict__ a_comp, uint8_t* __restrict__ e, float* __restrict__ scale,
                     int norm, float eps, const uint16_t* __restrict__ tail, int rank, LynxProducer producer,
                     int rows_per_sample) {
  // Let a PDL-launched GEMM start its prologue now; it waits (griddepcontrol.wait) for our completion.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const int t = threadIdx.x % kRowThreads;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kRowThreads;
  const bool in_pad = row < m_pad;
  const int units = K >> 4, units_pad = k_pad >> 4;
  const bool live = row < M;
  const uint16_t* xr = x + int64_t(row) * ldx;
  const int a_ld = (K >> 1) + rank;
  uint16_t* ar = static_cast<uint16_t*>(a_comp) + int64_t(row) * a_ld;
  uint8_t* ar8 = static_cast<uint8_t*>(a_comp) + int64_t(row) * a_ld;
  float dense_sq = 0.f, kept_sq = 0.f, kept_amax = 0.f;
  // kE4M3: after the selection in[u][0] holds unit u's kept pairs, quantized once the row's amax is known.
  uint4 in[kUnroll][2];
  __shared__ float red[kBlockThreads / 32];
  if (in_pad) {
    for (int base = 0; base < units_pad; base += kRowThreads * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int unit = base + u * kRowThreads + t;
        if (live && unit < units) {
          const uint4* p = reinterpret_cast<const uint4*>(xr + unit * 16);
          in[u][0] = ldg_stream(p);
          in[u][1] = ldg_stream(p + 1);
        }
      }
      if constexpr (kProducer == LYNX_PRODUCER_LAYER_NORM) {
        // The whole row is in registers (one round of loads: the entry point checks K), so its statistics are
        // two row sums away; two passes (mean, then squared deviations) as the framework's layer norm.
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (live && base + u * kRowThreads + t < units) sum += unit_sum<kBF16>(in[u], [](float v) { return v; });
        }
        const float mean = row_reduce<kRowThreads>(sum, red) / K;
        float sq = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (live && base + u * kRowThreads + t < units) {
            sq += unit_sum<kBF16>(in[u], [mean](float v) { return (v - mean) * (v - mean); });
          }
        }
        const float rstd = rsqrtf(row_reduce<kRowThreads>(sq, red) / K + producer.norm_eps);
        const int64_t sample_offset = int64_t(live ? row / rows_per_sample : 0) * K;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int unit = base + u * kRowThreads + t;
          if (live && unit < units) {
            const int64_t at = sample_offset + unit * 16;
            produce_unit<kBF16, kProducer>(in[u], mean, rstd, producer.mul ? producer.mul + at : nullptr,
                                           producer.add ? producer.add + at : nullptr);
          }
        }
      } else if constexpr (kProducer != LYNX_PRODUCER_NONE) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (live && base + u * kRowThreads + t < units) produce_unit<kBF16, kProducer>(in[u], 0.f, 0.f, nullptr, nullptr);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int unit = base + u * kRowThreads + t;
        if (unit >= units_pad) break;
        uint32_t meta = 0x4444u;
        if (live && unit < units) {
          uint4 outv;
          uint32_t c0, c1, c2, c3;
          outv.x = select_group<kBF16>(in[u][0].x, in[u][0].y, c0, dense_sq, kept_sq, kept_amax);
          outv.y = select_group<kBF16>(in[u][0].z, in[u][0].w, c1, dense_sq, kept_sq, kept_amax);
          outv.z = select_group<kBF16>(in[u][1].x, in[u][1].y, c2, dense_sq, kept_sq, kept_amax);
          outv.w = select_group<kBF16>(in[u][1].z, in[u][1].w, c3, dense_sq, kept_sq, kept_amax);
          meta = c0 | (c1 << 4) | (c2 << 8) | (c3 << 12);
          if constexpr (kE4M3) {
            in[u][0] = outv;
          } else {
            *reinterpret_cast<uint4*>(ar + unit * 8) = outv;
          }
        }
        *reinterpret_cast<uint16_t*>(e + e_byte_offset<kE4M3>(row, unit * 16, m_pad)) = static_cast<uint16_t>(meta);
      }
    }
  }
  // Every thread of the row needs s for the LoRA tail, so each gets the row's sums.
  dense_sq = row_reduce<kRowThreads>(dense_sq, red);
  kept_sq = row_reduce<kRowThreads>(kept_sq, red);
  if constexpr (kE4M3) {
    // The tail (T / s) shares the row's e4m3 scale, so its largest magnitude counts too.
    float tail_amax = 0.f;
    const uint32_t* tr = reinterpret_cast<const uint32_t*>(tail + int64_t(live ? row : 0) * rank);
    for (int j = t; live && tail != nullptr && j < (rank >> 1); j += kRowThreads) {
      const float2 pair = unpack2<kBF16>(tr[j]);
      tail_amax = fmaxf(tail_amax, fmaxf(fabsf(pair.x), fabsf(pair.y)));
    }
    kept_amax = row_reduce<kRowThreads>(kept_amax, red, Max{});
    tail_amax = row_reduce<kRowThreads>(tail_amax, red, Max{});
    if (!live) return;
    const float s = norm ? sqrtf(dense_sq / (kept_sq + eps)) : 1.0f;
    const float inv_s = s == 0.f ? 0.f : 1.0f / s;
    const float row_amax = fmaxf(kept_amax, tail_amax * inv_s);
    const float amax = row_amax > 0.f ? fmaxf(row_amax, ldexpf(1.f, LYNX_E4M3_MIN_AMAX_EXP2)) : row_amax;
    const float q = amax > 0.f ? float(LYNX_E4M3_MAX) / amax : 0.f;
    if (t == 0 && scale != nullptr) scale[row] = s * (amax / float(LYNX_E4M3_MAX));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int unit = u * kRowThreads + t;
      if (unit < units) *reinterpret_cast<uint2*>(ar8 + unit * 8) = quantize_unit<kBF16>(in[u][0], q);
    }
    uint16_t* dst = reinterpret_cast<uint16_t*>(ar8 + (K >> 1));
    for (int j = t; tail != nullptr && j < (rank >> 1); j += kRowThreads) {
      const float2 pair = unpack2<kBF16>(tr[j]);
      const float qs = q * inv_s;
      dst[j] = static_cast<uint16_t>(to_e4m3x2(pair.x * qs, pair.y * qs));
    }
    return;
  }
  if (!live) return;
  const float s = norm ? sqrtf(dense_sq / (kept_sq + eps)) : 1.0f;
  if (t == 0 && scale != nullptr) scale[row] = s;
  if (tail != nullptr) {
    const float inv_s = s == 0.f ? 0.f : 1.0f / s;
    const uint32_t* tr = reinterpret_cast<const uint32_t*>(tail + int64_t(row) * rank);
    uint32_t* dst = reinterpret_cast<uint32_t*>(ar + (K >> 1));
    for (int j = t; j < (rank >> 1); j += kRowThreads) {
      const float2 pair = unpack2<kBF16>(tr[j]);
      dst[j] = uint32_t(from_float<kBF16>(pair.x * inv_s)) | (uint32_t(from_float<kBF16>(pair.y * inv_s)) << 16);
    }
  }
}

template <bool kBF16, int kRowThreads, int kProducer, bool kE4M3>
void launch_sparsify(const void* x, long long ldx, int M, int K, int m_pad, int k_pad, void* a_comp, void* e,
                     float* scale, int norm, float eps, const void* tail, int rank, const LynxProducer& producer,
                     int rows_per_sample, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const dim3 grid((m_pad + kRowsPerBlock - 1) / kRowsPerBlock);
  sparsify_2to4_kernel<kBF16, kRowThreads, kProducer, kE4M3><<<grid, kBlockThreads, 0, stream>>>(
      static_cast<const uint16_t*>(x), ldx, M, K, m_pad, k_pad, a_comp,
      static_cast<uint8_t*>(e), scale, norm, eps, static_cast<const uint16_t*>(tail), rank, producer,
      rows_per_sample);
}

using LaunchFn = void (*)(const void*, long long, int, int, int, int, void*, void*, float*, int, float, const void*,
                         int, const LynxProducer&, int, cudaStream_t);

// Threads per token row: enough that each thread has at most kUnroll units (one round of loads), so
// long rows are split over more threads and the grid has many short blocks (no half-empty last wave).
template <bool kBF16, int kProducer, bool kE4M3>
LaunchFn launcher_for(int k_pad) {
  const int need = (k_pad / 16 + kUnroll - 1) / kUnroll;
  return need <= 32 ? launch_sparsify<kBF16, 32, kProducer, kE4M3>
       : need <= 64 ? launch_sparsify<kBF16, 64, kProducer, kE4M3>
       : need <= 128 ? launch_sparsify<kBF16, 128, kProducer, kE4M3>
                     : launch_sparsify<kBF16, 256, kProducer, kE4M3>;
}

template <bool kBF16, bool kE4M3>
LaunchFn launcher_for(int kind, int k_pad) {
  switch (kind) {
    case LYNX_PRODUCER_LAYER_NORM: return launcher_for<kBF16, LYNX_PRODUCER_LAYER_NORM, kE4M3>(k_pad);
    case LYNX_PRODUCER_GELU: return launcher_for<kBF16, LYNX_PRODUCER_GELU, kE4M3>(k_pad);
    case LYNX_PRODUCER_GELU_TANH: return launcher_for<kBF16, LYNX_PRODUCER_GELU_TANH, kE4M3>(k_pad);
    case LYNX_PRODUCER_SILU: return launcher_for<kBF16, LYNX_PRODUCER_SILU, kE4M3>(k_pad);
    default: return launcher_for<kBF16, LYNX_PRODUCER_NONE, kE4M3>(k_pad);
  }
}

template <bool kE4M3>
int sparsify(int is_bf16, const void* x, long long ldx, int M, int K, void* a_comp, void* e, float* scale, int norm,
             float eps, const void* tail, int rank, const LynxProducer* producer, cudaStream_t stream) {
  // e4m3 values: each row of K/2 + rank bytes starts 16-byte aligned for the GEMM's loads.
  const int rank_multiple = kE4M3 ? 16 : 8;
  if (M < 0 || K <= 0 || (K % 16) != 0 || (ldx % 8) != 0) return LYNX_ERR_BAD_ARGUMENT;
  if (rank < 0 || (rank % rank_multiple) != 0 || (rank > 0) != (tail != nullptr)) return LYNX_ERR_BAD_ARGUMENT;
  if (kE4M3 && (K / 2 + rank) % 16 != 0) return LYNX_ERR_BAD_ARGUMENT;
  const LynxProducer none{LYNX_PRODUCER_NONE, nullptr, nullptr, 1, 0.f};
  const LynxProducer& prod = producer != nullptr ? *producer : none;
  if (prod.kind < LYNX_PRODUCER_NONE || prod.kind > LYNX_PRODUCER_SILU) return LYNX_ERR_BAD_ARGUMENT;
  // A fused producer's output is never written, so nothing could compute a LoRA tail from it.
  if (prod.kind != LYNX_PRODUCER_NONE && rank > 0) return LYNX_ERR_BAD_ARGUMENT;
  if (prod.kind == LYNX_PRODUCER_LAYER_NORM && (prod.samples <= 0 || M % prod.samples)) return LYNX_ERR_BAD_ARGUMENT;
  const int rows_per_sample = prod.samples > 0 && M > 0 ? M / prod.samples : 1;
  const int m_pad = (M + 63) / 64 * 64;
  const int k_pad = (K + 2 * rank + 127) / 128 * 128;
  if ((kE4M3 || prod.kind == LYNX_PRODUCER_LAYER_NORM) && k_pad > LYNX_WHOLE_ROW_MAX_K) return LYNX_ERR_BAD_ARGUMENT;
  if (m_pad == 0) return LYNX_OK;
  const LaunchFn launch = is_bf16 ? launcher_for<true, kE4M3>(prod.kind, k_pad) : launcher_for<false, kE4M3>(prod.kind, k_pad);
  launch(x, ldx, M, K, m_pad, k_pad, a_comp, e, scale, norm, eps, tail, rank, prod, rows_per_sample, stream);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? LYNX_OK : LYNX_ERR_CUDA_BASE - static_cast<int>(err);
}

}  // namespace

// Declared, with their buffers, in lynx_api.h.
LYNX_API int lynx_sparsify_2to4(int is_bf16, const void* x, long long ldx, int M, int K, void* a_comp, void* e,
                                float* scale, int norm, float eps, const void* tail, int rank,
                                const LynxProducer* producer, cudaStream_t stream) {
  return sparsify<false>(is_bf16, x, ldx, M, K, a_comp, e, scale, norm, eps, tail, rank, producer, stream);
}

LYNX_API int lynx_sparsify_2to4_e4m3(int is_bf16, const void* x, long long ldx, int M, int K, void* a_comp, void* e,
                                     float* scale, int norm, float eps, const void* tail, int rank,
                                     const LynxProducer* producer, cudaStream_t stream) {
  return sparsify<true>(is_bf16, x, ldx, M, K, a_comp, e, scale, norm, eps, tail, rank, producer, stream);
}

// The E layout above pads M to 64 rows and K to 128 logical columns.
LYNX_API long long lynx_metadata_bytes(int M, int K) {
  const long long m_pad = (static_cast<long long>(M) + 63) / 64 * 64;
  const long long k_pad = (static_cast<long long>(K) + 127) / 128 * 128;
  return m_pad * k_pad / 8;
}
