"""``seqdeploy::dual_delta_rule``: two gated delta-rule memories read by one query, mixed.

Layout (batch-first, heads third): ``q, k [B, T, n, d]``, ``v [B, T, n, dv]``,
``beta, mix [B, T, n]`` (input dtype), ``g_fast, g_slow [B, T, n]`` (log-decays, <= 0; any
float dtype, used in fp32), ``state0 [B, n, 2, d, dv]`` fp32 (memory 0 = fast, 1 = slow).
Returns ``o [B, T, n, dv]`` in the dtype of ``q`` and ``stateT [B, n, 2, d, dv]`` fp32.

For each memory s with a_t = exp(g^s_t):

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   o^s_t = S_t^T q_t
    o_t = mix_t o^fast_t + (1 - mix_t) o^slow_t

Each memory alone is the gated delta rule. Forms, side by side: ``naive_dual_delta_rule``
(float64 loop, tests only), ``reference_dual_delta_rule`` (fp32 step loop: the ``torch-ref``
engine and the seed's formulation), ``vectorised_dual_delta_rule`` (chunkwise WY/UT form in
torch, the CPU kernel) and the Triton kernels (``kernels.py``, the CUDA kernel).
"""
from __future__ import annotations

import torch

from seqdeploy.ops import CustomOp, lazy_kernel, make_schema, register_schema

CHUNK = 64


def naive_dual_delta_rule(q, k, v, beta, g_fast, g_slow, mix, state0):
    """Float64 per-token loop written from the equations above, independent of the kernels.
    Returns ``(o, stateT)`` in float64."""
    q, k, v, beta, g_fast, g_slow, mix, state0 = (
        t.detach().cpu().double() for t in (q, k, v, beta, g_fast, g_slow, mix, state0))
    B, T, n, d = q.shape
    S = [state0[:, :, 0].clone(), state0[:, :, 1].clone()]     # [B, n, d, dv] each
    outs = []
    for t in range(T):
        kt, qt, vt, bt = k[:, t], q[:, t], v[:, t], beta[:, t]
        per_memory = []
        for s, g in enumerate((g_fast, g_slow)):
            a = torch.exp(g[:, t])[..., None, None]              # [B, n, 1, 1]
            decayed = a * S[s]
            predicted = torch.einsum("bnde,bnd->bne", decayed, kt)
            S[s] = decayed + torch.einsum("bnd,bne->bnde", kt, bt[..., None] * (vt - predicted))
            per_memory.append(torch.einsum("bnde,bnd->bne", S[s], qt))
        m = mix[:, t][..., None]
        outs.append(m * per_memory[0] + (1 - m) * per_memory[1])
    return torch.stack(outs, 1), torch.stack(S, 2)


def reference_dual_delta_rule(q, k, v, beta, g_fast, g_slow, mix, state0):
    """The seed's formulation: a per-token Python loop over both memories, fp32 state."""
    dtype = q.dtype
    q, k, v, beta, mix = (t.float() for t in (q, k, v, beta, mix))
    a = torch.stack([g_fast.float(), g_slow.float()], 2).exp()    # [B, T, 2, n]
    S = state0.float().clone()                                   # [B, n, 2, d, dv]
    outs = []
    for t in range(q.shape[1]):
        S = S * a[:, t].transpose(1, 2)[..., None, None]
        kt = k[:, t, :, None, :, None]                           # [B, n, 1, d, 1]
        predicted = (S * kt).sum(3)                              # [B, n, 2, dv]
        u = beta[:, t, :, None, None] * (v[:, t, :, None] - predicted)
        S = S + kt * u[:, :, :, None, :]
        o = (S * q[:, t, :, None, :, None]).sum(3)               # [B, n, 2, dv]
        m = mix[:, t, :, None]
        outs.append(m * o[:, :, 0] + (1 - m) * o[:, :, 1])
    return torch.stack(outs, 1).to(dtype), S


