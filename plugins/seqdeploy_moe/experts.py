"""``seqdeploy::moe_experts``: each token through its own expert's FFN, scaled by its gate.

Layout: ``x [B, T, d]``, ``expert [B, T] int64`` (in ``[0, E)``), ``gate [B, T]`` float32,
``w1 [E, d, f]``, ``b1 [E, f]``, ``w2 [E, f, d]``, ``b2 [E, d]`` (weights in the dtype of x).
Returns ``y [B, T, d]`` in the dtype of ``x``::

    y_t = gate_t * (GELU(x_t W1_e + b1_e) W2_e + b2_e),   e = expert_t

with the exact (erf) GELU and fp32 accumulation. A token whose gate is 0 (dropped by the
router's capacity) gets exactly 0, whatever its FFN value (even an fp16 overflow).

The fast forms group the tokens by expert and run one GEMM per FFN layer over the groups:
the work is that of one dense FFN over the tokens, never every expert for every token.

Forms, side by side: ``naive_moe_experts`` (float64 per-token loop, tests only),
``reference_moe_experts`` (the seed's mask loop over experts: the ``torch-ref`` engine),
``grouped_moe_experts`` (sort by expert, one matmul per expert: the CPU kernel), the Triton
grouped GEMMs (``kernels.triton_moe_experts``, CUDA), the ONNX forms, and the ONNX Runtime
kernels (``ort_moe_experts.cc``: a per-token C++ loop, and the same Triton kernels compiled
ahead of time).

TensorRT: no AOT entry (``CustomOp.trt_aot``), so its nodes keep the Python ``IPluginV3``
form even under full TensorRT, whose AOT launch takes one kernel and no workspace. Both
designs group the tokens by expert in launches of their own (counts, ranks, the tile layout,
or buckets) writing index buffers the GEMMs then read, and the padded design keeps the hidden
``[N, f]`` activations between its two GEMMs. One workspace-free kernel would have to run
each token's FFN on its own (a GEMV per token, each expert's weights read once per token
instead of once per tile of its tokens): no such design exists here, and it would be a new
kernel rather than these ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqdeploy.errors import InputError
from seqdeploy.ops import CustomOp, define_op


def check_experts_args(x, expert, gate, w1, b1, w2, b2) -> None:
    """One-line errors for inconsistent shapes (values of ``expert`` are checked on the CPU)."""
    if x.dim() != 3:
        raise InputError(f"moe_experts: x must be [B, T, d], got {list(x.shape)}")
    B, T, d = x.shape
    if w1.dim() != 3 or w1.shape[1] != d:
        raise InputError(f"moe_experts: w1 must be [E, {d}, f], got {list(w1.shape)}")
    E, _, f = w1.shape
    want = {"expert": (expert, (B, T)), "gate": (gate, (B, T)), "b1": (b1, (E, f)),
            "w2": (w2, (E, f, d)), "b2": (b2, (E, d))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise InputError(f"moe_experts: {name} must be {list(shape)}, got {list(t.shape)}")
    if expert.dtype != torch.int64:
        raise InputError(f"moe_experts: expert must be int64, got {expert.dtype}")


def naive_moe_experts(x, expert, gate, w1, b1, w2, b2) -> torch.Tensor:
    """Float64 loop over tokens, written independently of the kernels. Returns float64."""
    B, T, d = x.shape
    y = torch.zeros(B, T, d, dtype=torch.float64)
    x, gate = x.double().cpu(), gate.double().cpu()
    w1, b1, w2, b2 = (w.double().cpu() for w in (w1, b1, w2, b2))
    for b in range(B):
        for t in range(T):
            g = float(gate[b, t])
            if g == 0.0:
                continue
            e = int(expert[b, t])
            z = x[b, t] @ w1[e] + b1[e]
            h = 0.5 * z * (1.0 + torch.erf(z / 2.0 ** 0.5))
            y[b, t] = g * (h @ w2[e] + b2[e])
    return y


def _ffn(x, w1, b1, w2, b2) -> torch.Tensor:
    """fp32 FFN of rows ``x [n, d]`` through one expert's weights."""
    h = F.gelu(torch.addmm(b1.float(), x.float(), w1.float()))
    return torch.addmm(b2.float(), h, w2.float())


