// ONNX Runtime kernels of seqdeploy::LinossScan (see ops.py for the op):
//   b_re, b_im [B, T, P] (T), A, G, dt [P] (fp32), state0 [B, P, 4] (fp32: z_re, z_im, x_re, x_im)
//   -> x_re, x_im [B, T, P] (T), stateT [B, P, 4] (fp32)
//   S = 1 + dt G,  z_t = (z_{t-1} - dt A x_{t-1} + dt b_t) / S,  x_t = x_{t-1} + dt z_t
// State and arithmetic are fp32 whatever T is (fp32 or fp16), and the state crosses the node in
// fp32 both ways, also in fp16 graphs (the fp32 islands A, G, dt, state0 and stateT).
// CPU: the step loop in that (z, x) form, the function's arithmetic, with dt A and 1/S computed
// in float64 and carried as float pairs (Split below).
// CUDA: the plugin's own Triton kernels (kernels.py), compiled ahead of time with the tile its
// launch_config gives a long sequence, BLOCK_T = 16 steps by BLOCK_P = 32 oscillators, one warp
// (partial tiles are masked): "linoss_rows_<dtype>_t16p32" (one program per batch row and block
// of P walks the whole sequence) when there are enough such programs to fill the GPU or T fits
// one tile, else "linoss_chunk_<dtype>_t16p32" (one program per chunk of T, decoupled
// look-back), the same choice as launch_config. Neither needs Triton scratch memory or clusters;
// the chunk kernel's look-back carries and zeroed flags live in device scratch kept by the
// kernel instance.
#include <cmath>

#include "seqdeploy_ort.h"

namespace {

using seqdeploy::Error;

// the compiled tile (ops.py, ort_kernel) and launch_config's ROWS_PER_SM (kernels.py)
constexpr int64_t kBlockT = 16, kBlockP = 32, kRowsPerSm = 6;

// The coefficients dt A and 1/S as unevaluated sums hi + lo of two floats (float64 split once),
// so that rounding them does not bias the recurrence: a one-ulp change of either moves the
// oscillator's frequency or damping, which the state then carries for every later step. Measured
// on tests/test_ort.py's inputs (40 seeds): with single floats the final state of an oscillator
// with dt A = 34 high in the stable band was 5.2e-5 off the float64 loop at T = 63 (1.2e-5 with
// the pairs), and the loop's state was up to 3.4x less accurate than the fallback function's,
// whose differently rounded 1/S happened to cancel it; with the pairs, at most 1.5x (the test
// allows 2x + 1e-6), and its worst case nearer the float64 loop than the function's (2.6e-6
// against 3.1e-6 at T = 2048).
// The state and the arithmetic stay fp32.
struct Split {
  float hi, lo;
  explicit Split(double v) : hi(static_cast<float>(v)), lo(static_cast<float>(v - hi)) {}
  Split() : hi(0), lo(0) {}
  float Times(float x) const { return hi * x + lo * x; }
};

template <typename T>
void LinossScanCpu(const T* br, const T* bi, const float* A, const float* G, const float* dt,
                   const float* s0, T* xr_out, T* xi_out, float* sT, int64_t B, int64_t T_,
                   int64_t P) {
  std::vector<Split> dta(P), inv_s(P);
  for (int64_t p = 0; p < P; ++p) {
    double d = dt[p];
    dta[p] = Split(d * A[p]);
    inv_s[p] = Split(1.0 / (1.0 + d * G[p]));
  }
  std::vector<float> zr(P), zi(P), xr(P), xi(P);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < P; ++p) {
      const float* s = &s0[(b * P + p) * 4];
      zr[p] = s[0];
      zi[p] = s[1];
      xr[p] = s[2];
      xi[p] = s[3];
    }
    for (int64_t t = 0; t < T_; ++t) {
      int64_t row = (b * T_ + t) * P;
      for (int64_t p = 0; p < P; ++p) {
        float d = dt[p];
        zr[p] = inv_s[p].Times(zr[p] - dta[p].Times(xr[p]) + d * seqdeploy::ToFloat(br[row + p]));
        zi[p] = inv_s[p].Times(zi[p] - dta[p].Times(xi[p]) + d * seqdeploy::ToFloat(bi[row + p]));
        xr[p] = xr[p] + d * zr[p];
        xi[p] = xi[p] + d * zi[p];
        xr_out[row + p] = seqdeploy::FromFloat<T>(xr[p]);
        xi_out[row + p] = seqdeploy::FromFloat<T>(xi[p]);
      }
    }
    for (int64_t p = 0; p < P; ++p) {
      float* s = &sT[(b * P + p) * 4];
      s[0] = zr[p];
      s[1] = zi[p];
      s[2] = xr[p];
      s[3] = xi[p];
    }
  }
}