def vectorised_dual_delta_rule(q, k, v, beta, g_fast, g_slow, mix, state0, chunk: int = CHUNK):
    """Chunkwise WY/UT form in fp32, both memories batched as one axis, one loop step per chunk.

    Within a chunk (gamma = inclusive cumulative log-decay, relative to the chunk start):
    ``A_ij = beta_i (k_i . k_j) e^{gamma_i - gamma_j}`` for i > j, ``W = (I+A)^-1 (beta e^gamma K)``,
    ``U = (I+A)^-1 (beta V)``; then ``V' = U - W S``, ``O = e^gamma (Q S) + (causal(QK^T e^{gamma_i -
    gamma_j})) V'`` and ``S' = e^{gamma_C} S + (K e^{gamma_C - gamma})^T V'``. Exponents are masked to
    i >= j before ``exp`` so no growing factor is ever formed.
    """
    B, T, n, d = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    # [B, n, 2, T, ...]: the memory axis next to the heads, so both memories run as one batch
    f = lambda x: x.float().permute(0, 2, 1, 3)[:, :, None]         # noqa: E731
    Q, K, V = f(q), f(k), f(v)
    beta_ = beta.float().permute(0, 2, 1)[:, :, None, :, None]      # [B, n, 1, T, 1]
    g = torch.stack([g_fast.float(), g_slow.float()], 2).permute(0, 3, 2, 1)  # [B, n, 2, T]
    mix_ = mix.float().permute(0, 2, 1)[..., None]                  # [B, n, T, 1]
    S = state0.float().clone()
    o = torch.empty(B, n, 2, T, dv, dtype=torch.float32)
    for t0 in range(0, T, chunk):
        c = min(chunk, T - t0)
        sl = slice(t0, t0 + c)
        Kc, Qc, Vc, bc = K[:, :, :, sl], Q[:, :, :, sl], V[:, :, :, sl], beta_[:, :, :, sl]
        gamma = g[..., sl].cumsum(-1)                                # [B, n, 2, c]
        diff = gamma[..., :, None] - gamma[..., None, :]
        lower = torch.ones(c, c, dtype=torch.bool).tril()
        decay = torch.exp(diff.masked_fill(~lower, float("-inf")))   # e^{gamma_i - gamma_j}, i >= j
        kk = Kc @ Kc.transpose(-1, -2)                               # [B, n, 1, c, c]
        A = (bc * kk * decay).tril(-1)
        eye = torch.eye(c).expand_as(A)
        rhs = torch.cat([bc * gamma.exp()[..., None] * Kc, (bc * Vc).expand(-1, -1, 2, -1, -1)], -1)
        wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        W, U = wu[..., :d], wu[..., d:]
        Vn = U - W @ S                                               # [B, n, 2, c, dv]
        qk = (Qc @ Kc.transpose(-1, -2)) * decay                     # causal incl. diagonal
        o[:, :, :, sl] = gamma.exp()[..., None] * (Qc @ S) + qk @ Vn
        last = gamma[..., -1:]
        S = last.exp()[..., None] * S + (Kc * (last - gamma).exp()[..., None]).transpose(-1, -2) @ Vn
    out = mix_ * o[:, :, 0] + (1 - mix_) * o[:, :, 1]                # [B, n, T, dv]
    return out.permute(0, 2, 1, 3).to(dtype), S


