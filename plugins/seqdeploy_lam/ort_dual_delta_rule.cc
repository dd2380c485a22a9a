// ONNX Runtime kernels of seqdeploy::DualDeltaRule (see ops.py for the op):
//   q, k [B, T, n, d] (T), v [B, T, n, dv] (T), beta [B, T, n] (T), g_fast, g_slow [B, T, n]
//   (fp32), mix [B, T, n] (T), state0 [B, n, 2, d, dv] (fp32)
//   -> o [B, T, n, dv] (T), stateT [B, n, 2, d, dv] (fp32)
// per memory s (0 fast, 1 slow), a = exp(g^s_t):
//   S_t = a S_{t-1} + beta_t k_t (v_t - a S_{t-1}^T k_t)^T,  o_t = mix_t S^0_t^T q_t + (1 - mix_t) S^1_t^T q_t
// T is fp32 or fp16 (the fp32 and fp16 graphs); the log-decays and the state cross the graph in
// fp32 in both (fp32 islands). Inside both kernels the state, the decays and every sum are fp32.
//
// CPU: a per-token loop over both memories, one task per (batch row, head) on ORT's intra-op
// threads, the state kept in stateT.
// CUDA: the plugin's Triton kernels (kernels.py) compiled ahead of time, dispatched as the torch
// op dispatches them (kernels.triton_dual_delta_rule):
//   - T <= 16 (kernels.RECURRENT_MAX_T): "dual_delta_rule_recurrent_<dtype>_d64", one launch
//     (grid: batch*head, value block);
//   - longer: the chunked WY/UT path (chunk 64), "dual_delta_rule_wy_<dtype>_d64" (grid: chunk,
//     batch*head) writing W, U and the cumulative log-decays to device scratch kept by the kernel
//     instance, then "dual_delta_rule_chunk_<dtype>_d64" (grid: batch*head, value block) reading
//     them on the same stream. Neither needs Triton scratch, TMA or clusters (aot.py checks).
// Head tiles (ops.ORT_HEAD_TILES): H = 64 only, BLOCK_D = BLOCK_DV = 64 and BLOCK_V = 32, the
// constexprs kernels.launch_config picks for d = dv = 64 (the base preset); smaller or unequal
// heads (tiny's 32) run masked in it, larger ones are refused in one line. The fp32 chunk kernel
// at H = 64 needs 188 KiB of shared memory (Triton's metadata): it loads on sm_90 (227 KiB), not
// on sm_80 (163 KiB), where fp32 calls with T > 16 fail in one line, as the torch op's launch
// of the same kernel would at d = 64.
#include <algorithm>
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

constexpr int64_t kRecurrentMaxT = 16;   // kernels.RECURRENT_MAX_T
constexpr int64_t kChunk = 64;           // kernels.BT
constexpr int64_t kBlockV = 32;          // kernels.launch_config's BV for dv >= 32
constexpr int64_t kHead = 64;            // the compiled head tile (ops.ORT_HEAD_TILES)
constexpr int64_t kInt32Max = 0x7fffffff;

struct CpuArgs {
  const void *q, *k, *v, *beta, *mix;
  const float *g_fast, *g_slow, *state0;
  void* o;
  float* stateT;
  int64_t T, n, d, dv;
};