struct LinossScanKernel : seqdeploy::Computes<LinossScanKernel> {
  static constexpr const char* kName = "LinossScan";
  static std::vector<ONNXTensorElementDataType> Inputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, f = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {t, t, f, f, f, f};
  }
  static std::vector<ONNXTensorElementDataType> Outputs() {
    auto t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, f = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return {t, t, f};
  }

  // x_re, x_im like b_re; stateT [B, P, 4] fp32
  static void InferOutputShapes(Ort::ShapeInferContext& ctx, ONNXTensorElementDataType type) {
    const auto& b = ctx.GetInputShape(0);
    Ort::ThrowOnError(ctx.SetOutputShape(0, b, type));
    Ort::ThrowOnError(ctx.SetOutputShape(1, b, type));
    Ort::ShapeInferContext::Shape state{int64_t(-1), int64_t(-1), int64_t(4)};
    if (b.size() == 3) {
      state[0] = b[0];
      state[1] = b[2];
    }
    Ort::ThrowOnError(ctx.SetOutputShape(2, state, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  }

  LinossScanKernel(const Ort::ConstKernelInfo&, bool cuda) : cuda_(cuda) {}

  void Compute(Ort::KernelContext& ctx) {
    auto b_re = ctx.GetInput(0), b_im = ctx.GetInput(1), A = ctx.GetInput(2), G = ctx.GetInput(3),
         dt = ctx.GetInput(4), state0 = ctx.GetInput(5);
    auto shape = seqdeploy::ShapeOf(b_re, 3, "b_re");
    int64_t B = shape[0], T = shape[1], P = shape[2];
    if (seqdeploy::ShapeOf(b_im, 3, "b_im") != shape) throw Error("b_im must have b_re's shape");
    if (seqdeploy::ShapeOf(A, 1, "A")[0] != P || seqdeploy::ShapeOf(G, 1, "G")[0] != P ||
        seqdeploy::ShapeOf(dt, 1, "dt")[0] != P)
      throw Error("A, G and dt must be [P] = [" + std::to_string(P) + "]");
    std::vector<int64_t> state{B, P, 4};
    if (seqdeploy::ShapeOf(state0, 3, "state0") != state)
      throw Error("state0 must be [B, P, 4] = [" + std::to_string(B) + ", " + std::to_string(P) +
                  ", 4]");
    auto type = b_re.GetTensorTypeAndShapeInfo().GetElementType();
    const char* dtype = seqdeploy::DtypeName(type);
    if (!dtype) throw Error("b_re must be float32 or float16");
    seqdeploy::RequireDtype(type, {&b_im}, "b_im must have b_re's dtype");
    auto x_re = ctx.GetOutput(0, shape), x_im = ctx.GetOutput(1, shape);
    auto state_t = ctx.GetOutput(2, state);
    if (B * P == 0) return;   // T = 0 still hands state0 on as stateT
    if (!cuda_) {
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Cpu<float>(b_re, b_im, A, G, dt, state0, x_re, x_im, state_t, B, T, P);
      else
        Cpu<Ort::Float16_t>(b_re, b_im, A, G, dt, state0, x_re, x_im, state_t, B, T, P);
      return;
    }
    if (B * T * P > 0x7fffffff) throw Error("shape too large for the CUDA kernel's 32-bit sizes");
    auto stream = static_cast<seqdeploy::CUstream>(ctx.GetGPUComputeStream());
    int64_t n_slots = B * seqdeploy::CeilDiv(P, kBlockP);
    // the rows kernel also runs T = 0: its loop does nothing and it stores state0 as stateT
    bool rows = T <= kBlockT || n_slots >= kRowsPerSm * seqdeploy::MultiprocessorCount();
    seqdeploy::CUdeviceptr ptrs[9] = {Ptr(b_re), Ptr(b_im), Ptr(A), Ptr(G), Ptr(dt), Ptr(state0),
                                      Out(x_re), Out(x_im), Out(state_t)};
    // B T P sb_b sb_t sx_b sx_t (ORT's tensors are contiguous)
    int32_t ints[7] = {int32_t(B), int32_t(T), int32_t(P), int32_t(T * P), int32_t(P),
                       int32_t(T * P), int32_t(P)};
    void* args[18];
    for (int i = 0; i < 9; ++i) args[i] = &ptrs[i];
    if (rows) {
      const auto& kernel =
          seqdeploy::FindTritonKernel(std::string("linoss_rows_") + dtype + "_t16p32");
      if (kernel.n_args != 16) throw Error("linoss_rows kernel has an unexpected signature");
      for (int i = 0; i < 7; ++i) args[9 + i] = &ints[i];
      seqdeploy::LaunchTriton(kernel, stream, unsigned(n_slots), args);
      return;
    }
    const auto& kernel =
        seqdeploy::FindTritonKernel(std::string("linoss_chunk_") + dtype + "_t16p32");
    if (kernel.n_args != 18) throw Error("linoss_chunk kernel has an unexpected signature");
    int64_t n_chunks = seqdeploy::CeilDiv(T, kBlockT);
    int64_t grid = n_chunks * n_slots;
    if (grid > 0x7fffffff) throw Error("shape too large for the CUDA kernel's 32-bit grid");
    // per unfinished chunk: a flag per program slot, and eight fp32 planes of [B, P] (aggregate
    // and inclusive state); flags first, then the carries (4-byte words both; flags need zeros
    // every run)
    int64_t flag_words = (n_chunks - 1) * n_slots;
    int64_t carry_words = (n_chunks - 1) * 8 * B * P;
    seqdeploy::CUdeviceptr scratch = scratch_.Get(stream, 4 * (flag_words + carry_words));
    seqdeploy::MemsetD32Async(scratch, 0, flag_words, stream);
    seqdeploy::CUdeviceptr flags = scratch, carry = scratch + 4 * flag_words;
    args[9] = &carry;
    args[10] = &flags;
    for (int i = 0; i < 7; ++i) args[11 + i] = &ints[i];
    seqdeploy::LaunchTriton(kernel, stream, unsigned(grid), args);
  }

 private:
  static seqdeploy::CUdeviceptr Ptr(const Ort::ConstValue& v) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(v.GetTensorRawData());
  }
  static seqdeploy::CUdeviceptr Out(Ort::UnownedValue& v) {
    return reinterpret_cast<seqdeploy::CUdeviceptr>(v.GetTensorMutableRawData());
  }

  template <typename T>
  static void Cpu(const Ort::ConstValue& br, const Ort::ConstValue& bi, const Ort::ConstValue& A,
                  const Ort::ConstValue& G, const Ort::ConstValue& dt, const Ort::ConstValue& s0,
                  Ort::UnownedValue& xr, Ort::UnownedValue& xi, Ort::UnownedValue& sT, int64_t B,
                  int64_t T_, int64_t P) {
    LinossScanCpu<T>(br.GetTensorData<T>(), bi.GetTensorData<T>(), A.GetTensorData<float>(),
                     G.GetTensorData<float>(), dt.GetTensorData<float>(), s0.GetTensorData<float>(),
                     xr.GetTensorMutableData<T>(), xi.GetTensorMutableData<T>(),
                     sT.GetTensorMutableData<float>(), B, T_, P);
  }

  bool cuda_;
  seqdeploy::DeviceScratch scratch_;
};

}  // namespace

SEQDEPLOY_ORT_OP(LinossScanKernel)
