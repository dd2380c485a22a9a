// ONNX Runtime kernels of seqdeploy::EigenScan (see ops.py for the op):
//   x_re, x_im [B, T, K] (T), nu, theta [K] (fp32), h0_re, h0_im [B, K] (T)
//   -> y_re, y_im [B, T, K] (T);  h_t = lam h_{t-1} + x_t,  lam = exp(-exp(nu)) e^{i theta}
// State and arithmetic are fp32 whatever T is (fp32 or fp16).
// CPU: a step loop. CUDA: the plugin's Triton kernel (kernels.py, _eigen_scan_kernel) compiled
// ahead of time as "eigen_scan_<dtype>_t32k32": BLOCK_T = BLOCK_K = 32 for every shape (the
// kernel masks partial tiles), with its decoupled look-back's carry and zeroed flags in device
// scratch kept by the kernel instance.
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

constexpr int kBlockT = 32, kBlockK = 32;

template <typename T>
void EigenScanCpu(const T* xr, const T* xi, const float* nu, const float* th, const T* hr0,
                  const T* hi0, T* yr, T* yi, int64_t B, int64_t T_, int64_t K) {
  std::vector<float> lr(K), li(K);
  for (int64_t k = 0; k < K; ++k) {
    float mag = std::exp(-std::exp(nu[k]));
    lr[k] = mag * std::cos(th[k]);
    li[k] = mag * std::sin(th[k]);
  }
  std::vector<float> hr(K), hi(K);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      hr[k] = seqdeploy::ToFloat(hr0[b * K + k]);
      hi[k] = seqdeploy::ToFloat(hi0[b * K + k]);
    }
    for (int64_t t = 0; t < T_; ++t) {
      int64_t row = (b * T_ + t) * K;
      for (int64_t k = 0; k < K; ++k) {
        float r = lr[k] * hr[k] - li[k] * hi[k] + seqdeploy::ToFloat(xr[row + k]);
        float i = lr[k] * hi[k] + li[k] * hr[k] + seqdeploy::ToFloat(xi[row + k]);
        hr[k] = r;
        hi[k] = i;
        yr[row + k] = seqdeploy::FromFloat<T>(r);
        yi[row + k] = seqdeploy::FromFloat<T>(i);
      }
    }
  }
}

struct EigenScanKernel : seqdeploy::Computes<EigenScanKernel> {
  static constexpr const char* kName = "EigenScan";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, f = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {t, t, f, f, t, t};
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    return {t, t};
  }

  EigenScanKernel(const Ort::ConstKernelInfo&, bool cuda) : cuda_(cuda) {}

  void Compute(Ort::KernelContext& ctx) {
    auto x_re = ctx.GetInput(0), x_im = ctx.GetInput(1), nu = ctx.GetInput(2),
         theta = ctx.GetInput(3), h_re = ctx.GetInput(4), h_im = ctx.GetInput(5);
    auto shape = seqdeploy::ShapeOf(x_re, 3, "x_re");
    int64_t B = shape[0], T = shape[1], K = shape[2];
    if (seqdeploy::ShapeOf(x_im, 3, "x_im") != shape) throw Error("x_im must have x_re's shape");
    if (seqdeploy::ShapeOf(nu, 1, "nu")[0] != K || seqdeploy::ShapeOf(theta, 1, "theta")[0] != K)
      throw Error("nu and theta must be [K]");
    std::vector<int64_t> state{B, K};
    if (seqdeploy::ShapeOf(h_re, 2, "h0_re") != state || seqdeploy::ShapeOf(h_im, 2, "h0_im") != state)
      throw Error("h0_re and h0_im must be [B, K]");
    auto type = x_re.GetTensorTypeAndShapeInfo().GetElementType();
    const char* dtype = seqdeploy::DtypeName(type);
    if (!dtype) throw Error("x_re must be float32 or float16");
    seqdeploy::RequireDtype(type, {&x_im, &h_re, &h_im},
                            "x_im, h0_re and h0_im must have x_re's dtype");
    auto y_re = ctx.GetOutput(0, shape), y_im = ctx.GetOutput(1, shape);
    if (B * T * K == 0) return;
    if (!cuda_) {
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Cpu<float>(x_re, x_im, nu, theta, h_re, h_im, y_re, y_im, B, T, K);
      else
        Cpu<Ort::Float16_t>(x_re, x_im, nu, theta, h_re, h_im, y_re, y_im, B, T, K);
      return;
    }
    const auto& kernel = seqdeploy::FindTritonKernel(std::string("eigen_scan_") + dtype + "_t32k32");
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    int64_t n_chunks = seqdeploy::CeilDiv(T, kBlockT);
    int64_t n_slots = B * seqdeploy::CeilDiv(K, kBlockK);
    int64_t carry_words = std::max<int64_t>(n_chunks - 1, 1) * 4 * B * K;
    int64_t flag_words = std::max<int64_t>(n_chunks - 1, 1) * n_slots;
    int64_t grid = n_chunks * n_slots;
    if (grid > 0x7fffffff || B * T * K > 0x7fffffff)
      throw Error("shape too large for the CUDA kernel's 32-bit sizes");
    // flags first, then the carry planes (4-byte words both; flags need zeros every run)
    seqdeploy::CUdeviceptr scratch = scratch_.Get(stream, 4 * (flag_words + carry_words));
    seqdeploy::MemsetD32Async(scratch, 0, flag_words, stream);
    seqdeploy::CUdeviceptr flags = scratch, carry = scratch + 4 * flag_words;
    seqdeploy::CUdeviceptr ptrs[8] = {
        Ptr(x_re), Ptr(x_im), Ptr(nu), Ptr(theta), Ptr(h_re), Ptr(h_im),
        reinterpret_cast<seqdeploy::CUdeviceptr>(y_re.GetTensorMutableRawData()),
        reinterpret_cast<seqdeploy::CUdeviceptr>(y_im.GetTensorMutableRawData())};
    int32_t ints[8] = {int32_t(B), int32_t(T), int32_t(K), int32_t(T * K), int32_t(K),
                       int32_t(T * K), int32_t(K), int32_t(K)};  // B T K sx_b sx_t sy_b sy_t sh_b
    void* args[18];
    for (int i = 0; i < 8; ++i) args[i] = &ptrs[i];
    args[8] = &carry;
    args[9] = &flags;
    for (int i = 0; i < 8; ++i) args[10 + i] = &ints[i];
    if (kernel.n_args != 18) throw Error("eigen_scan kernel has an unexpected signature");
    seqdeploy::LaunchTriton(kernel, stream, unsigned(grid), args);
  }

 private:
  static seqdeploy::CUdeviceptr Ptr(const Ort::ConstValue& v) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(v.GetTensorRawData());
  }

  template <typename T>
  static void Cpu(const Ort::ConstValue& xr, const Ort::ConstValue& xi, const Ort::ConstValue& nu,
                  const Ort::ConstValue& th, const Ort::ConstValue& hr, const Ort::ConstValue& hi,
                  Ort::UnownedValue& yr, Ort::UnownedValue& yi, int64_t B, int64_t T_, int64_t K) {
    EigenScanCpu<T>(xr.GetTensorData<T>(), xi.GetTensorData<T>(), nu.GetTensorData<float>(),
                    th.GetTensorData<float>(), hr.GetTensorData<T>(), hi.GetTensorData<T>(),
                    yr.GetTensorMutableData<T>(), yi.GetTensorMutableData<T>(), B, T_, K);
  }

  bool cuda_;
  seqdeploy::DeviceScratch scratch_;
};

}  // namespace

SEQDEPLOY_ORT_OP(EigenScanKernel)
