// ONNX Runtime kernels of seqdeploy::CfCScan (see ops.py for the op):
//   xw [B, T, H] (T), h0 [B, H] (T), w_rec [H, H] (T), tau [H] (fp32), attribute dt (float)
//   -> y [B, T, H] (T);  h_t = a h_{t-1} + (1 - a) tanh(xw_t + h_{t-1} w_rec),  a = exp(-dt/tau)
// State and arithmetic are fp32 whatever T is (fp32 or fp16).
// CPU: a step loop. CUDA: the plugin's Triton kernels compiled ahead of time (ops.py), chosen
// as kernels.choose chooses on a GPU without the wgmma design:
// - on compute capability 9.0, for T > 1 in fp16 at H of 129 to 256, the cluster "split"
//   kernel (split.py), "cfc_split_fp16_h256_n32": the columns of h over a thread-block cluster
//   of cdiv(H, 32) programs per 16 batch rows, launched as clusters (the only tiling compiled:
//   ops.py says why);
// - otherwise the "rows" kernel (rows.py), "cfc_scan_<dtype>_h<BLOCK_H>" for BLOCK_H = 16 ...
//   512 (fp32: 256): one plain grid launch, one program per 16 batch rows, sm_80 on.
// (The torch engine's wgmma form, faster still on Hopper, is Gluon and not compiled here.)
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

constexpr int64_t kBlockB = 16, kMaxH = 512, kMaxHFp32 = 256;  // compiled tiles (ops.py)

template <typename T>
void CfcScanCpu(const T* xw, const T* h0, const T* w_rec, const float* tau, float dt, T* y,
                int64_t B, int64_t T_, int64_t H) {
  std::vector<float> alpha(H), gain(H), w(H * H), h(H), z(H);
  for (int64_t j = 0; j < H; ++j) {
    float r = -dt / tau[j];
    alpha[j] = std::exp(r);
    gain[j] = -std::expm1(r);   // 1 - alpha without cancellation for tau >> dt
  }
  for (int64_t i = 0; i < H * H; ++i) w[i] = seqdeploy::ToFloat(w_rec[i]);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H; ++j) h[j] = seqdeploy::ToFloat(h0[b * H + j]);
    for (int64_t t = 0; t < T_; ++t) {
      int64_t row = (b * T_ + t) * H;
      for (int64_t j = 0; j < H; ++j) z[j] = seqdeploy::ToFloat(xw[row + j]);
      for (int64_t k = 0; k < H; ++k) {   // z += h w_rec, row by row (contiguous in w)
        float hk = h[k];
        const float* wk = &w[k * H];
        for (int64_t j = 0; j < H; ++j) z[j] += hk * wk[j];
      }
      for (int64_t j = 0; j < H; ++j) {
        h[j] = alpha[j] * h[j] + gain[j] * std::tanh(z[j]);
        y[row + j] = seqdeploy::FromFloat<T>(h[j]);
      }
    }
  }
}

struct CfcScanKernel : seqdeploy::Computes<CfcScanKernel> {
  static constexpr const char* kName = "CfCScan";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, f = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {t, t, t, f};
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    return {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
  }

  CfcScanKernel(const Ort::ConstKernelInfo& info, bool cuda)
      : cuda_(cuda), dt_(info.GetAttribute<float>("dt")) {
    if (!(dt_ > 0.0f) || !std::isfinite(dt_)) throw Error("attribute dt must be finite and > 0");
  }

