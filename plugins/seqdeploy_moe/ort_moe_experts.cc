// ONNX Runtime kernels of seqdeploy::MoEExperts (see experts.py for the op):
//   x [B, T, d] (T), expert [B, T] int64, gate [B, T] fp32, w1 [E, d, f], b1 [E, f], w2 [E, f, d],
//   b2 [E, d] (T) -> y [B, T, d] (T);  y_t = gate_t (GELU(x_t W1_e + b1_e) W2_e + b2_e), e = expert_t,
//   with the exact (erf) GELU, fp32 accumulation, and exactly 0 for a token whose gate is 0.
// T is fp32 or fp16 (the fp16 graphs keep gate fp32 and the ids int64).
// CPU: tokens are grouped by expert (a counting sort), so each expert's weights are read (in
// fp16, widened to fp32) once per run; then a loop over the group's tokens computes each
// token's FFN alone, in fp32 (h included), as the torch op's CPU form does. Expert ids must lie
// in [0, E): any other id is an error.
// CUDA: the plugin's own Triton kernels (kernels.py), compiled ahead of time, in the order the
// torch op launches them, with no host sync:
//   1. a memset of the E per-expert counters;
//   2. _rank_kernel ("moe_rank_i64_e<BLOCK_E>"): each token's slot in its expert's group;
//   3. _layout_kernel ("moe_layout_i64_e<BLOCK_E>_m<BLOCK_M>"): the padded row -> token map and
//      the expert of each row tile;
//   4. _grouped_ffn_kernel ("moe_ffn_<dtype>_m<BLOCK_M>_n<BLOCK_N>_first"): h = GELU(x W1_e +
//      b1_e), h in the activation dtype as the torch op keeps it;
//   5. _grouped_ffn_kernel ("moe_ffn_<dtype>_m<BLOCK_M>_n<BLOCK_N>_second"): y = gate (h W2_e +
//      b2_e), scattered back to the tokens.
// BLOCK_E is 8, 32 or 128 (kernels.ORT_BLOCK_E: E <= 128 here); BLOCK_M follows the mean group
// size N / E as kernels.experts_config chooses it (16, 32, 64, 128), with that function's
// BLOCK_N (in the variant's name, so the grid below cannot disagree with the binary), BLOCK_K
// and warps. Differences from the torch op's launches, because the AOT build
// takes one binary per variant: BLOCK_N and BLOCK_K are not shrunk to small d or f (the kernel
// masks them), EVEN_K is off (the K loop masks), and the pipeline depth is Triton's default.
// None of these kernels needs Triton scratch, clusters or TMA descriptors.
// The counters, ranks, row map, tile map and h live in device scratch kept by the kernel
// instance. As in the torch op, an id out of [0, E) on CUDA joins no group and its row of y is
// left unwritten (the router never produces one; checking would need a host sync).
#include <algorithm>
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

constexpr int64_t kBlockE[] = {8, 32, 128};   // kernels.ORT_BLOCK_E
constexpr int64_t kLayoutBlock = 128;          // kernels.LAYOUT_BLOCK: tokens per program

// kernels.experts_config: rows per GEMM tile from the mean group size (each group is padded
// to a multiple of it)
int64_t BlockM(int64_t N, int64_t E) {
  double mean = static_cast<double>(N) / static_cast<double>(std::max<int64_t>(E, 1));
  return mean >= 512 ? 128 : mean >= 64 ? 64 : mean >= 24 ? 32 : 16;
}

inline float Gelu(float z) { return 0.5f * z * (1.0f + std::erf(z * 0.7071067811865476f)); }

// The weights of one expert as fp32: fp32 weights are used in place, fp16 ones widened once.
const float* AsFloat(const float* w, int64_t, std::vector<float>&) { return w; }
const float* AsFloat(const Ort::Float16_t* w, int64_t n, std::vector<float>& buffer) {
  buffer.resize(n);
  for (int64_t i = 0; i < n; ++i) buffer[i] = w[i].ToFloat();
  return buffer.data();
}

template <typename T>
void MoEExpertsCpu(const T* x, const int64_t* expert, const float* gate, const T* w1, const T* b1,
                   const T* w2, const T* b2, T* y, int64_t N, int64_t E, int64_t d, int64_t f) {
  std::vector<int64_t> start(E + 1, 0), order(N);
  for (int64_t n = 0; n < N; ++n) ++start[expert[n] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) order[next[expert[n]]++] = n;
  std::vector<float> w1_buf, b1_buf, w2_buf, b2_buf, h(f), out(d);
  for (int64_t e = 0; e < E; ++e) {
    if (start[e] == start[e + 1]) continue;
    const float* W1 = AsFloat(w1 + e * d * f, d * f, w1_buf);
    const float* B1 = AsFloat(b1 + e * f, f, b1_buf);
    const float* W2 = AsFloat(w2 + e * f * d, f * d, w2_buf);
    const float* B2 = AsFloat(b2 + e * d, d, b2_buf);
    for (int64_t i = start[e]; i < start[e + 1]; ++i) {
      int64_t n = order[i];
      T* yn = y + n * d;
      float g = gate[n];
      if (g == 0.0f) {   // dropped by the router's capacity: exactly 0, whatever its FFN
        for (int64_t c = 0; c < d; ++c) yn[c] = seqdeploy::FromFloat<T>(0.0f);
        continue;
      }
      const T* xn = x + n * d;
      std::copy(B1, B1 + f, h.begin());
      for (int64_t k = 0; k < d; ++k) {   // h += x_k W1[k, :], row by row (contiguous)
        float xk = seqdeploy::ToFloat(xn[k]);
        const float* row = W1 + k * f;
        for (int64_t j = 0; j < f; ++j) h[j] += xk * row[j];
      }
      for (int64_t j = 0; j < f; ++j) h[j] = Gelu(h[j]);
      std::copy(B2, B2 + d, out.begin());
      for (int64_t j = 0; j < f; ++j) {
        float hj = h[j];
        const float* row = W2 + j * d;
        for (int64_t c = 0; c < d; ++c) out[c] += hj * row[c];
      }
      for (int64_t c = 0; c < d; ++c) yn[c] = seqdeploy::FromFloat<T>(g * out[c]);
    }
  }
}

