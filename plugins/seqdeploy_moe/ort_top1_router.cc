// ONNX Runtime kernels of seqdeploy::Top1Router (see router.py for the op):
//   logits [B, T, E] fp32, attribute capacity_factor (float) -> expert [B, T] int64, gate [B, T] fp32
//   expert_t = the lowest e with logits_e = max (the argmax of the softmax, ties to the lowest
//   index), gate_t = p[expert_t] = 1 / sum_e exp(logits_e - max); with capacity_factor > 0,
//   cap = ceil(fp32(fp32(cf) * T) / E) in fp32, and the k-th token of a row routed to an expert
//   keeps its gate if k <= cap and gets 0 otherwise (its id stays the argmax).
// The router is fp32 in every graph (an fp32 island of the fp16 graphs): fp32 is its only dtype.
// CPU: a loop over rows and tokens. A row holding a NaN gets expert 0 and gate NaN, as the torch
// op's CPU form (its max is NaN, which no logit equals).
// CUDA: the plugin's fused Triton router (kernels.py, _top1_router_kernel) compiled ahead of time
// as "top1_router_fp32_e<BLOCK_E>_t<BLOCK_T>_<all|cap>" for BLOCK_E = 8, 32, 128
// (kernels.ORT_BLOCK_E, so E <= 128 here), each with BLOCK_T = 4096 / BLOCK_E as
// kernels.router_config tiles a long row (a shorter row masks the rest of its tile; BLOCK_T is
// in the name so that the grid below cannot disagree with the binary). Without capacity the grid is (B, T blocks); with
// it, one program per row walks its T blocks in order (the rank of a token depends on every
// earlier token of its row). On a NaN row the Triton kernel answers expert E - 1 (its clamp),
// as the torch op does on CUDA. The kernel needs no scratch, cluster or TMA: it compiles as is.
#include <algorithm>
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

constexpr int64_t kBlockE[] = {8, 32, 128};   // kernels.ORT_BLOCK_E
constexpr int64_t kTileLogits = 4096;          // BLOCK_T * BLOCK_E (kernels.router_config)

// Tokens each expert accepts per row, computed in fp32 as every form of the op does; T (no
// dropping) when capacity_factor <= 0, and never more than T.
int64_t Capacity(float capacity_factor, int64_t T, int64_t E) {
  if (!(capacity_factor > 0.0f)) return T;
  float quota = (capacity_factor * static_cast<float>(T)) / static_cast<float>(E);
  double cap = std::ceil(static_cast<double>(quota));
  return cap >= static_cast<double>(T) ? T : static_cast<int64_t>(cap);
}

void Top1RouterCpu(const float* logits, int64_t* expert, float* gate, int64_t B, int64_t T,
                   int64_t E, int64_t cap) {
  std::vector<int64_t> taken(E);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t t = 0; t < T; ++t) {
      const float* l = logits + (b * T + t) * E;
      float m = l[0];
      for (int64_t e = 1; e < E && !std::isnan(m); ++e)
        if (l[e] > m || std::isnan(l[e])) m = l[e];
      int64_t best = 0;
      for (int64_t e = 0; e < E; ++e)
        if (l[e] == m) {
          best = e;
          break;
        }
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) total += std::exp(l[e] - m);
      expert[b * T + t] = best;
      gate[b * T + t] = ++taken[best] <= cap ? 1.0f / total : 0.0f;
    }
  }
}

struct Top1RouterKernel : seqdeploy::Computes<Top1RouterKernel> {
  static constexpr const char* kName = "Top1Router";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    return {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    return {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  }

  // expert and gate are [B, T] of logits [B, T, E]
  static void InferOutputShapes(Ort::ShapeInferContext& ctx, ONNXTensorElementDataType) {
    const auto& logits = ctx.GetInputShape(0);
    if (logits.size() != 3) throw Error("logits must have rank 3");
    Ort::ShapeInferContext::Shape rows{logits[0], logits[1]};
    auto set = [&](size_t i, ONNXTensorElementDataType type) {
      Ort::Status status = ctx.SetOutputShape(i, rows, type);
      if (!status.IsOK()) throw Error(status.GetErrorMessage());
    };
    set(0, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
    set(1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }

  Top1RouterKernel(const Ort::ConstKernelInfo& info, bool cuda)
      : cuda_(cuda), capacity_factor_(info.GetAttribute<float>("capacity_factor")) {
    if (!std::isfinite(capacity_factor_)) throw Error("attribute capacity_factor must be finite");
  }

  void Compute(Ort::KernelContext& ctx) {
    auto logits = ctx.GetInput(0);
    auto shape = seqdeploy::ShapeOf(logits, 3, "logits");
    int64_t B = shape[0], T = shape[1], E = shape[2];
    if (E < 1) throw Error("logits must have E >= 1 experts");
    seqdeploy::RequireDtype(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {&logits},
                            "logits must be float32 (the router is fp32)");
    auto expert = ctx.GetOutput(0, {B, T}), gate = ctx.GetOutput(1, {B, T});
    if (B * T == 0) return;
    int64_t cap = Capacity(capacity_factor_, T, E);
    if (!cuda_) {
      Top1RouterCpu(logits.GetTensorData<float>(), expert.GetTensorMutableData<int64_t>(),
                    gate.GetTensorMutableData<float>(), B, T, E, cap);
      return;
    }
    int64_t block_e = seqdeploy::SmallestFit(kBlockE, E, "the CUDA kernel supports E");
    int64_t block_t = kTileLogits / block_e;
    bool dropping = cap < T;
    int64_t t_blocks = dropping ? 1 : seqdeploy::CeilDiv(T, block_t);
    if (T * E > 0x7fffffff || B > 0x7fffffff || t_blocks > 65535)
      throw Error("shape too large for the CUDA kernel's 32-bit sizes and grid");
    const auto& kernel = seqdeploy::FindTritonKernel(
        "top1_router_fp32_e" + std::to_string(block_e) + "_t" + std::to_string(block_t) +
        (dropping ? "_cap" : "_all"));
    if (kernel.n_args != 8) throw Error("top1_router kernel has an unexpected signature");
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    seqdeploy::CUdeviceptr ptrs[3] = {
        reinterpret_cast<seqdeploy::CUdeviceptr>(logits.GetTensorRawData()),
        reinterpret_cast<seqdeploy::CUdeviceptr>(expert.GetTensorMutableRawData()),
        reinterpret_cast<seqdeploy::CUdeviceptr>(gate.GetTensorMutableRawData())};
    int32_t ints[5] = {int32_t(T), int32_t(E), int32_t(cap), int32_t(T * E), int32_t(E)};  // T E cap s_b s_t
    void* args[8];
    for (int i = 0; i < 3; ++i) args[i] = &ptrs[i];
    for (int i = 0; i < 5; ++i) args[3 + i] = &ints[i];
    seqdeploy::LaunchTriton(kernel, stream, unsigned(B), unsigned(t_blocks), args);
  }

 private:
  bool cuda_;
  float capacity_factor_;
};

}  // namespace

SEQDEPLOY_ORT_OP(Top1RouterKernel)
