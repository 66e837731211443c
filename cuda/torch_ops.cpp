// lynx: the CUDA kernels of lynx::sparse_linear, lynx::sparse_linear_lora, lynx::producer_sparse_linear (16-bit or
// e4m3 GEMM) and lynx::sparse_linear_e4m3, in C++.
//
// A DiT forward calls these ops once per sparse layer, and without CUDA graphs its speed is set by host
// time: the same work in Python (allocations, ctypes marshalling, stream lookups) costs about three times
// a cuBLAS F.linear call. This file does the supported case in C++, GEMM plan included, and hands every other
// case (another pattern, dtype or device, a shape the kernels can't take, LoRA factors not yet packed) to the
// Python kernels in lynx_compile.kernels, which fall back to the reference op with a warning.
//
// Built by lynx_compile.kernels with torch.utils.cpp_extension against the running torch. The CUTLASS kernels
// live in the torch-independent liblynx_kernels.so, whose entry points init() resolves by name, typed by
// lynx_api.h. Loading the module registers the two CUDA kernels with the dispatcher; init() hands them the Python
// kernels first, which take every call until the entry points are resolved.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <array>
#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

#include "lynx_api.h"

namespace {

constexpr int kMaxDevices = 64;

// The library's entry points this file calls, named and typed as in lynx_api.h.
struct Library {
  decltype(&::lynx_abi_version) lynx_abi_version = nullptr;
  decltype(&::lynx_status_string) lynx_status_string = nullptr;
  decltype(&::lynx_metadata_bytes) lynx_metadata_bytes = nullptr;
  decltype(&::lynx_sparsify_2to4) lynx_sparsify_2to4 = nullptr;
  decltype(&::lynx_sparsify_2to4_e4m3) lynx_sparsify_2to4_e4m3 = nullptr;
  decltype(&::lynx_gemm_plan) lynx_gemm_plan = nullptr;
  decltype(&::lynx_sparse_gemm) lynx_sparse_gemm = nullptr;
};
Library g_lib;
std::atomic<bool> g_ready{false};  // every entry point resolved
bool g_pdl = true;
// The Python kernels of the four ops.
py::object* g_fallback_linear = nullptr;
py::object* g_fallback_lora = nullptr;
py::object* g_fallback_producer = nullptr;
py::object* g_fallback_e4m3 = nullptr;

using PlanKey = std::array<int64_t, 6>;
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 0;
    for (int64_t v : k) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
std::mutex g_plan_mutex;
std::unordered_map<PlanKey, LynxGemmPlan, PlanKeyHash> g_plans;

// Per device: -1 unknown, 0 not a GPU the kernels are compiled for, else the SM count.
std::array<int, kMaxDevices> g_sm_count = [] {
  std::array<int, kMaxDevices> a{};
  a.fill(-1);
  return a;
}();

int kernel_sm_count(int device) {
  if (device < 0 || device >= kMaxDevices) return 0;
  int& cached = g_sm_count[device];
  if (cached < 0) {
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cached = major * 10 + minor == LYNX_COMPUTE_CAPABILITY ? sms : 0;
  }
  return cached;
}

void check(int status, const char* what) {
  TORCH_CHECK(status == LYNX_OK, "lynx ", what, " failed with code ", status, ": ", g_lib.lynx_status_string(status));
}

LynxGemmPlan plan_for(int gemm_type, int64_t M, int64_t N, int64_t K, int64_t layer_k, int device) {
  const PlanKey key{gemm_type, M, N, K, layer_k, device};
  {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) return it->second;
  }
  LynxGemmPlan plan{};
  check(g_lib.lynx_gemm_plan(gemm_type, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                             static_cast<int>(layer_k), kernel_sm_count(device), &plan),
        "GEMM plan");
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  g_plans.emplace(key, plan);
  return plan;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// The kernels take the call: 2:4, bf16/fp16 input, a weight of its dtype (or e4m3 for the e4m3 GEMM), one device they
// are compiled for, K and N multiples of what the tiles need.
bool kernel_takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t n,
                  int64_t m, int64_t in_features, bool e4m3 = false) {
  if (n != 2 || m != 4 || !g_ready.load(std::memory_order_acquire)) return false;
  const auto dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const auto weight_dtype = e4m3 ? at::kFloat8_e4m3fn : dtype;
  if (weight.scalar_type() != weight_dtype || weight.device() != x.device() || weight.dim() != 2) return false;
  if (bias && (bias->device() != x.device() || bias->dim() != 1 || bias->size(0) != weight.size(0))) return false;
  if (in_features % LYNX_K_MULTIPLE != 0 || weight.size(0) % LYNX_N_MULTIPLE != 0) return false;
  return kernel_sm_count(x.device().index()) > 0;
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

// Sparsify x (appending x . lora_down^T when given, running producer on it first when given) and run the one sparse
// GEMM against weight (N x (K + 2r)): e4m3 when weight_scale (the e4m3 weight's per-column scale) is given.
at::Tensor launch(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool norm,
                  double eps, const std::optional<at::Tensor>& lora_down, const LynxProducer* producer = nullptr,
                  const at::Tensor* weight_scale = nullptr) {
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
  const bool e4m3 = weight_scale != nullptr;
  const int gemm_type = e4m3 ? (is_bf16 ? LYNX_GEMM_E4M3_BF16 : LYNX_GEMM_E4M3_FP16)
                             : (is_bf16 ? LYNX_GEMM_BF16 : LYNX_GEMM_FP16);

  at::Tensor tail;
  if (rank) tail = down_project(x2, *lora_down);
  const int64_t k_total = K + 2 * rank;
  const int64_t meta_bytes = g_lib.lynx_metadata_bytes(static_cast<int>(M), static_cast<int>(k_total));
  const auto values_dtype = e4m3 ? at::kFloat8_e4m3fn : x.scalar_type();
  at::Tensor values = at::empty({M, K / 2 + rank}, x.options().dtype(values_dtype));
  at::Tensor meta = at::empty({meta_bytes}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  const auto sparsify = e4m3 ? g_lib.lynx_sparsify_2to4_e4m3 : g_lib.lynx_sparsify_2to4;
  check(sparsify(is_bf16, x2.data_ptr(), K, static_cast<int>(M), static_cast<int>(K), values.data_ptr(),
                 meta.data_ptr(), scale.data_ptr<float>(), norm, static_cast<float>(eps),
                 rank ? tail.data_ptr() : nullptr, static_cast<int>(rank), producer, stream),
        "sparsify");

  const at::Tensor w = aligned_contiguous(weight);
  at::Tensor b;
  if (bias) b = aligned_contiguous(bias->scalar_type() == x.scalar_type() ? *bias : bias->to(x.scalar_type()));
  at::Tensor col_scale;
  if (e4m3) col_scale = aligned_contiguous(*weight_scale);
  const LynxGemmPlan plan = plan_for(gemm_type, M, N, k_total, K, device);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) workspace = at::empty({plan.workspace_bytes}, x.options().dtype(at::kByte));
  check(g_lib.lynx_sparse_gemm(plan.config, values.data_ptr(), meta.data_ptr(), w.data_ptr(), scale.data_ptr<float>(),
                               e4m3 ? col_scale.data_ptr<float>() : nullptr, b.defined() ? b.data_ptr() : nullptr,
                               out.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(k_total),
                               plan.swizzle, plan.raster, device,
                               kernel_sm_count(device), g_pdl, workspace.defined() ? workspace.data_ptr() : nullptr,
                               static_cast<size_t>(plan.workspace_bytes), stream),
        "sparse GEMM");
  return out.view(out_shape);
}

// Every case the kernels don't take goes to the Python kernels (which raise on bad arguments, or warn once and
// run the reference op).
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

int producer_kind(c10::string_view name) {
  if (name == "layer_norm") return LYNX_PRODUCER_LAYER_NORM;
  if (name == "gelu") return LYNX_PRODUCER_GELU;
  if (name == "gelu_tanh") return LYNX_PRODUCER_GELU_TANH;
  if (name == "silu") return LYNX_PRODUCER_SILU;
  return -1;
}

// The producer's fp32 (samples x K) rows fit the kernel: contiguous on x's device, one sample count, which splits
// the tokens. Sets samples (1 without rows).
bool producer_rows_fit(const at::Tensor& x, const std::optional<at::Tensor>& mul, const std::optional<at::Tensor>& add,
                       int64_t& samples) {
  samples = 0;
  for (const auto* rows : {&mul, &add}) {
    if (!*rows) continue;
    const at::Tensor& t = **rows;
    if (t.scalar_type() != at::kFloat || t.dim() != 2 || t.size(1) != x.size(-1) || !t.is_contiguous() ||
        t.device() != x.device() || (samples && t.size(0) != samples) || t.size(0) < 1) {
      return false;
    }
    samples = t.size(0);
  }
  if (!samples) samples = 1;
  return (x.numel() / x.size(-1)) % samples == 0;
}

// The e4m3 sparsify pass holds whole rows (LoRA columns included) and writes 16-byte aligned rows; the GEMM takes a
// float32 scale per output channel.
bool e4m3_fits(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale, int64_t rank) {
  const int64_t K = x.size(-1);
  return (K + 2 * rank + 127) / 128 * 128 <= LYNX_WHOLE_ROW_MAX_K && rank % 16 == 0 && (K / 2 + rank) % 16 == 0 &&
         weight_scale.scalar_type() == at::kFloat && weight_scale.dim() == 1 &&
         weight_scale.size(0) == weight.size(0) && weight_scale.device() == x.device();
}

at::Tensor producer_sparse_linear(const at::Tensor& x, c10::string_view producer, const std::optional<at::Tensor>& mul,
                                  const std::optional<at::Tensor>& add, double producer_eps, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t n, int64_t m, bool norm, double eps,
                                  const std::optional<at::Tensor>& weight_scale) {
  const int kind = producer_kind(producer);
  int64_t samples = 1;
  const bool layer_norm = kind == LYNX_PRODUCER_LAYER_NORM;
  const bool e4m3 = weight_scale.has_value();
  const bool fits = kind > 0 && x.size(-1) > 0 && weight.dim() == 2 && weight.size(1) == x.size(-1) &&
                    (layer_norm ? x.size(-1) <= LYNX_WHOLE_ROW_MAX_K : !mul && !add) &&
                    producer_rows_fit(x, mul, add, samples) && (!e4m3 || e4m3_fits(x, weight, *weight_scale, 0));
  if (!fits || !kernel_takes(x, weight, bias, n, m, x.size(-1), e4m3)) {
    return call_python(g_fallback_producer, x, std::string(producer), mul, add, producer_eps, weight, bias, n, m, norm,
                       eps, weight_scale);
  }
  const LynxProducer fused{kind, mul ? mul->const_data_ptr<float>() : nullptr,
                           add ? add->const_data_ptr<float>() : nullptr, static_cast<int>(samples),
                           static_cast<float>(producer_eps)};
  return launch(x, weight, bias, norm, eps, std::nullopt, &fused, e4m3 ? &*weight_scale : nullptr);
}

at::Tensor sparse_linear_e4m3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                              const std::optional<at::Tensor>& bias, int64_t n, int64_t m, bool norm, double eps,
                              const std::optional<at::Tensor>& lora_down) {
  const int64_t K = x.size(-1), rank = lora_down ? lora_down->size(0) : 0;
  const bool lora_fits = !lora_down || (lora_down->dim() == 2 && lora_down->size(1) == K &&
                                        lora_down->scalar_type() == x.scalar_type() &&
                                        lora_down->device() == x.device() && lora_down->is_contiguous());
  const bool fits = lora_fits && weight.dim() == 2 && weight.size(1) == K + 2 * rank &&
                    e4m3_fits(x, weight, weight_scale, rank);
  if (!fits || !kernel_takes(x, weight, bias, n, m, K, /*e4m3=*/true)) {
    return call_python(g_fallback_e4m3, x, weight, weight_scale, bias, n, m, norm, eps, lora_down);
  }
  return launch(x, weight, bias, norm, eps, lora_down, nullptr, &weight_scale);
}