struct MoEExpertsKernel : seqdeploy::Computes<MoEExpertsKernel> {
  static constexpr const char* kName = "MoEExperts";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    return {t, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, t, t, t, t};
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    return {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
  }

  MoEExpertsKernel(const Ort::ConstKernelInfo&, bool cuda) : cuda_(cuda) {}

  void Compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), expert = ctx.GetInput(1), gate = ctx.GetInput(2),
         w1 = ctx.GetInput(3), b1 = ctx.GetInput(4), w2 = ctx.GetInput(5), b2 = ctx.GetInput(6);
    auto shape = seqdeploy::ShapeOf(x, 3, "x");
    int64_t B = shape[0], T = shape[1], d = shape[2], N = B * T;
    auto w1_shape = seqdeploy::ShapeOf(w1, 3, "w1");
    int64_t E = w1_shape[0], f = w1_shape[2];
    if (w1_shape[1] != d) throw Error("w1 must be [E, d, f] with x's d");
    if (seqdeploy::ShapeOf(expert, 2, "expert") != std::vector<int64_t>{B, T} ||
        seqdeploy::ShapeOf(gate, 2, "gate") != std::vector<int64_t>{B, T})
      throw Error("expert and gate must be [B, T]");
    if (seqdeploy::ShapeOf(b1, 2, "b1") != std::vector<int64_t>{E, f} ||
        seqdeploy::ShapeOf(w2, 3, "w2") != std::vector<int64_t>{E, f, d} ||
        seqdeploy::ShapeOf(b2, 2, "b2") != std::vector<int64_t>{E, d})
      throw Error("b1, w2 and b2 must be [E, f], [E, f, d] and [E, d]");
    auto type = x.GetTensorTypeAndShapeInfo().GetElementType();
    const char* dtype = seqdeploy::DtypeName(type);
    if (!dtype) throw Error("x must be float32 or float16");
    seqdeploy::RequireDtype(type, {&w1, &b1, &w2, &b2}, "w1, b1, w2 and b2 must have x's dtype");
    seqdeploy::RequireDtype(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {&expert}, "expert must be int64");
    seqdeploy::RequireDtype(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {&gate}, "gate must be float32");
    auto y = ctx.GetOutput(0, shape);
    if (N * d == 0) return;
    if (E < 1 || f < 1) throw Error("w1 must have E >= 1 experts and f >= 1");
    if (!cuda_) {
      const int64_t* ids = expert.GetTensorData<int64_t>();
      for (int64_t n = 0; n < N; ++n)
        if (ids[n] < 0 || ids[n] >= E)
          throw Error("expert ids must lie in [0, " + std::to_string(E) + "), got " +
                      std::to_string(ids[n]) + " at token " + std::to_string(n));
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Cpu<float>(x, ids, gate, w1, b1, w2, b2, y, N, E, d, f);
      else
        Cpu<Ort::Float16_t>(x, ids, gate, w1, b1, w2, b2, y, N, E, d, f);
      return;
    }
    Cuda(ctx, x, expert, gate, w1, b1, w2, b2, y, dtype, N, E, d, f);
  }

 private:
  using Ptr = seqdeploy::CUdeviceptr;

  static Ptr In(const Ort::ConstValue& v) { return reinterpret_cast<Ptr>(v.GetTensorRawData()); }

  template <typename T>
  static void Cpu(const Ort::ConstValue& x, const int64_t* ids, const Ort::ConstValue& gate,
                  const Ort::ConstValue& w1, const Ort::ConstValue& b1, const Ort::ConstValue& w2,
                  const Ort::ConstValue& b2, Ort::UnownedValue& y, int64_t N, int64_t E, int64_t d,
                  int64_t f) {
    MoEExpertsCpu<T>(x.GetTensorData<T>(), ids, gate.GetTensorData<float>(), w1.GetTensorData<T>(),
                     b1.GetTensorData<T>(), w2.GetTensorData<T>(), b2.GetTensorData<T>(),
                     y.GetTensorMutableData<T>(), N, E, d, f);
  }

  void Cuda(Ort::KernelContext& ctx, const Ort::ConstValue& x, const Ort::ConstValue& expert,
            const Ort::ConstValue& gate, const Ort::ConstValue& w1, const Ort::ConstValue& b1,
            const Ort::ConstValue& w2, const Ort::ConstValue& b2, Ort::UnownedValue& y,
            const char* dtype, int64_t N, int64_t E, int64_t d, int64_t f) {
    int64_t block_e = seqdeploy::SmallestFit(kBlockE, E, "the CUDA kernels support E");
    int64_t block_m = BlockM(N, E);
    int64_t block_n = block_m >= 64 ? 128 : 64;   // kernels.experts_config
    std::string tile = "_m" + std::to_string(block_m), gemm = tile + "_n" + std::to_string(block_n);
    const auto& rank = seqdeploy::FindTritonKernel("moe_rank_i64_e" + std::to_string(block_e));
    const auto& layout =
        seqdeploy::FindTritonKernel("moe_layout_i64_e" + std::to_string(block_e) + tile);
    const auto& first = seqdeploy::FindTritonKernel(std::string("moe_ffn_") + dtype + gemm + "_first");
    const auto& second =
        seqdeploy::FindTritonKernel(std::string("moe_ffn_") + dtype + gemm + "_second");
    if (rank.n_args != 5 || layout.n_args != 8 || first.n_args != 15 || second.n_args != 15)
      throw Error("moe kernels have an unexpected signature");
    // the tiles any routing of N tokens over E experts needs (kernels.group_tokens)
    int64_t max_tiles = seqdeploy::CeilDiv(N, block_m) + std::min(E, N);
    int64_t rows = max_tiles * block_m;
    int64_t grid_first = max_tiles * seqdeploy::CeilDiv(f, block_n);
    int64_t grid_second = max_tiles * seqdeploy::CeilDiv(d, block_n);
    if (N * d > 0x7fffffff || rows * f > 0x7fffffff || E * d * f > 0x7fffffff ||
        grid_first > 0x7fffffff || grid_second > 0x7fffffff)
      throw Error("shape too large for the CUDA kernels' 32-bit sizes");
    // scratch: counts [E], rank [N], row_token [rows], tile_expert [max_tiles] (int32), then h
    // [rows, f] in x's dtype; each part 256-byte aligned
    size_t elem = std::string(dtype) == "fp32" ? 4 : 2;
    auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
    size_t at_rank = align(4 * E), at_rows = at_rank + align(4 * N),
           at_tiles = at_rows + align(4 * rows), at_h = at_tiles + align(4 * max_tiles),
           total = at_h + align(elem * rows * f);
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    Ptr base = scratch_.Get(stream, total);
    Ptr counts = base, ranks = base + at_rank, row_token = base + at_rows,
        tile_expert = base + at_tiles, h = base + at_h;
    seqdeploy::MemsetD32Async(counts, 0, size_t(E), stream);

    Ptr ids = In(expert), gates = In(gate), out = reinterpret_cast<Ptr>(y.GetTensorMutableRawData());
    int32_t n32 = int32_t(N), e32 = int32_t(E), tiles32 = int32_t(max_tiles);
    unsigned grid_tokens = unsigned(seqdeploy::CeilDiv(N, kLayoutBlock));
    void* rank_args[5] = {&ids, &counts, &ranks, &n32, &e32};
    seqdeploy::LaunchTriton(rank, stream, grid_tokens, rank_args);
    void* layout_args[8] = {&ids, &ranks, &counts, &row_token, &tile_expert, &n32, &e32, &tiles32};
    seqdeploy::LaunchTriton(layout, stream, grid_tokens, layout_args);

    // layer 1: h[row] = GELU(x[token(row)] W1_e + b1_e); layer 2: y[token] = gate (h[row] W2_e + b2_e)
    Ptr xs = In(x), w1s = In(w1), b1s = In(b1), w2s = In(w2), b2s = In(b2);
    int32_t l1[8] = {int32_t(d), int32_t(f), e32, int32_t(d), int32_t(d * f), int32_t(f),
                     int32_t(f), int32_t(f)};   // K N E s_a s_we s_wk s_be s_o
    void* first_args[15] = {&xs, &row_token, &tile_expert, &w1s, &b1s, &gates, &h};
    for (int i = 0; i < 8; ++i) first_args[7 + i] = &l1[i];
    seqdeploy::LaunchTriton(first, stream, unsigned(grid_first), first_args);
    int32_t l2[8] = {int32_t(f), int32_t(d), e32, int32_t(f), int32_t(f * d), int32_t(d),
                     int32_t(d), int32_t(d)};
    void* second_args[15] = {&h, &row_token, &tile_expert, &w2s, &b2s, &gates, &out};
    for (int i = 0; i < 8; ++i) second_args[7 + i] = &l2[i];
    seqdeploy::LaunchTriton(second, stream, unsigned(grid_second), second_args);
  }

  bool cuda_;
  seqdeploy::DeviceScratch scratch_;
};

}  // namespace

SEQDEPLOY_ORT_OP(MoEExpertsKernel)
