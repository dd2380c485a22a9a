"""``seqdeploy::cfc_scan``: the closed-form continuous-time (liquid) recurrence of ``cfc``.

Layout: ``xw [B, T, H]`` (the input projection ``x W_in + b``, hoisted over all steps),
``h0 [B, H]``, ``w_rec [H, H]``, ``tau [H]`` (fp32, > 0) and the float attribute ``dt``.
Returns ``y [B, T, H]`` in the dtype of ``xw``; the final state is ``y[:, -1]``.

    h_t = alpha * h_{t-1} + (1 - alpha) * tanh(xw_t + h_{t-1} w_rec),   alpha = exp(-dt / tau)

The recurrence is nonlinear in ``h``, so it is strictly sequential in T: there is no parallel
or chunked form. Forms, side by side: ``naive_cfc_scan`` (float64 loop, tests only),
``reference_cfc_scan`` (the step loop a user writes: the ``torch-ref`` engine),
``cpu_cfc_scan`` (the same loop with one fused GEMM per step into a preallocated output: the
CPU kernel) and the Triton kernels (the CUDA kernel: all T steps in one launch), one design
per file, chosen by ``kernels.choose``: ``rows.py`` (a program per 16 batch rows),
``split.py`` (the columns spread over a thread-block cluster; or one step over independent
programs) and ``wgmma.py`` (the cluster split for Hopper in Gluon).
"""
from __future__ import annotations

import torch

from seqdeploy.ops import CustomOp, lazy_kernel, make_schema, register_schema


