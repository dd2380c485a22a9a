"""``seqdeploy::eigen_scan``: the complex diagonal recurrence of the Temporal Eigenstate Network.

Layout: ``x_re, x_im [B, T, K]``, ``nu, theta [K]`` (fp32), ``h0_re, h0_im [B, K]``.
Returns ``y_re, y_im [B, T, K]`` in the dtype of ``x_re``; the final state is ``y[:, -1]``.

    h_t = lam * h_{t-1} + x_t,   lam_k = exp(-exp(nu_k)) * (cos theta_k + i sin theta_k)

Forms, side by side: ``naive_eigen_scan`` (float64 loop, tests only), ``reference_eigen_scan``
(fp32 step loop, the ``torch-ref`` engine), ``vectorised_eigen_scan`` (chunked closed form,
the CPU kernel) and the Triton kernel (``kernels.py``, the CUDA kernel).
"""
from __future__ import annotations

import torch

from seqdeploy.ops import CustomOp, define_op

CHUNK = 64  # vectorised CPU form: relative powers lam^(t-s) within one chunk only


def decay(nu: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re lam, Im lam) in fp32; |lam| = exp(-exp(nu)) < 1 by construction."""
    mag = torch.exp(-torch.exp(nu.float()))
    return mag * torch.cos(theta.float()), mag * torch.sin(theta.float())


def naive_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im):
    """Float64 complex step loop, written independently of the kernels. Returns complex128."""
    lam = torch.exp(-torch.exp(nu.double())) * torch.exp(1j * theta.double())
    x = torch.complex(x_re.double(), x_im.double())
    h = torch.complex(h0_re.double(), h0_im.double())
    ys = []
    for t in range(x.shape[1]):
        h = lam * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, dim=1)


def reference_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im):
    """The step loop a user would write: fp32 state, one step per time index."""
    lr, li = decay(nu, theta)
    hr, hi = h0_re.float(), h0_im.float()
    xr, xi = x_re.float(), x_im.float()
    ys_re, ys_im = [], []
    for t in range(x_re.shape[1]):
        hr, hi = lr * hr - li * hi + xr[:, t], lr * hi + li * hr + xi[:, t]
        ys_re.append(hr)
        ys_im.append(hi)
    return (torch.stack(ys_re, 1).to(x_re.dtype), torch.stack(ys_im, 1).to(x_re.dtype))


def vectorised_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im, chunk: int = CHUNK):
    """Chunked closed form: within a chunk y_t = sum_{s<=t} lam^(t-s) x_s + lam^(t+1) h.

    Only relative powers lam^d, 0 <= d <= chunk, are formed (never lam^-t), as one
    [K, C, C] Toeplitz matrix; each chunk is then a batched matmul over K.
    """
    B, T, K = x_re.shape
    C = min(chunk, T)
    mag_log = -torch.exp(nu.float())                      # log|lam|
    d = torch.arange(C + 1, dtype=torch.float32)
    p_mag = torch.exp(d[:, None] * mag_log[None, :])      # [C+1, K]
    p_re = p_mag * torch.cos(d[:, None] * theta.float()[None, :])
    p_im = p_mag * torch.sin(d[:, None] * theta.float()[None, :])
    t_idx = torch.arange(C)
    diff = (t_idx[:, None] - t_idx[None, :])              # t - s
    causal = (diff >= 0)
    diff = diff.clamp(min=0)
    L_re = (p_re[diff] * causal[..., None]).permute(2, 0, 1)   # [K, C, C]
    L_im = (p_im[diff] * causal[..., None]).permute(2, 0, 1)
    hr, hi = h0_re.float(), h0_im.float()
    xr, xi = x_re.float(), x_im.float()
    y_re = torch.empty(B, T, K, dtype=torch.float32)
    y_im = torch.empty(B, T, K, dtype=torch.float32)
    for t0 in range(0, T, C):
        c = min(C, T - t0)
        a = xr[:, t0:t0 + c].permute(2, 1, 0)              # [K, c, B]
        b = xi[:, t0:t0 + c].permute(2, 1, 0)
        Lr, Li = L_re[:, :c, :c], L_im[:, :c, :c]
        yr = torch.bmm(Lr, a) - torch.bmm(Li, b)           # [K, c, B]
        yi = torch.bmm(Lr, b) + torch.bmm(Li, a)
        pr, pi = p_re[1:c + 1].T[:, :, None], p_im[1:c + 1].T[:, :, None]   # [K, c, 1]
        hr_t, hi_t = hr.T[:, None, :], hi.T[:, None, :]                     # [K, 1, B]
        yr = yr + pr * hr_t - pi * hi_t
        yi = yi + pr * hi_t + pi * hr_t
        y_re[:, t0:t0 + c] = yr.permute(2, 1, 0)
        y_im[:, t0:t0 + c] = yi.permute(2, 1, 0)
        hr, hi = y_re[:, t0 + c - 1], y_im[:, t0 + c - 1]
    return y_re.to(x_re.dtype), y_im.to(x_re.dtype)


def cpu_eigen_scan(x_re: torch.Tensor, x_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor,
                   h0_re: torch.Tensor, h0_im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (and any non-CUDA device): the vectorised chunked form."""
    device = x_re.device
    args = [a.cpu() for a in (x_re, x_im, nu, theta, h0_re, h0_im)]
    y_re, y_im = vectorised_eigen_scan(*args)
    return y_re.to(device), y_im.to(device)


