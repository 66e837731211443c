// lynx: the CUDA kernels of lynx::sparse_linear and lynx::sparse_linear_lora, in C++.
//
// A DiT forward calls these ops once per sparse layer, and without CUDA graphs its speed is set by host
// time: the same work in Python (allocations, ctypes marshalling, stream lookups) cost about three times
// a cuBLAS F.linear call. This file does the supported case in C++ and hands every other case (another
// pattern, dtype or device, a shape the kernels can't take, LoRA factors not yet packed) to the Python
// implementation in lynx_compile.kernels, which falls back to the reference op with a warning.
//
// Built by lynx_compile.kernels with torch.utils.cpp_extension against the running torch (the CUTLASS
// kernels themselves live in the torch-independent liblynx_kernels.so, reached through the function
// pointers handed to init()). Loading the module registers the two CUDA kernels with the dispatcher.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <mutex>
#include <unordered_map>

namespace {

using SparsifyFn = int (*)(int, const void*, long long, int, int, void*, void*, float*, int, float, int, const void*,
                           int, cudaStream_t);
using GemmFn = int (*)(int, const void*, const void*, const void*, const float*, const void*, void*, int, int, int,
                       int, int, int, int, int, void*, size_t, cudaStream_t);
using MetadataBytesFn = long long (*)(int, int);

constexpr int kMaxDevices = 64;

SparsifyFn g_sparsify = nullptr;
GemmFn g_gemm = nullptr;
MetadataBytesFn g_metadata_bytes = nullptr;
// The multiples of in_features and out_features the kernels take (kernels.K_MULTIPLE, N_MULTIPLE).
int64_t g_k_multiple = 0, g_n_multiple = 0;
bool g_pdl = true;
// Python callables: plan(is_bf16, M, N, K, layer_k, device) -> (config, swizzle, raster, workspace bytes), run once
// per GEMM shape; fallback_linear / fallback_lora: the Python implementations of the two ops.
py::object* g_plan_fn = nullptr;
py::object* g_fallback_linear = nullptr;
py::object* g_fallback_lora = nullptr;

struct Plan {
  int config, swizzle, raster;
  int64_t workspace;
};
using PlanKey = std::array<int64_t, 6>;
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 0;
    for (int64_t v : k) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
std::mutex g_plan_mutex;
std::unordered_map<PlanKey, Plan, PlanKeyHash> g_plans;

// Per device: -1 unknown, 0 not sm_90, else the SM count.
std::array<int, kMaxDevices> g_sm_count = [] {
  std::array<int, kMaxDevices> a{};
  a.fill(-1);
  return a;
}();

int sm90_sm_count(int device) {
  if (device < 0 || device >= kMaxDevices) return 0;
  int& cached = g_sm_count[device];
  if (cached < 0) {
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cached = (major == 9 && minor == 0) ? sms : 0;
  }
  return cached;
}

Plan plan_for(bool is_bf16, int64_t M, int64_t N, int64_t K, int64_t layer_k, int device) {
  const PlanKey key{is_bf16, M, N, K, layer_k, device};
  {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) return it->second;
  }
  Plan plan;
  {
    py::gil_scoped_acquire gil;
    auto t = (*g_plan_fn)(is_bf16, M, N, K, layer_k, device).cast<std::tuple<int, int, int, int64_t>>();
    plan = {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t)};
  }
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  g_plans.emplace(key, plan);
  return plan;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// The kernels take the call: 2:4, bf16/fp16, one sm_90 device, K and N multiples of what the tiles need.
bool kernel_takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t n,
                  int64_t m, int64_t in_features) {
  if (n != 2 || m != 4 || !g_sparsify || !g_gemm) return false;
  const auto dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (weight.scalar_type() != dtype || weight.device() != x.device() || weight.dim() != 2) return false;
  if (bias && (bias->device() != x.device() || bias->dim() != 1 || bias->size(0) != weight.size(0))) return false;
  if (in_features % g_k_multiple != 0 || weight.size(0) % g_n_multiple != 0) return false;
  return sm90_sm_count(x.device().index()) > 0;
}

void check(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "lynx ", what, " failed with code ", rc,
              rc <= -1000 ? std::string(": ") + cudaGetErrorString(static_cast<cudaError_t>(-1000 - rc))
                          : std::string());
}

// T = x2 . lora_down^T (M x r; both row-major, contiguous), with one cuBLAS call on torch's handle for the current
// stream: through at::mm the dispatch, checks and output handling cost about as much host time as the rest of the op.
at::Tensor down_project(const at::Tensor& x2, const at::Tensor& lora_down) {
  const int64_t M = x2.size(0), K = x2.size(1), rank = lora_down.size(0);
  at::Tensor t = at::empty({M, rank}, x2.options());
  const cudaDataType_t type = x2.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.f, beta = 0.f;
  // Column-major: T^T (r x M) = lora_down (K x r, transposed) times x2^T (K x M).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_T, CUBLAS_OP_N, rank, M, K, &alpha,
                                    lora_down.const_data_ptr(), type, K, x2.const_data_ptr(), type, K, &beta,
                                    t.data_ptr(), type, rank, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return t;
}