def decay(tau: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, 1 - alpha)`` in fp32, ``[H]`` each. ``1 - alpha`` comes from ``expm1``: for
    ``tau >> dt`` it is tiny, and ``1 - exp(...)`` would lose its leading digits."""
    rate = -dt / tau.float()
    return torch.exp(rate), -torch.expm1(rate)


def naive_cfc_scan(xw, h0, w_rec, tau, dt: float) -> torch.Tensor:
    """Float64 step loop, written independently of the other forms. Returns float64
    ``[B, T, H]``."""
    alpha = torch.exp(-dt / tau.double())
    w = w_rec.double()
    h = h0.double()
    ys = []
    for t in range(xw.shape[1]):
        h = alpha * h + (1.0 - alpha) * torch.tanh(xw[:, t].double() + h @ w)
        ys.append(h)
    return torch.stack(ys, dim=1)


def reference_cfc_scan(xw, h0, w_rec, tau, dt: float) -> torch.Tensor:
    """The step loop a user would write: fp32 state, one matmul per time index."""
    alpha, gain = decay(tau, dt)
    w, h, x = w_rec.float(), h0.float(), xw.float()
    ys = []
    for t in range(x.shape[1]):
        h = alpha * h + gain * torch.tanh(x[:, t] + h @ w)
        ys.append(h)
    return torch.stack(ys, 1).to(xw.dtype)


def cpu_cfc_scan(xw, h0, w_rec, tau, dt: float) -> torch.Tensor:
    """The step loop with no per-step allocation: ``addmm`` fuses ``xw_t + h w_rec``, and
    each new state is written straight into a time-major fp32 output buffer."""
    B, T, H = xw.shape
    alpha, gain = decay(tau, dt)
    w, x = w_rec.float(), xw.float()
    y = torch.empty(T, B, H, dtype=torch.float32, device=xw.device)   # y[t] is contiguous
    z = torch.empty(B, H, dtype=torch.float32, device=xw.device)
    h = h0.float()
    for t in range(T):
        torch.addmm(x[:, t], h, w, out=z)
        z.tanh_()
        torch.mul(h, alpha, out=y[t])
        y[t].addcmul_(z, gain)
        h = y[t]
    return y.transpose(0, 1).to(xw.dtype).contiguous()


@torch.library.custom_op("seqdeploy::cfc_scan", mutates_args=())
def cfc_scan(xw: torch.Tensor, h0: torch.Tensor, w_rec: torch.Tensor, tau: torch.Tensor,
             dt: float) -> torch.Tensor:
    """``y [B, T, H]`` from ``xw [B, T, H]``, ``h0 [B, H]``, ``w_rec [H, H]`` (one dtype: fp32,
    fp16 or bf16), ``tau [H]`` fp32 and ``dt``. On CUDA, a Triton kernel design that
    ``seqdeploy_cfc.kernels.choose`` picks from the shapes, dtype and GPU: ``rows``
    (``rows.py``), ``split`` (``split.py``) or ``wgmma`` (``wgmma.py``). Here (CPU and any
    other device): the allocation-free step loop ``cpu_cfc_scan``."""
    device = xw.device
    y = cpu_cfc_scan(*(a.cpu() for a in (xw, h0, w_rec, tau)), dt)
    return y.to(device)


@cfc_scan.register_fake
def _(xw, h0, w_rec, tau, dt):
    return torch.empty_like(xw, memory_format=torch.contiguous_format)


#: CUDA: the Triton kernel (imported on first use: CPU-only runs never load it)
cuda_cfc_scan = lazy_kernel("seqdeploy_cfc.kernels", "triton_cfc_scan")
cfc_scan.register_kernel("cuda")(cuda_cfc_scan)


INPUTS = ("xw", "h0", "w_rec", "tau")
OUTPUTS = ("y",)


def _ort_rows_variants(dtype: str) -> dict:
    """The rows kernel's tilings for each ``BLOCK_H`` up to 512 (fp32: 256), as the dispatch
    plans them on a GPU without cluster launches (fast tanh for fp16). fp32 at 512 is left
    out: its unrolled fp32 dot took Triton over 5 minutes to lower on the CI machine."""
    from seqdeploy.precision import TORCH_DTYPES
    from seqdeploy_cfc.kernels import Gpu, choose

    no_clusters = Gpu(sms=108, capability=(8, 0), clusters=False, wgmma=False)
    names = ("BLOCK_B", "BLOCK_H", "BLOCK_K", "W_RESIDENT", "DOT_F32", "SERIES_BELOW", "FAST_TANH")
    variants = {}
    for block_h in (16, 32, 64, 128, 256) + ((512,) if dtype != "fp32" else ()):
        plan = choose(16, 2, block_h, TORCH_DTYPES[dtype], no_clusters)
        assert plan.design == "rows", plan
        variants[f"h{block_h}"] = (dict(zip(names, plan.constexprs(block_h))), plan.num_warps)
    return variants


#: the GPU the ORT library's cluster kernels are planned for: compute capability 9.0 with
#: cluster launches and no Gluon (the wgmma design is not compiled ahead of time)
ORT_CLUSTER_GPU = (9, 0)


def _ort_split_variants(dtype: str) -> dict:
    """The cluster ``split`` kernel's tiling in fp16 at ``BLOCK_H`` 256 (H of 129 to 256), as
    the dispatch plans it for several steps on an sm_90 without the wgmma design: 8 programs
    of 32 columns per 16 batch rows. The variant name carries ``BLOCK_N``, which sets the
    cluster size (``ort_cfc_scan.cc`` derives both from H with the same rule). Only this tiling
    is compiled: without the torch launcher's divisibility specialisation (an AOT kernel keeps
    every stride a plain parameter) ptxas spills the fp32 tile at 256 and the fp16 tile at 512
    (sm_90, Triton 3.6 and 3.9), so those widths keep the rows kernel."""
    from seqdeploy.precision import TORCH_DTYPES
    from seqdeploy_cfc.kernels import Gpu, choose

    gpu = Gpu(sms=132, capability=ORT_CLUSTER_GPU, clusters=True, wgmma=False)
    names = ("BLOCK_B", "BLOCK_H", "BLOCK_N", "BLOCK_K", "W_RESIDENT", "DOT_F32", "SERIES_BELOW",
             "FAST_TANH", "CLUSTER")
    plan = choose(16, 2, 256, TORCH_DTYPES[dtype], gpu)
    assert plan.design == "split" and plan.cluster, plan
    return {f"h256_n{plan.block_n}": (dict(zip(names, plan.constexprs(256))), plan.num_warps)}


def ort_kernel():
    """The ONNX Runtime kernels (``ort_cfc_scan.cc``): a CPU loop, and on CUDA this plugin's
    Triton kernels compiled ahead of time: the rows kernel (a plain grid launch, sm_80 on), and
    on sm_90 for several steps in fp16 at H of 129 to 256 the cluster split kernel (cluster
    launches through the driver)."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    p, i = "*T", "i32"
    signature = dict(xw_ptr=p, h0_ptr=p, w_ptr=p, tau_ptr="*fp32", y_ptr=p, dt="fp32", B=i, T=i,
                     H=i, sx_b=i, sx_t=i, sh_b=i, sw_k=i, sy_b=i, sy_t=i)
    rows = TritonAOT("cfc_scan", "seqdeploy_cfc.kernels:_cfc_scan_kernel", signature,
                     _ort_rows_variants)
    split = TritonAOT("cfc_split", "seqdeploy_cfc.split:_cfc_split_kernel", signature,
                      _ort_split_variants, dtypes=("fp16",),
                      archs=(ORT_CLUSTER_GPU[0] * 10 + ORT_CLUSTER_GPU[1],))
    return OrtKernel("seqdeploy_cfc", ("ort_cfc_scan.cc",), "CfcScanKernel", (rows, split))