// One (batch row, head): both memories through every token, fp32.
template <typename T>
void DualDeltaRuleCpu(const CpuArgs& a, int64_t bh) {
  const T *q = static_cast<const T*>(a.q), *k = static_cast<const T*>(a.k),
          *v = static_cast<const T*>(a.v), *beta = static_cast<const T*>(a.beta),
          *mix = static_cast<const T*>(a.mix);
  T* o = static_cast<T*>(a.o);
  const int64_t n = a.n, d = a.d, dv = a.dv, plane = d * dv;
  const int64_t b = bh / n, h = bh % n;
  float* S = a.stateT + bh * 2 * plane;   // [2, d, dv]: the state lives in the output
  const float* S0 = a.state0 + bh * 2 * plane;
  if (S != S0) std::copy(S0, S0 + 2 * plane, S);
  std::vector<float> qt(d), kt(d), vt(dv), pred(dv), u(dv), out(dv);
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t row = (b * a.T + t) * n + h;   // index into [B, T, n]
    for (int64_t i = 0; i < d; ++i) {
      qt[i] = seqdeploy::ToFloat(q[row * d + i]);
      kt[i] = seqdeploy::ToFloat(k[row * d + i]);
    }
    for (int64_t e = 0; e < dv; ++e) vt[e] = seqdeploy::ToFloat(v[row * dv + e]);
    const float bt = seqdeploy::ToFloat(beta[row]), mt = seqdeploy::ToFloat(mix[row]);
    std::fill(out.begin(), out.end(), 0.0f);
    for (int s = 0; s < 2; ++s) {
      float* M = S + s * plane;
      const float decay = std::exp((s == 0 ? a.g_fast : a.g_slow)[row]);
      const float weight = s == 0 ? mt : 1.0f - mt;
      // the prediction (a S)^T k, then the correction u = beta (v - prediction)
      std::fill(pred.begin(), pred.end(), 0.0f);
      for (int64_t i = 0; i < d; ++i) {
        const float ki = kt[i];
        const float* Mi = M + i * dv;
        for (int64_t e = 0; e < dv; ++e) pred[e] += Mi[e] * ki;
      }
      for (int64_t e = 0; e < dv; ++e) u[e] = bt * (vt[e] - decay * pred[e]);
      // S <- a S + k u^T, read by the weighted query in the same pass
      for (int64_t i = 0; i < d; ++i) {
        const float ki = kt[i], qi = weight * qt[i];
        float* Mi = M + i * dv;
        for (int64_t e = 0; e < dv; ++e) {
          const float x = decay * Mi[e] + ki * u[e];
          Mi[e] = x;
          out[e] += qi * x;
        }
      }
    }
    for (int64_t e = 0; e < dv; ++e) o[row * dv + e] = seqdeploy::FromFloat<T>(out[e]);
  }
}

template <typename T>
void CpuTask(void* args, size_t bh) {
  DualDeltaRuleCpu<T>(*static_cast<const CpuArgs*>(args), static_cast<int64_t>(bh));
}