def check_shapes(q, k, v, beta, g_fast, g_slow, mix, state0) -> None:
    """One-line errors for inconsistent shapes (the op is also callable directly)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"dual_delta_rule: q and k must be [B, T, n, d] alike, got "
                         f"{list(q.shape)} and {list(k.shape)}")
    B, T, n, d = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, n):
        raise ValueError(f"dual_delta_rule: v must be [B, T, n, dv] = [{B}, {T}, {n}, dv], got {list(v.shape)}")
    for name, t in (("beta", beta), ("g_fast", g_fast), ("g_slow", g_slow), ("mix", mix)):
        if tuple(t.shape) != (B, T, n):
            raise ValueError(f"dual_delta_rule: {name} must be [B, T, n] = [{B}, {T}, {n}], got {list(t.shape)}")
    if tuple(state0.shape) != (B, n, 2, d, v.shape[3]):
        raise ValueError(f"dual_delta_rule: state0 must be [B, n, 2, d, dv] = "
                         f"[{B}, {n}, 2, {d}, {v.shape[3]}], got {list(state0.shape)}")


@torch.library.custom_op("seqdeploy::dual_delta_rule", mutates_args=())
def dual_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    g_fast: torch.Tensor, g_slow: torch.Tensor, mix: torch.Tensor,
                    state0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (and any non-CUDA device): the vectorised chunkwise form."""
    check_shapes(q, k, v, beta, g_fast, g_slow, mix, state0)
    device = q.device
    args = [a.cpu() for a in (q, k, v, beta, g_fast, g_slow, mix, state0)]
    o, state = vectorised_dual_delta_rule(*args)
    return o.to(device), state.to(device)


@dual_delta_rule.register_fake
def _(q, k, v, beta, g_fast, g_slow, mix, state0):
    B, T, n, _ = q.shape
    return (q.new_empty(B, T, n, v.shape[-1]),
            state0.new_empty(state0.shape, dtype=torch.float32))


#: CUDA: the Triton kernels (imported on first use: CPU-only runs never load them)
cuda_dual_delta_rule = lazy_kernel("seqdeploy_lam.kernels", "triton_dual_delta_rule")
dual_delta_rule.register_kernel("cuda")(cuda_dual_delta_rule)

INPUTS = ("q", "k", "v", "beta", "g_fast", "g_slow", "mix", "state0")
OUTPUTS = ("o", "stateT")

#: head tiles (BLOCK_D = BLOCK_DV) the ORT library compiles; any d, dv up to the tile runs masked
#: in the smallest tile holding both. 64 is the base preset's head (tiny's 32 runs masked in it):
#: a 32 tile would add about 45 s of CPU per architecture to a cold build (fp32 WY and chunk
#: kernels take 8-21 s each to lower on the 2-core CI machine), over the CI time budget
ORT_HEAD_TILES = (64,)


def _ort_variants(path: str):
    """``dtype -> {"d<H>": (constexprs, num_warps)}`` for one kernel (``path``: recurrent, wy,
    chunk): the constexprs of ``kernels.launch_plan`` for d = dv = H in the fused design (the
    library compiles the recurrent and fused kernels; the torch op's default for T > 16 is
    the split design, which the library does not carry yet)."""
    def variants(dtype: str) -> dict:
        from seqdeploy.precision import TORCH_DTYPES
        from seqdeploy_lam.kernels import BT, launch_plan

        # the kernel's constexprs -> the plan fields they take
        fields = {"wy": dict(BD="BD", BDV="BDV", PREC="PREC", INV_PREC="INV_PREC", INVERSE="inverse"),
                  "chunk": dict(BD="BD", BV="BV", PREC="PREC"),
                  "recurrent": dict(BD="BD", BV="BV")}[path]
        out = {}
        for head in ORT_HEAD_TILES:
            plan = launch_plan(BT + 1, head, head, TORCH_DTYPES[dtype], design="fused",
                               wy="fused", inverse="extract")
            constexprs = ({} if path == "recurrent" else {"BT": BT}) | {
                name: getattr(plan, field) for name, field in fields.items()}
            out[f"d{head}"] = (constexprs, plan.num_warps)
        return out
    return variants


