// lynx: sm90 2:4-sparse GEMM (wgmma.sp via CUTLASS 3.x CollectiveBuilder, OpClassSparseTensorOp).
//   D[M,N] = s[m] * (A~[M,K] . W[N,K]^T) + bias[n]                 16-bit operands
//   D[M,N] = s[m] * (c[n] * (A~[M,K] . W[N,K]^T)) + bias[n]        e4m3 operands, c the weight's per-column scale
// A~ (the sparsified activation) is the sparse operand: compressed values (M x K/2, row-major) plus metadata E
// in CUTLASS's sm90 layout (see sparsify.cu). W is the dense operand, row-major (N x K) = K-major.
// Epilogue (EVT): per-row fp32 scale, per-column fp32 scale (e4m3 only), per-column bias in the output dtype (every
// pointer nullptr -> 1, 1 and 0). A folded LoRA term arrives as extra K columns of A~ and W (see sparsify.cu), so the
// epilogue has no source operand. e4m3 configurations accumulate with the FP8 fast-accumulation schedules, as
// rowwise-scaled FP8 inference GEMMs usually do.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/cluster_launch.hpp"

#include "gemm_params.h"
#include "lynx_api.h"

namespace lynx {

using namespace cute;

template <class ElementOperand, class ElementOut, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule, class TileScheduler = void>
struct SparseGemm {
  using ElementA = ElementOperand;
  using ElementB = ElementOperand;
  using ElementD = ElementOut;
  using ElementC = void;
  using ElementAcc = float;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // (K x N) column-major == W (N x K) row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr bool kE4M3 = cute::sizeof_bits_v<ElementOperand> == 8;
  // In elements: 16 bytes of W and D; A's alignment counts logical (uncompressed) columns.
  static constexpr int kAlignA = kE4M3 ? 32 : 8;
  static constexpr int kAlignB = kE4M3 ? 16 : 8;
  static constexpr int kAlignD = 8;
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;

  using ScaleCol = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>, 1>;
  using WeightScaleRow = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 4>;
  using BiasRow = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, int64_t>, kAlignD>;
  // The product the row scale multiplies: the accumulator, times the weight's column scale for e4m3.
  using Product = cute::conditional_t<
      kE4M3,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, RN>,
          WeightScaleRow, cutlass::epilogue::fusion::Sm90AccFetch>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
  using EVT = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, ElementCompute, RN>,
      ScaleCol, Product, BiasRow>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      ElementC, LayoutD, kAlignD, ElementD, LayoutD, kAlignD, EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                      TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static typename Gemm::Arguments make_args(const LynxGemmParams& p) {
    auto problem = make_tuple(p.M, p.N, p.K, 1);
    auto layout_a = SparseConfig::fill_layoutA(problem);
    auto layout_e = SparseConfig::fill_layoutE(problem);
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(p.N, p.K, 1));
    auto stride_c = cutlass::make_cute_packed_stride(StrideC{}, make_shape(p.M, p.N, 1));
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(p.M, p.N, 1));
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = problem;
    args.mainloop = {static_cast<const ElementA*>(p.a_comp), layout_a, static_cast<const ElementB*>(p.w), stride_b,
                     static_cast<const typename CollectiveMainloop::ElementE*>(p.e), layout_e};
    typename ScaleCol::Arguments scale_args{p.scale, 1.0f, {}};
    typename BiasRow::Arguments bias_args{static_cast<const ElementD*>(p.bias), ElementD(0), {}};
    if constexpr (kE4M3) {
      typename WeightScaleRow::Arguments col_scale_args{p.col_scale, 1.0f, {}};
      args.epilogue.thread = {scale_args, {col_scale_args, {}, {}}, bias_args, {}};
    } else {
      args.epilogue.thread = {scale_args, {}, bias_args, {}};
    }
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = stride_c;
    args.epilogue.ptr_D = static_cast<ElementD*>(p.d);
    args.epilogue.dD = stride_d;
    args.hw_info.device_id = p.device_id;
    args.hw_info.sm_count = p.sm_count;
    args.scheduler.max_swizzle_size = p.swizzle;
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order = p.raster == 1 ? Raster::AlongM : (p.raster == 2 ? Raster::AlongN : Raster::Heuristic);
    return args;
  }

  static int run(const LynxGemmParams& p, cudaStream_t stream) {
    auto args = make_args(p);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return LYNX_ERR_CANNOT_IMPLEMENT;
    size_t ws = Gemm::get_workspace_size(args);
    if (ws > p.workspace_bytes) return LYNX_ERR_WORKSPACE;
    // CUTLASS's initialize() and run() set the kernel's function attributes (dynamic shared memory, non-portable
    // cluster size) on every call: two cudaFuncSetAttribute calls, host time that a forward of many small GEMMs
    // feels. The attributes belong to the device's context and never change, so after the first call on a device
    // the kernel is launched directly, with the launch configuration CUTLASS would use.
    static std::atomic<uint64_t> attributes_set{0};
    const uint64_t device_bit = p.device_id >= 0 && p.device_id < 64 ? uint64_t(1) << p.device_id : 0;
    if (ws != 0 || !(attributes_set.load(std::memory_order_acquire) & device_bit)) {
      if (gemm.initialize(args, p.workspace, stream) != cutlass::Status::kSuccess) return LYNX_ERR_INIT;
      if (gemm.run(stream, nullptr, p.pdl != 0) != cutlass::Status::kSuccess) return LYNX_ERR_RUN;
      attributes_set.fetch_or(device_bit, std::memory_order_release);
    } else {
      typename Kernel::Params params = Kernel::to_underlying_arguments(args, p.workspace);
      const dim3 cluster(size<0>(ClusterShape{}), size<1>(ClusterShape{}), size<2>(ClusterShape{}));
      auto config = cutlass::ClusterLauncher::make_cluster_launch_config(
          Gemm::get_grid_shape(params), cluster, Kernel::get_block_shape(), Kernel::SharedStorageSize, stream,
          p.pdl != 0);
      void* kernel_params[] = {&params};
      if (cudaLaunchKernelExC(&config.launch_config, reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>),
                              kernel_params) != cudaSuccess) {
        return LYNX_ERR_RUN;
      }
    }
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? 0 : LYNX_ERR_CUDA_BASE - static_cast<int>(err);
  }

  static size_t workspace(const LynxGemmParams& p) { return Gemm::get_workspace_size(make_args(p)); }
};

}  // namespace lynx

// One translation unit per configuration: defines lynx_gemm_<NAME>_run / _ws.
#define LYNX_DEFINE_GEMM(NAME, ...)                                                               \
  using NAME##_t = lynx::SparseGemm<__VA_ARGS__>;                                                 \
  int lynx_gemm_##NAME##_run(const LynxGemmParams& p, cudaStream_t s) { return NAME##_t::run(p, s); } \
  size_t lynx_gemm_##NAME##_ws(const LynxGemmParams& p) { return NAME##_t::workspace(p); }
