"""``seqdeploy::top1_router``: the Switch top-1 router with per-row first-come capacity.

Layout: ``logits [B, T, E]`` float32 (the router is an fp32 island in every precision) and the
float attribute ``capacity_factor``. Returns ``expert [B, T] int64`` and ``gate [B, T]``
float32::

    p = softmax(logits)            (fp32)
    expert_t = argmax_e logits_t   (= argmax p; among equal logits the lowest index wins)
    gate_t = p[expert_t]           (= 1 / sum_e exp(logits_e - max))
    cap = ceil(capacity_factor * T / E)      (capacity_factor > 0; else no dropping)

Capacity is per sequence row, first come first served in token order: the k-th token of a
row routed to expert e (k = 1, 2, ...) keeps its gate when ``k <= cap`` and gets gate 0
otherwise. A dropped token keeps its argmax id in ``expert`` (so the route an engine reports
is the router's choice, comparable across engines), and ``moe_experts`` writes 0 for every
token whose gate is 0: only the residual passes through, as the Switch Transformer does.

``cap`` is computed the same way in every form, in fp32 (the ONNX attribute's type):
``ceil(fp32(fp32(cf) * T) / E)``. Rounding the product to fp32 absorbs the representation
error of a decimal ``cf``: 0.8 * 5 / 2 gives 2 (in float64 on fp32(0.8) it would give 3).

Forms, side by side: ``naive_top1_router`` (float64 loop, tests only), ``reference_top1_router``
(the loop a user would write, fp32: the ``torch-ref`` engine), ``vectorised_top1_router`` (the
CPU kernel), the Triton kernel (``kernels.triton_top1_router``, CUDA) and the ONNX forms
(``onnx.top1_router_translation`` / ``onnx.top1_router_function``), and the ONNX Runtime
kernels (``ort_top1_router.cc``: a C++ loop, and the Triton kernel compiled ahead of time).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from seqdeploy.errors import InputError
from seqdeploy.ops import CustomOp, define_op, eager_device, in_reference_mode, lazy_kernel


_triton_router_logits = lazy_kernel("seqdeploy_moe.kernels", "triton_router_logits")
#: largest E the projection kernel takes (one tile of the weight's columns per program)
LOGITS_MAX_E = 256


def router_logits(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's fp32 logits ``[..., E]`` of ``u [..., d]`` and ``weight [E, d]``: what
    ``F.linear(u.float(), weight.float())`` computes, and that is the form everywhere but
    plain eager inference on CUDA with ``u`` in fp16 or bf16 (so the exported graph holds a
    Cast and an fp32 MatMul). There a Triton kernel widens ``u`` as it loads it instead of
    writing an fp32 copy (``kernels.triton_router_logits``: products to about 2^-21
    relative instead of fp32's 2^-24, summed in fp32), so a near-tie may route differently
    from the fp32 GEMM, as it may between any two fp32 GEMMs that sum in another order."""
    if _kernel_applies(u, weight):
        return _triton_router_logits(u, weight)
    return torch.nn.functional.linear(u.float(), weight.float())