  void Compute(Ort::KernelContext& ctx) {
    auto xw = ctx.GetInput(0), h0 = ctx.GetInput(1), w_rec = ctx.GetInput(2), tau = ctx.GetInput(3);
    auto shape = seqdeploy::ShapeOf(xw, 3, "xw");
    int64_t B = shape[0], T = shape[1], H = shape[2];
    if (seqdeploy::ShapeOf(h0, 2, "h0") != std::vector<int64_t>{B, H}) throw Error("h0 must be [B, H]");
    if (seqdeploy::ShapeOf(w_rec, 2, "w_rec") != std::vector<int64_t>{H, H})
      throw Error("w_rec must be [H, H]");
    if (seqdeploy::ShapeOf(tau, 1, "tau")[0] != H) throw Error("tau must be [H]");
    auto type = xw.GetTensorTypeAndShapeInfo().GetElementType();
    const char* dtype = seqdeploy::DtypeName(type);
    if (!dtype) throw Error("xw must be float32 or float16");
    seqdeploy::RequireDtype(type, {&h0, &w_rec}, "h0 and w_rec must have xw's dtype");
    auto y = ctx.GetOutput(0, shape);
    if (B * T * H == 0) return;
    if (!cuda_) {
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        CfcScanCpu<float>(xw.GetTensorData<float>(), h0.GetTensorData<float>(),
                          w_rec.GetTensorData<float>(), tau.GetTensorData<float>(), dt_,
                          y.GetTensorMutableData<float>(), B, T, H);
      else
        CfcScanCpu<Ort::Float16_t>(xw.GetTensorData<Ort::Float16_t>(), h0.GetTensorData<Ort::Float16_t>(),
                                   w_rec.GetTensorData<Ort::Float16_t>(), tau.GetTensorData<float>(),
                                   dt_, y.GetTensorMutableData<Ort::Float16_t>(), B, T, H);
      return;
    }
    int64_t max_h = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? kMaxHFp32 : kMaxH;
    if (H > max_h)
      throw Error(std::string("the CUDA kernel supports H <= ") + std::to_string(max_h) + " in " +
                  dtype + ", got " + std::to_string(H));
    if (B * T * H > 0x7fffffff) throw Error("shape too large for the CUDA kernel's 32-bit sizes");
    int64_t block_h = std::max<int64_t>(16, seqdeploy::NextPow2(H));
    // the split kernel's columns per program: BLOCK_H / 8 (kernels.choose, ops.py)
    int64_t block_n = block_h / 8;
    const seqdeploy::TritonKernel* split = nullptr;   // absent from a library built before it
    if (T > 1 && block_h == 256 && type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
        seqdeploy::ComputeCapability() == 90)
      split = seqdeploy::FindTritonKernelOrNull(std::string("cfc_split_") + dtype + "_h" +
                                                std::to_string(block_h) + "_n" +
                                                std::to_string(block_n));
    bool cluster = split != nullptr;
    const auto& kernel = cluster ? *split
                                 : seqdeploy::FindTritonKernel(std::string("cfc_scan_") + dtype +
                                                               "_h" + std::to_string(block_h));
    if (kernel.n_args != 15) throw Error("cfc_scan kernel has an unexpected signature");
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    seqdeploy::CUdeviceptr ptrs[5] = {
        Ptr(xw), Ptr(h0), Ptr(w_rec), Ptr(tau),
        reinterpret_cast<seqdeploy::CUdeviceptr>(y.GetTensorMutableRawData())};
    float dt = dt_;
    // B T H sx_b sx_t sh_b sw_k sy_b sy_t
    int32_t ints[9] = {int32_t(B), int32_t(T), int32_t(H), int32_t(T * H), int32_t(H),
                       int32_t(H), int32_t(H), int32_t(T * H), int32_t(H)};
    void* args[15];
    for (int i = 0; i < 5; ++i) args[i] = &ptrs[i];
    args[5] = &dt;
    for (int i = 0; i < 9; ++i) args[6 + i] = &ints[i];
    auto batch_blocks = unsigned(seqdeploy::CeilDiv(B, kBlockB));
    if (cluster) {
      auto column_blocks = unsigned(seqdeploy::CeilDiv(H, block_n));
      seqdeploy::LaunchTritonClusters(kernel, stream, batch_blocks * column_blocks, column_blocks,
                                      args);
    } else {
      seqdeploy::LaunchTriton(kernel, stream, batch_blocks, args);
    }
  }

 private:
  static seqdeploy::CUdeviceptr Ptr(const Ort::ConstValue& v) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(v.GetTensorRawData());
  }

  bool cuda_;
  float dt_;
};

}  // namespace

SEQDEPLOY_ORT_OP(CfcScanKernel)