// Sparsify x (appending x . lora_down^T when given) and run the one sparse GEMM against weight (N x (K + 2r)).
at::Tensor launch(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool norm,
                  double eps, const std::optional<at::Tensor>& lora_down) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.device().index();
  const int64_t K = x.size(-1), N = weight.size(0);
  const int64_t rank = lora_down ? lora_down->size(0) : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor x2 = aligned_contiguous(x.reshape({-1, K}));
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out.view(out_shape);
  TORCH_CHECK(M <= INT32_MAX && K + 2 * rank <= INT32_MAX, "lynx: tensor too large for the kernels");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;

  at::Tensor tail;
  if (rank) tail = down_project(x2, *lora_down);
  const int64_t k_total = K + 2 * rank;
  const int64_t meta_bytes = g_metadata_bytes(static_cast<int>(M), static_cast<int>(k_total));
  at::Tensor values = at::empty({M, K / 2 + rank}, x.options());
  at::Tensor meta = at::empty({meta_bytes}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  check(g_sparsify(is_bf16, x2.data_ptr(), K, static_cast<int>(M), static_cast<int>(K), values.data_ptr(),
                   meta.data_ptr(), scale.data_ptr<float>(), norm, static_cast<float>(eps), 0,
                   rank ? tail.data_ptr() : nullptr, static_cast<int>(rank), stream),
        "sparsify");

  const at::Tensor w = aligned_contiguous(weight);
  at::Tensor b;
  if (bias) b = aligned_contiguous(bias->scalar_type() == x.scalar_type() ? *bias : bias->to(x.scalar_type()));
  const Plan plan = plan_for(is_bf16, M, N, k_total, K, device);
  at::Tensor workspace;
  if (plan.workspace > 0) workspace = at::empty({plan.workspace}, x.options().dtype(at::kByte));
  check(g_gemm(plan.config, values.data_ptr(), meta.data_ptr(), w.data_ptr(), scale.data_ptr<float>(),
               b.defined() ? b.data_ptr() : nullptr, out.data_ptr(), static_cast<int>(M), static_cast<int>(N),
               static_cast<int>(k_total), plan.swizzle, plan.raster, device, sm90_sm_count(device), g_pdl,
               workspace.defined() ? workspace.data_ptr() : nullptr, static_cast<size_t>(plan.workspace), stream),
        "sparse GEMM");
  return out.view(out_shape);
}

// Every case the kernels don't take goes to the Python implementation (which raises on bad arguments, or
// warns once and runs the reference op).
template <class... Args>
at::Tensor call_python(py::object* fn, Args&&... args) {
  TORCH_CHECK(fn != nullptr, "lynx: C++ op kernels used before init()");
  py::gil_scoped_acquire gil;
  return (*fn)(std::forward<Args>(args)...).template cast<at::Tensor>();
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t n, int64_t m, bool norm, double eps, const std::optional<at::Tensor>& lora_down,
                         const std::optional<at::Tensor>& lora_up) {
  const bool plain = !lora_down && !lora_up;
  if (!plain || !kernel_takes(x, weight, bias, n, m, x.size(-1)) || weight.size(1) != x.size(-1)) {
    return call_python(g_fallback_linear, x, weight, bias, n, m, norm, eps, lora_down, lora_up);
  }
  return launch(x, weight, bias, norm, eps, std::nullopt);
}

at::Tensor sparse_linear_lora(const at::Tensor& x, const at::Tensor& weight_lora, const std::optional<at::Tensor>& bias,
                              int64_t n, int64_t m, bool norm, double eps, const at::Tensor& lora_down) {
  const int64_t K = x.size(-1), rank = lora_down.size(0);
  const bool fits = lora_down.dim() == 2 && lora_down.size(1) == K && rank % 8 == 0 &&
                    lora_down.scalar_type() == x.scalar_type() && lora_down.device() == x.device() &&
                    lora_down.is_contiguous() &&
                    weight_lora.dim() == 2 && weight_lora.size(1) == K + 2 * rank;
  if (!fits || !kernel_takes(x, weight_lora, bias, n, m, K)) {
    return call_python(g_fallback_lora, x, weight_lora, bias, n, m, norm, eps, lora_down);
  }
  return launch(x, weight_lora, bias, norm, eps, lora_down);
}

void init(uintptr_t sparsify, uintptr_t gemm, uintptr_t metadata_bytes, int64_t k_multiple, int64_t n_multiple,
          bool pdl, py::object plan_fn, py::object fallback_linear, py::object fallback_lora) {
  TORCH_CHECK(k_multiple > 0 && n_multiple > 0, "lynx: bad kernel multiples");
  g_sparsify = reinterpret_cast<SparsifyFn>(sparsify);
  g_gemm = reinterpret_cast<GemmFn>(gemm);
  g_metadata_bytes = reinterpret_cast<MetadataBytesFn>(metadata_bytes);
  g_k_multiple = k_multiple;
  g_n_multiple = n_multiple;
  g_pdl = pdl;
  // Leaked on purpose: the registered kernels may run until interpreter exit.
  g_plan_fn = new py::object(std::move(plan_fn));
  g_fallback_linear = new py::object(std::move(fallback_linear));
  g_fallback_lora = new py::object(std::move(fallback_lora));
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CUDA, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_lora", &sparse_linear_lora);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, "Hand the module the kernel entry points and multiples, the GEMM planner and the Python fallbacks.");
}