def _kernel_applies(u: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the projection kernel takes ``u`` and ``weight``: fp16 / bf16 ``u``, at most
    ``LOGITS_MAX_E`` experts, plain eager inference on CUDA."""
    return (u.dtype in (torch.float16, torch.bfloat16) and weight.shape[0] <= LOGITS_MAX_E
            and eager_device(u, weight) == "cuda")


def route_top1(u: torch.Tensor, weight: torch.Tensor):
    """``(logits, expert, gate)`` of the router without capacity: ``router_logits(u, weight)``
    then ``TOP1_ROUTER(logits, 0.0)``. In plain eager inference on CUDA with fp16 / bf16
    ``u`` (where :func:`router_logits` takes its kernel) one launch computes all three from
    the same fp32 tile (``kernels.triton_router_logits(..., route=True)``; not under
    ``seqdeploy.ops.reference_ops``, where the router runs its reference): the same logits
    and experts as the two steps, the gate to rounding, without a second launch and the
    re-read of the logits."""
    if not in_reference_mode() and _kernel_applies(u, weight):
        return _triton_router_logits(u, weight, route=True)
    logits = router_logits(u, weight)
    return (logits, *TOP1_ROUTER(logits, 0.0))


def capacity(capacity_factor: float, T: int, E: int) -> int:
    """Tokens each expert accepts per row; ``T`` (no dropping) when ``capacity_factor <= 0``."""
    cf = np.float32(capacity_factor)
    if cf <= 0:
        return T
    return int(np.ceil((cf * np.float32(T)) / np.float32(E)))


def check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[-1] < 1:
        raise InputError(f"top1_router: logits must be [B, T, E] with E >= 1, got {list(logits.shape)}")
    if logits.dtype != torch.float32:
        raise InputError(f"top1_router: logits must be float32 (the router is fp32), got {logits.dtype}")


def naive_top1_router(logits: torch.Tensor, capacity_factor: float):
    """Float64 loop over rows and tokens, written independently of the kernels.
    Returns ``(expert int64 [B, T], gate float64 [B, T])``."""
    B, T, E = logits.shape
    f32 = np.float32                               # the attribute is an fp32 in ONNX
    cf = f32(capacity_factor)
    cap = int(np.ceil(f32(cf * f32(T)) / f32(E))) if cf > 0 else T + 1
    lg = logits.double().cpu()
    expert = torch.zeros(B, T, dtype=torch.int64)
    gate = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        taken = [0] * E
        for t in range(T):
            row = lg[b, t].tolist()
            best = 0
            for e in range(1, E):
                if row[e] > row[best]:      # strict: the lowest index wins ties
                    best = e
            m = row[best]
            total = sum(math.exp(v - m) for v in row)
            taken[best] += 1
            expert[b, t] = best
            gate[b, t] = (1.0 / total) if taken[best] <= cap else 0.0
    return expert, gate


def reference_top1_router(logits: torch.Tensor, capacity_factor: float):
    """The loop a user would write: softmax and argmax in fp32, capacity token by token."""
    check_logits(logits)
    B, T, E = logits.shape
    cap = capacity(capacity_factor, T, E)
    p = torch.softmax(logits.float(), dim=-1)
    gate, expert = p.max(dim=-1)            # torch returns the first maximal index
    if cap >= T:
        return expert, gate
    taken = torch.zeros(B, E, dtype=torch.int64, device=logits.device)
    rows = torch.arange(B, device=logits.device)
    keep = []
    for t in range(T):
        taken[rows, expert[:, t]] += 1
        keep.append(taken[rows, expert[:, t]] <= cap)
    return expert, torch.where(torch.stack(keep, 1), gate, torch.zeros_like(gate))


def vectorised_top1_router(logits: torch.Tensor, capacity_factor: float):
    """CPU kernel: one pass of tensor ops; the capacity prefix count is a cumsum of the one-hot
    choices along T (``[B, T, E]`` int32)."""
    B, T, E = logits.shape
    lg = logits.float()
    m = lg.max(dim=-1, keepdim=True).values
    expert = (lg == m).to(torch.int8).argmax(dim=-1)        # first maximal index
    gate = 1.0 / torch.exp(lg - m).sum(dim=-1)
    cap = capacity(capacity_factor, T, E)
    if cap < T:
        one_hot = torch.nn.functional.one_hot(expert, E).to(torch.int32)
        position = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1)   # 1-based rank in its expert
        gate = torch.where(position <= cap, gate, torch.zeros_like(gate))
    return expert, gate


def cpu_top1_router(logits: torch.Tensor, capacity_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on the CPU (and any device without a kernel): the vectorised form."""
    check_logits(logits)
    expert, gate = vectorised_top1_router(logits.cpu(), capacity_factor)
    return expert.to(logits.device), gate.to(logits.device)


def fake_top1_router(logits, capacity_factor):
    B, T, _ = logits.shape
    return (logits.new_empty((B, T), dtype=torch.int64), logits.new_empty((B, T), dtype=torch.float32))


def _ort_router_variants(dtype: str) -> dict:
    """The fused router for each width of E in ``kernels.ORT_BLOCK_E``, tiled as
    ``kernels.router_config`` tiles a long row, with and without capacity."""
    from seqdeploy_moe.kernels import ORT_BLOCK_E, router_config

    variants = {}
    for width in ORT_BLOCK_E:
        block_t, block_e, warps = router_config(4096, width)
        for capacity in (False, True):
            name = f"e{block_e}_t{block_t}_{'cap' if capacity else 'all'}"
            variants[name] = ({"BLOCK_T": block_t, "BLOCK_E": block_e, "CAPACITY": capacity}, warps)
    return variants


def ort_kernel():
    """The ONNX Runtime kernels (``ort_top1_router.cc``): a CPU loop, and on CUDA this plugin's
    fused Triton router compiled ahead of time (fp32 only: the router is fp32 in every graph)."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    i = "i32"
    signature = dict(logits_ptr="*T", expert_ptr="*i64", gate_ptr="*fp32", T=i, E=i, cap=i,
                     s_b=i, s_t=i)
    aot = TritonAOT("top1_router", "seqdeploy_moe.kernels:_top1_router_kernel", signature,
                    _ort_router_variants, dtypes=("fp32",))
    return OrtKernel("seqdeploy_moe", ("ort_top1_router.cc",), "Top1RouterKernel", (aot,))


def trt_aot():
    """TensorRT's AOT form (full TensorRT only): ``kernels._top1_router_aot_kernel``, tiled
    as ``kernels.router_config`` tiles a long row for the model's E (fixed at build time).
    With a positive ``capacity_factor`` one program walks each row in token order (grid
    ``(B, 1)``; whether tokens are dropped depends on T, known only at run time, and the
    capacity path is exact either way); without, a program per tile of tokens."""
    from seqdeploy.trt.aot import EntryLaunch, TrtAot, cdiv, fp32_bits

    def launch(q):
        from seqdeploy_moe.kernels import router_config

        B, T, E = (q.sizes("logits", a) for a in range(3))
        block_t, block_e, warps = router_config(4096, q.sizes.constant("logits", 2))
        cf = float(np.float32(q.attributes["capacity_factor"]))
        dropping = cf > 0
        return EntryLaunch(grid=(B, 1) if dropping else (B, cdiv(T, block_t)),
                           scalars=(fp32_bits(cf) if dropping else 0, T, E),
                           constexprs={"BLOCK_T": block_t, "BLOCK_E": block_e,
                                       "CAPACITY": dropping},
                           num_warps=warps)

    def output_shapes(sizes):
        shape = (sizes("logits", 0), sizes("logits", 1))
        return shape, shape

    return TrtAot("seqdeploy_moe.kernels:_top1_router_aot_kernel", ("cf_bits", "T", "E"),
                  launch, output_shapes, dtypes=("fp32",))


def top1_router_op() -> CustomOp:
    from seqdeploy_moe.onnx import top1_router_function, top1_router_translation

    op = define_op("top1_router", "Top1Router", cpu_top1_router, fake_top1_router,
                   reference_top1_router, top1_router_translation, top1_router_function,
                   ("logits",), ("expert", "gate"),
                   doc="Switch top-1 router: fp32 softmax, argmax, gate, per-row capacity",
                   schema_doc=__doc__.split("\n\n")[0],
                   cuda=("seqdeploy_moe.kernels", "triton_top1_router"),
                   float_attrs=("capacity_factor",), float_inputs=("logits",),
                   int_outputs=("expert",), float_outputs=("gate",), trt_aot=trt_aot())
    op.extra["ort"] = ort_kernel()
    return op


TOP1_ROUTER = top1_router_op()
#: the registered torch op ``torch.ops.seqdeploy.top1_router`` (CPU: vectorised, CUDA: Triton)
top1_router = TOP1_ROUTER.torch_op