def fake_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im):
    return torch.empty_like(x_re, memory_format=torch.contiguous_format), \
        torch.empty_like(x_re, memory_format=torch.contiguous_format)


INPUTS = ("x_re", "x_im", "nu", "theta", "h0_re", "h0_im")
OUTPUTS = ("y_re", "y_im")


def ort_kernel():
    """The ONNX Runtime kernels (``ort_eigen_scan.cc``): a CPU loop, and on CUDA this plugin's
    Triton kernel compiled ahead of time, one tile shape for every input shape."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    p, f, i = "*T", "*fp32", "i32"
    signature = dict(xr_ptr=p, xi_ptr=p, nu_ptr=f, th_ptr=f, h0r_ptr=p, h0i_ptr=p, yr_ptr=p,
                     yi_ptr=p, carry_ptr=f, flag_ptr="*i32", B=i, T=i, K=i, sx_b=i, sx_t=i,
                     sy_b=i, sy_t=i, sh_b=i)
    aot = TritonAOT("eigen_scan", "seqdeploy_ten.kernels:_eigen_scan_kernel", signature,
                    lambda dtype: {"t32k32": ({"BLOCK_T": 32, "BLOCK_K": 32}, 1)})
    return OrtKernel("seqdeploy_ten", ("ort_eigen_scan.cc",), "EigenScanKernel", (aot,))


def trt_aot():
    """TensorRT's AOT form (full TensorRT only): ``kernels._eigen_scan_aot_kernel``, the
    workspace-free rows walk (the chunked CUDA kernel needs carry and flag buffers), one tile
    of ``[min(32, K), 32]`` for every shape; K is the model's width, fixed at build time."""
    from seqdeploy.trt.aot import EntryLaunch, TrtAot, cdiv

    def launch(q):
        import triton

        B, T, K = (q.sizes("x_re", a) for a in range(3))
        block_k = min(32, triton.next_power_of_2(q.sizes.constant("nu", 0)))
        return EntryLaunch(grid=(B * cdiv(K, block_k),), scalars=(B, T, K),
                           constexprs={"BLOCK_T": 32, "BLOCK_K": block_k}, num_warps=1)

    def output_shapes(sizes):
        shape = tuple(sizes("x_re", a) for a in range(3))
        return shape, shape

    return TrtAot("seqdeploy_ten.kernels:_eigen_scan_aot_kernel", ("B", "T", "K"), launch,
                  output_shapes)


def eigen_scan_op() -> CustomOp:
    from seqdeploy_ten.onnx import eigen_scan_function, eigen_scan_translation

    op = define_op("eigen_scan", "EigenScan", cpu_eigen_scan, fake_eigen_scan,
                   reference_eigen_scan, eigen_scan_translation, eigen_scan_function,
                   INPUTS, OUTPUTS, doc="complex diagonal recurrence h_t = lam h_{t-1} + x_t",
                   schema_doc=__doc__.split("\n\n")[0],
                   cuda=("seqdeploy_ten.kernels", "triton_eigen_scan"),
                   float_inputs=("nu", "theta"), trt_aot=trt_aot())
    op.extra["ort"] = ort_kernel()
    return op


EIGEN_SCAN = eigen_scan_op()
#: the registered torch op ``torch.ops.seqdeploy.eigen_scan`` (CPU: vectorised, CUDA: Triton)
eigen_scan = EIGEN_SCAN.torch_op