template <class Fn>
void resolve(void* handle, const char* name, Fn& entry) {
  entry = reinterpret_cast<Fn>(dlsym(handle, name));
  TORCH_CHECK(entry != nullptr, "lynx: ", name, " missing from the kernel library");
}

void init(const std::string& library_path, bool pdl, py::object fallback_linear, py::object fallback_lora,
          py::object fallback_producer, py::object fallback_e4m3) {
  // Leaked on purpose: the registered kernels may run until interpreter exit.
  g_fallback_linear = new py::object(std::move(fallback_linear));
  g_fallback_lora = new py::object(std::move(fallback_lora));
  g_fallback_producer = new py::object(std::move(fallback_producer));
  g_fallback_e4m3 = new py::object(std::move(fallback_e4m3));
  g_pdl = pdl;
  // Already loaded by ctypes: this only takes another reference to it, which is never dropped.
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "lynx: cannot open ", library_path, ": ", dlerror());
  Library lib;
#define LYNX_RESOLVE(NAME) resolve(handle, #NAME, lib.NAME)
  LYNX_RESOLVE(lynx_abi_version);
  LYNX_RESOLVE(lynx_status_string);
  LYNX_RESOLVE(lynx_metadata_bytes);
  LYNX_RESOLVE(lynx_sparsify_2to4);
  LYNX_RESOLVE(lynx_sparsify_2to4_e4m3);
  LYNX_RESOLVE(lynx_gemm_plan);
  LYNX_RESOLVE(lynx_sparse_gemm);
#undef LYNX_RESOLVE
  TORCH_CHECK(lib.lynx_abi_version() == LYNX_ABI_VERSION, "lynx: kernel library ABI ", lib.lynx_abi_version(),
              ", this module's ", LYNX_ABI_VERSION);
  g_lib = lib;
  g_ready.store(true, std::memory_order_release);
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CUDA, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_lora", &sparse_linear_lora);
  m.impl("producer_sparse_linear", &producer_sparse_linear);
  m.impl("sparse_linear_e4m3", &sparse_linear_e4m3);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, "Resolve the kernel library's entry points; take the PDL setting and the Python kernels.");
}
