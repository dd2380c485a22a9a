"""Triton kernel for ``eigen_scan``: one pass over HBM, chunked associative scan over T.

Each program owns one batch row and ``BLOCK_K`` channels and walks T in chunks of
``BLOCK_T``. Within a chunk, ``tl.associative_scan`` composes the affine maps
``h -> a h + b`` (complex); the cumulative ``a`` is the relative power ``lam^(t+1)`` of the
chunk (never ``lam^-t``), and the state carried between chunks is fp32. ``x`` is read once
and ``y`` written once: the memory roofline is 4 tensors of B*T*K elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(a_re, a_im, b_re, b_im, c_re, c_im, d_re, d_im):
    # apply (a, b) first, then (c, d):  h -> c (a h + b) + d
    return (c_re * a_re - c_im * a_im, c_re * a_im + c_im * a_re,
            c_re * b_re - c_im * b_im + d_re, c_re * b_im + c_im * b_re + d_im)


@triton.jit
def _eigen_scan_kernel(xr_ptr, xi_ptr, nu_ptr, th_ptr, h0r_ptr, h0i_ptr, yr_ptr, yi_ptr,
                       T, K, sx_b, sx_t, sy_b, sy_t, sh_b,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    nu = tl.load(nu_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    th = tl.load(th_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    mag = tl.exp(-tl.exp(nu))
    lam_re = mag * tl.cos(th)
    lam_im = mag * tl.sin(th)
    h_re = tl.load(h0r_ptr + pid_b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    h_im = tl.load(h0i_ptr + pid_b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    a_re = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32) + lam_re[None, :]
    a_im = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32) + lam_im[None, :]
    last = (offs_t == BLOCK_T - 1)[:, None]
    x_base_r = xr_ptr + pid_b * sx_b + offs_k[None, :]
    x_base_i = xi_ptr + pid_b * sx_b + offs_k[None, :]
    y_base_r = yr_ptr + pid_b * sy_b + offs_k[None, :]
    y_base_i = yi_ptr + pid_b * sy_b + offs_k[None, :]
    for t0 in tl.range(0, T, BLOCK_T):
        tt = t0 + offs_t
        mask = (tt < T)[:, None] & mask_k[None, :]
        x_re = tl.load(x_base_r + tt[:, None] * sx_t, mask=mask, other=0.0).to(tl.float32)
        x_im = tl.load(x_base_i + tt[:, None] * sx_t, mask=mask, other=0.0).to(tl.float32)
        p_re, p_im, s_re, s_im = tl.associative_scan((a_re, a_im, x_re, x_im), 0, _compose)
        y_re = s_re + p_re * h_re[None, :] - p_im * h_im[None, :]
        y_im = s_im + p_re * h_im[None, :] + p_im * h_re[None, :]
        tl.store(y_base_r + tt[:, None] * sy_t, y_re.to(yr_ptr.dtype.element_ty), mask=mask)
        tl.store(y_base_i + tt[:, None] * sy_t, y_im.to(yi_ptr.dtype.element_ty), mask=mask)
        # carry the state at the chunk's last row (only a partial last chunk differs, and
        # nothing is carried past it)
        h_re = tl.sum(tl.where(last, y_re, 0.0), axis=0)
        h_im = tl.sum(tl.where(last, y_im, 0.0), axis=0)


def launch_config(B: int, T: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps): narrow K blocks when B*K alone cannot fill the GPU."""
    block_k = min(32, triton.next_power_of_2(K))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while block_k > 8 and B * triton.cdiv(K, block_k) < 2 * sms:
            block_k //= 2
    block_t = 64 if T >= 64 else max(16, triton.next_power_of_2(T))
    return block_t, block_k, 4


def triton_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im, out=None, block_t=None, block_k=None,
                      num_warps=None):
    """Launch the kernel. ``x_*`` may be strided views with a unit stride over K (e.g. halves
    of one [B, T, 2K] projection). ``out``: optional preallocated ``(y_re, y_im)``."""
    B, T, K = x_re.shape
    if x_re.stride(2) != 1 or x_im.stride(2) != 1 or x_re.stride()[:2] != x_im.stride()[:2]:
        x_re, x_im = x_re.contiguous(), x_im.contiguous()
    nu, theta = nu.contiguous(), theta.contiguous()
    h0_re, h0_im = h0_re.contiguous(), h0_im.contiguous()
    if out is None:
        out = (torch.empty(B, T, K, dtype=x_re.dtype, device=x_re.device),
               torch.empty(B, T, K, dtype=x_re.dtype, device=x_re.device))
    y_re, y_im = out
    bt, bk, nw = launch_config(B, T, K, x_re.device)
    bt, bk, nw = block_t or bt, block_k or bk, num_warps or nw
    grid = (B, triton.cdiv(K, bk))
    _eigen_scan_kernel[grid](x_re, x_im, nu, theta, h0_re, h0_im, y_re, y_im,
                             T, K, x_re.stride(0), x_re.stride(1), y_re.stride(0), y_re.stride(1),
                             h0_re.stride(0), BLOCK_T=bt, BLOCK_K=bk, num_warps=nw)
    return y_re, y_im