def reference_moe_experts(x, expert, gate, w1, b1, w2, b2) -> torch.Tensor:
    """The seed's loop: for each expert, the tokens routed to it (a boolean mask)."""
    B, T, d = x.shape
    xf, ef, gf = x.reshape(-1, d), expert.reshape(-1), gate.reshape(-1).float()
    y = torch.zeros(B * T, d, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        mask = (ef == e) & (gf != 0)
        if mask.any():
            y[mask] = gf[mask, None] * _ffn(xf[mask], w1[e], b1[e], w2[e], b2[e])
    return y.reshape(B, T, d).to(x.dtype)


def grouped_moe_experts(x, expert, gate, w1, b1, w2, b2) -> torch.Tensor:
    """CPU kernel: tokens sorted by expert (a stable sort), one matmul per non-empty group,
    results scattered back in one indexed write."""
    B, T, d = x.shape
    E = w1.shape[0]
    ef, gf = expert.reshape(-1), gate.reshape(-1).float()
    if ef.numel() and (int(ef.min()) < 0 or int(ef.max()) >= E):
        raise InputError(f"moe_experts: expert ids must lie in [0, {E}), "
                         f"got [{int(ef.min())}, {int(ef.max())}]")
    order = torch.argsort(ef, stable=True)
    counts = torch.bincount(ef, minlength=E).tolist()
    xs = x.reshape(-1, d)[order]
    ys = torch.empty(B * T, d, dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = _ffn(xs[start:start + n], w1[e], b1[e], w2[e], b2[e])
        start += n
    g = gf[order, None]
    ys = torch.where(g != 0, ys * g, torch.zeros_like(ys))
    y = torch.empty_like(ys)
    y[order] = ys
    return y.reshape(B, T, d).to(x.dtype)


def cpu_moe_experts(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The op on the CPU (and any device without a kernel): the grouped form."""
    check_experts_args(x, expert, gate, w1, b1, w2, b2)
    y = grouped_moe_experts(*(a.cpu() for a in (x, expert, gate, w1, b1, w2, b2)))
    return y.to(x.device)


def fake_moe_experts(x, expert, gate, w1, b1, w2, b2):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


INPUTS = ("x", "expert", "gate", "w1", "b1", "w2", "b2")


#: the BLOCK_M ``kernels.experts_config`` chooses, and a mean group size (tokens per expert) at
#: which it chooses each
ORT_BLOCK_M = {16: 1, 32: 24, 64: 64, 128: 512}


def _ort_rank_variants(dtype: str) -> dict:
    """The rank kernel for each width of E in ``kernels.ORT_BLOCK_E``."""
    from seqdeploy_moe.kernels import LAYOUT_BLOCK, ORT_BLOCK_E

    return {f"e{e}": ({"BLOCK": LAYOUT_BLOCK, "BLOCK_E": e}, 4) for e in ORT_BLOCK_E}


def _ort_layout_variants(dtype: str) -> dict:
    """The layout kernel for each width of E in ``kernels.ORT_BLOCK_E`` and each BLOCK_M."""
    from seqdeploy_moe.kernels import LAYOUT_BLOCK, LAYOUT_TILES, ORT_BLOCK_E

    return {f"e{e}_m{m}": ({"BLOCK": LAYOUT_BLOCK, "BLOCK_E": e, "BLOCK_M": m,
                            "BLOCK_TILES": LAYOUT_TILES}, 4)
            for e in ORT_BLOCK_E for m in ORT_BLOCK_M}


def _ort_ffn_variants(dtype: str) -> dict:
    """Both layers of the grouped GEMM at each BLOCK_M with the tiles ``kernels.experts_config``
    gives it. One binary per variant, so BLOCK_N and BLOCK_K are not shrunk to a small d or f and
    EVEN_K is off (the kernel masks both); the pipeline depth is Triton's default."""
    from seqdeploy.precision import TORCH_DTYPES
    from seqdeploy_moe.kernels import experts_config

    torch_dtype = TORCH_DTYPES[dtype]
    out = {}
    for block_m, mean in ORT_BLOCK_M.items():
        cfg = experts_config(mean, 1, 4096, 4096, torch_dtype)
        assert cfg["block_m"] == block_m, cfg
        for first in (True, False):
            constexprs = {"BLOCK_M": block_m, "BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"],
                          "FIRST": first, "DOT_F32": dtype == "fp32", "WIDEN": False,
                          "EVEN_K": False}
            name = f"m{block_m}_n{cfg['block_n']}_{'first' if first else 'second'}"
            out[name] = (constexprs, cfg["num_warps"])
    return out


def ort_kernel():
    """The ONNX Runtime kernels (``ort_moe_experts.cc``): a per-token C++ loop, and on CUDA this
    plugin's grouping kernels and grouped GEMMs compiled ahead of time (the grouping kernels read
    only the int64 ids: one dtype, ``i64``)."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    i, ids = "i32", "*i32"
    rank = TritonAOT("moe_rank", "seqdeploy_moe.kernels:_rank_kernel",
                     dict(expert_ptr="*T", counts_ptr=ids, rank_ptr=ids, N=i, E=i),
                     _ort_rank_variants, dtypes=("i64",))
    layout = TritonAOT("moe_layout", "seqdeploy_moe.kernels:_layout_kernel",
                       dict(expert_ptr="*T", rank_ptr=ids, counts_ptr=ids, row_token_ptr=ids,
                            tile_expert_ptr=ids, N=i, E=i, max_tiles=i),
                       _ort_layout_variants, dtypes=("i64",))
    p = "*T"
    ffn = TritonAOT("moe_ffn", "seqdeploy_moe.kernels:_grouped_ffn_kernel",
                    dict(a_ptr=p, row_token_ptr=ids, tile_expert_ptr=ids, w_ptr=p, bias_ptr=p,
                         gate_ptr="*fp32", out_ptr=p, K=i, N=i, E=i, s_a=i, s_we=i, s_wk=i,
                         s_be=i, s_o=i),
                    _ort_ffn_variants)
    return OrtKernel("seqdeploy_moe", ("ort_moe_experts.cc",), "MoEExpertsKernel",
                     (rank, layout, ffn))


def moe_experts_op() -> CustomOp:
    from seqdeploy_moe.onnx import moe_experts_function, moe_experts_translation

    op = define_op("moe_experts", "MoEExperts", cpu_moe_experts, fake_moe_experts,
                   reference_moe_experts, moe_experts_translation, moe_experts_function,
                   INPUTS, ("y",),
                   doc="top-1 experts: grouped GEMMs with fused bias + GELU, gated, scattered back",
                   schema_doc=__doc__.split("\n\n")[0],
                   cuda=("seqdeploy_moe.kernels", "triton_moe_experts"),
                   int_inputs=("expert",), float_inputs=("gate",))
    op.extra["ort"] = ort_kernel()
    return op


MOE_EXPERTS = moe_experts_op()
#: the registered torch op ``torch.ops.seqdeploy.moe_experts`` (CPU: grouped, CUDA: Triton)
moe_experts = MOE_EXPERTS.torch_op