def ort_kernel():
    """The ONNX Runtime kernels (``ort_dual_delta_rule.cc``): a CPU per-token loop, and on CUDA
    this plugin's Triton kernels compiled ahead of time, dispatched as on torch: the recurrent
    kernel for T <= RECURRENT_MAX_T, else the chunked path's two launches (WY, then chunks)."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    p, f, i = "*T", "*fp32", "i32"
    strides = lambda x: {f"s{x}_b": i, f"s{x}_t": i, f"s{x}_h": i}   # noqa: E731
    sizes = dict(T=i, n=i, d=i, dv=i)
    # W and U in q's dtype (fp32 for fp32 inputs), as the torch op keeps them
    wy = dict(k_ptr=p, v_ptr=p, beta_ptr=p, gf_ptr=f, gs_ptr=f, w_ptr=p, u_ptr=p, gam_ptr=f,
              **sizes, **strides("k"), **strides("v"), Tp=i)
    chunk = dict(q_ptr=p, k_ptr=p, w_ptr=p, u_ptr=p, gam_ptr=f, mix_ptr=p, s0_ptr=f, o_ptr=p,
                 sT_ptr=f, **sizes, **strides("q"), **strides("k"), **strides("o"), Tp=i)
    recurrent = dict(q_ptr=p, k_ptr=p, v_ptr=p, beta_ptr=p, gf_ptr=f, gs_ptr=f, mix_ptr=p,
                     s0_ptr=f, o_ptr=p, sT_ptr=f, **sizes, **strides("q"), **strides("k"),
                     **strides("v"), **strides("o"))
    aot = tuple(TritonAOT(f"dual_delta_rule_{path}", f"seqdeploy_lam.kernels:_{path}_kernel",
                          signature, _ort_variants(path))
                for path, signature in (("recurrent", recurrent), ("wy", wy), ("chunk", chunk)))
    return OrtKernel("seqdeploy_lam", ("ort_dual_delta_rule.cc",), "DualDeltaRuleKernel", aot)


def trt_aot():
    """TensorRT's AOT form (full TensorRT only): ``kernels._dual_delta_rule_aot_kernel``, the
    recurrent design at every T (the chunked designs need workspaces and several launches,
    which TensorRT's AOT launch cannot give), tiled as ``kernels.launch_plan`` tiles it for
    the model's head sizes d and dv (fixed at build time). Slower than the chunked path at
    long T on the GPU: it walks the tokens one by one."""
    from seqdeploy.trt.aot import EntryLaunch, TrtAot, cdiv

    def launch(q):
        from seqdeploy_lam.kernels import launch_plan

        B, T, n, d = (q.sizes("q", a) for a in range(4))
        dv = q.sizes("v", 3)
        plan = launch_plan(1, q.sizes.constant("q", 3), q.sizes.constant("v", 3), q.torch_dtype,
                           design="recurrent")
        return EntryLaunch(grid=(B * n, cdiv(dv, plan.BV)), scalars=(T, n, d, dv),
                           constexprs={"BD": plan.BD, "BV": plan.BV}, num_warps=plan.num_warps)

    def output_shapes(sizes):
        B, T, n, d = (sizes("q", a) for a in range(4))
        dv = sizes("v", 3)
        return (B, T, n, dv), (B, n, 2, d, dv)

    return TrtAot("seqdeploy_lam.kernels:_dual_delta_rule_aot_kernel", ("T", "n", "d", "dv"),
                  launch, output_shapes)


def dual_delta_rule_op() -> CustomOp:
    from seqdeploy_lam.onnx import dual_delta_rule_function, dual_delta_rule_translation

    schema = make_schema("DualDeltaRule", INPUTS, OUTPUTS, doc=__doc__.split("\n\n")[0],
                         float_inputs=("g_fast", "g_slow", "state0"), float_outputs=("stateT",))
    register_schema(schema)
    return CustomOp(name="dual_delta_rule", onnx_name="DualDeltaRule", torch_op=dual_delta_rule,
                    reference=reference_dual_delta_rule, schema=schema,
                    translation=dual_delta_rule_translation, fallback=dual_delta_rule_function,
                    doc="two gated delta-rule memories, outputs mixed per token",
                    eager={"cuda": cuda_dual_delta_rule}, extra={"ort": ort_kernel()},
                    trt_aot=trt_aot())