struct DualDeltaRuleKernel : seqdeploy::Computes<DualDeltaRuleKernel> {
  static constexpr const char* kName = "DualDeltaRule";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, f = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {t, t, t, t, f, f, t, f};   // q k v beta g_fast g_slow mix state0
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    return {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  }
  // o: [B, T, n] of q, dv of v, q's dtype; stateT: state0's shape, fp32
  // o [B, T, n, dv] has q's dtype; stateT is shaped like state0 [B, n, 2, d, dv] and fp32
  static void InferOutputShapes(Ort::ShapeInferContext& ctx, ONNXTensorElementDataType type) {
    const auto &q = ctx.GetInputShape(0), &v = ctx.GetInputShape(2), &state0 = ctx.GetInputShape(7);
    if (q.size() != 4 || v.size() != 4 || state0.size() != 5)
      throw Error("q and v must have rank 4 and state0 rank 5");
    Ort::ThrowOnError(ctx.SetOutputShape(0, {q[0], q[1], q[2], v[3]}, type));
    Ort::ThrowOnError(ctx.SetOutputShape(1, state0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  }

  DualDeltaRuleKernel(const Ort::ConstKernelInfo&, bool cuda) : cuda_(cuda) {}

  void Compute(Ort::KernelContext& ctx) {
    auto q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2), beta = ctx.GetInput(3),
         g_fast = ctx.GetInput(4), g_slow = ctx.GetInput(5), mix = ctx.GetInput(6),
         state0 = ctx.GetInput(7);
    auto qs = seqdeploy::ShapeOf(q, 4, "q");
    const int64_t B = qs[0], T = qs[1], n = qs[2], d = qs[3];
    if (seqdeploy::ShapeOf(k, 4, "k") != qs) throw Error("k must have q's shape [B, T, n, d]");
    auto vs = seqdeploy::ShapeOf(v, 4, "v");
    const int64_t dv = vs[3];
    if (vs[0] != B || vs[1] != T || vs[2] != n) throw Error("v must be [B, T, n, dv] with q's B, T, n");
    const std::vector<int64_t> scalars{B, T, n};
    const char* names[] = {"beta", "g_fast", "g_slow", "mix"};
    int i = 0;
    for (auto* x : {&beta, &g_fast, &g_slow, &mix})
      if (seqdeploy::ShapeOf(*x, 3, names[i++]) != scalars)
        throw Error("beta, g_fast, g_slow and mix must be [B, T, n]");
    const std::vector<int64_t> state_shape{B, n, 2, d, dv};
    if (seqdeploy::ShapeOf(state0, 5, "state0") != state_shape)
      throw Error("state0 must be [B, n, 2, d, dv]");
    auto type = q.GetTensorTypeAndShapeInfo().GetElementType();
    const char* dtype = seqdeploy::DtypeName(type);
    if (!dtype) throw Error("q must be float32 or float16");
    seqdeploy::RequireDtype(type, {&k, &v, &beta, &mix}, "k, v, beta and mix must have q's dtype");
    seqdeploy::RequireDtype(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {&g_fast, &g_slow, &state0},
                            "g_fast, g_slow and state0 must be float32");
    auto o = ctx.GetOutput(0, {B, T, n, dv});
    auto stateT = ctx.GetOutput(1, state_shape);
    if (B * n * dv == 0) return;   // no element of o or stateT to write
    if (!cuda_) {
      CpuArgs args{q.GetTensorRawData(), k.GetTensorRawData(), v.GetTensorRawData(),
                   beta.GetTensorRawData(), mix.GetTensorRawData(), g_fast.GetTensorData<float>(),
                   g_slow.GetTensorData<float>(), state0.GetTensorData<float>(),
                   o.GetTensorMutableRawData(), stateT.GetTensorMutableData<float>(), T, n, d, dv};
      auto task = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? &CpuTask<float>
                                                               : &CpuTask<Ort::Float16_t>;
      ctx.ParallelFor(task, static_cast<size_t>(B * n), 0, &args);
      return;
    }
    Cuda(ctx, q, k, v, beta, g_fast, g_slow, mix, state0, o, stateT, type, dtype, B, T, n, d, dv);
  }

 private:
  static seqdeploy::CUdeviceptr Ptr(const Ort::ConstValue& x) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(x.GetTensorRawData());
  }
  static seqdeploy::CUdeviceptr Ptr(Ort::UnownedValue& x) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(x.GetTensorMutableRawData());
  }
  static const seqdeploy::TritonKernel& Find(const char* which, const char* dtype, int n_args) {
    const auto& kernel = seqdeploy::FindTritonKernel(std::string("dual_delta_rule_") + which +
                                                     "_" + dtype + "_d" + std::to_string(kHead));
    if (kernel.n_args != n_args)
      throw Error(std::string("dual_delta_rule_") + which + " kernel has an unexpected signature");
    return kernel;
  }

  void Cuda(Ort::KernelContext& ctx, const Ort::ConstValue& q, const Ort::ConstValue& k,
            const Ort::ConstValue& v, const Ort::ConstValue& beta, const Ort::ConstValue& g_fast,
            const Ort::ConstValue& g_slow, const Ort::ConstValue& mix,
            const Ort::ConstValue& state0, Ort::UnownedValue& o, Ort::UnownedValue& stateT,
            ONNXTensorElementDataType type, const char* dtype, int64_t B, int64_t T, int64_t n,
            int64_t d, int64_t dv) {
    if (std::max(d, dv) > kHead)
      throw Error("the CUDA kernel supports head sizes d, dv <= " + std::to_string(kHead) +
                  ", got d = " + std::to_string(d) + ", dv = " + std::to_string(dv));
    const int64_t n_chunks = seqdeploy::CeilDiv(T, kChunk), Tp = n_chunks * kChunk;
    // the kernels take sizes and strides as int32 (offsets are formed in int64)
    if (T * n * std::max(d, dv) > kInt32Max || Tp > kInt32Max || B * n > kInt32Max)
      throw Error("shape too large for the CUDA kernels' 32-bit sizes");
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    const unsigned heads = unsigned(B * n), value_blocks = unsigned(seqdeploy::CeilDiv(dv, kBlockV));
    int32_t Ti = int32_t(T), ni = int32_t(n), di = int32_t(d), dvi = int32_t(dv), Tpi = int32_t(Tp);
    // strides (batch, time, head) of the contiguous [B, T, n, d] and [B, T, n, dv] tensors
    int32_t sd[3] = {int32_t(T * n * d), int32_t(n * d), int32_t(d)};
    int32_t sv[3] = {int32_t(T * n * dv), int32_t(n * dv), int32_t(dv)};
    seqdeploy::CUdeviceptr pq = Ptr(q), pk = Ptr(k), pv = Ptr(v), pbeta = Ptr(beta),
                           pgf = Ptr(g_fast), pgs = Ptr(g_slow), pmix = Ptr(mix),
                           ps0 = Ptr(state0), po = Ptr(o), psT = Ptr(stateT);
    if (T <= kRecurrentMaxT) {
      const auto& kernel = Find("recurrent", dtype, 26);
      void* args[26] = {&pq, &pk, &pv, &pbeta, &pgf, &pgs, &pmix, &ps0, &po, &psT,
                        &Ti, &ni, &di, &dvi, &sd[0], &sd[1], &sd[2], &sd[0], &sd[1], &sd[2],
                        &sv[0], &sv[1], &sv[2], &sv[0], &sv[1], &sv[2]};
      seqdeploy::LaunchTriton(kernel, stream, heads, value_blocks, args);
      return;
    }
    if (B * n > 65535) throw Error("the chunked CUDA kernels take B * n <= 65535 (a grid's y)");
    const auto& wy = Find("wy", dtype, 19);
    const auto& chunk = Find("chunk", dtype, 23);
    // scratch: W [B, n, 2, Tp, d] and U [B, n, 2, Tp, dv] in q's dtype (fp32 for fp32, fp16 for
    // fp16, as the torch op keeps them), gamma [B, n, 2, Tp] fp32; 256-byte aligned regions
    const int64_t elem = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 2;
    const int64_t rows = B * n * 2 * Tp;
    auto aligned = [](int64_t bytes) { return seqdeploy::CeilDiv(bytes, 256) * 256; };
    const int64_t w_bytes = aligned(rows * d * elem), u_bytes = aligned(rows * dv * elem);
    seqdeploy::CUdeviceptr pw = scratch_.Get(stream, size_t(w_bytes + u_bytes + aligned(rows * 4)));
    seqdeploy::CUdeviceptr pu = pw + w_bytes, pgam = pu + u_bytes;
    void* wy_args[19] = {&pk, &pv, &pbeta, &pgf, &pgs, &pw, &pu, &pgam, &Ti, &ni, &di, &dvi,
                         &sd[0], &sd[1], &sd[2], &sv[0], &sv[1], &sv[2], &Tpi};
    seqdeploy::LaunchTriton(wy, stream, unsigned(n_chunks), heads, wy_args);
    void* chunk_args[23] = {&pq, &pk, &pw, &pu, &pgam, &pmix, &ps0, &po, &psT, &Ti, &ni, &di,
                            &dvi, &sd[0], &sd[1], &sd[2], &sd[0], &sd[1], &sd[2], &sv[0], &sv[1],
                            &sv[2], &Tpi};
    seqdeploy::LaunchTriton(chunk, stream, heads, value_blocks, chunk_args);
  }

  bool cuda_;
  seqdeploy::DeviceScratch scratch_;
};

}  // namespace

SEQDEPLOY_ORT_OP(DualDeltaRuleKernel)