def trt_aot():
    """TensorRT's AOT form (full TensorRT only): ``kernels._cfc_scan_aot_kernel``, the rows
    design tiled as :func:`seqdeploy_cfc.kernels.choose` tiles it on a GPU without cluster
    launches (the split and wgmma designs launch clusters, which TensorRT's AOT launch cannot);
    H is the model's width, fixed at build time, and ``dt`` travels as its fp32 bits."""
    from seqdeploy.trt.aot import EntryLaunch, TrtAot, cdiv, fp32_bits

    def launch(q):
        from seqdeploy_cfc.kernels import Gpu, choose

        B, T, H = (q.sizes("xw", a) for a in range(3))
        gpu = None if q.capability is None else Gpu(1, q.capability, clusters=False, wgmma=False)
        plan = choose(16, 2, q.sizes.constant("w_rec", 0), q.torch_dtype, gpu)
        assert plan.design == "rows", plan
        names = ("BLOCK_B", "BLOCK_H", "BLOCK_K", "W_RESIDENT", "DOT_F32", "SERIES_BELOW",
                 "FAST_TANH")
        return EntryLaunch(grid=(cdiv(B, plan.block_b),),
                           scalars=(fp32_bits(q.attributes["dt"]), B, T, H),
                           constexprs=dict(zip(names, plan.constexprs(plan.block_h))),
                           num_warps=plan.num_warps)

    def output_shapes(sizes):
        return (tuple(sizes("xw", a) for a in range(3)),)

    return TrtAot("seqdeploy_cfc.kernels:_cfc_scan_aot_kernel", ("dt_bits", "B", "T", "H"),
                  launch, output_shapes)


def cfc_scan_op() -> CustomOp:
    from seqdeploy_cfc.onnx import cfc_scan_function, cfc_scan_translation

    schema = make_schema("CfCScan", INPUTS, OUTPUTS, doc=__doc__.split("\n\n")[0],
                         float_attrs=("dt",), float_inputs=("tau",))
    register_schema(schema)
    return CustomOp(name="cfc_scan", onnx_name="CfCScan", torch_op=cfc_scan,
                    reference=reference_cfc_scan, schema=schema,
                    translation=cfc_scan_translation, fallback=cfc_scan_function,
                    doc="liquid recurrence h_t = a h_{t-1} + (1-a) tanh(xw_t + h_{t-1} W)",
                    eager={"cuda": cuda_cfc_scan}, extra={"ort": ort_kernel()},
                    trt_aot=trt_aot())
