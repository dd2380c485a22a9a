"""Triton kernel for ``eigen_scan``: chunk-parallel, one pass over HBM.

The grid is (chunk of T, batch row, block of K), chunk-major. Each program owns
``BLOCK_T`` steps of ``BLOCK_K`` channels and runs in three steps:

1. the chunk's end state from a zero start, ``S = sum_s lam^(BLOCK_T-1-s) x_s``, as an
   unrolled register loop over its rows (only relative powers of lam; never ``lam^-t``);
2. a chained look-back: wait until the previous chunk has published its end state ``h``
   (the first chunk takes ``h0``), then publish ``S + lam^BLOCK_T h`` for the next one;
3. the recurrence again from ``h``, writing ``y``. Its second read of the chunk's ``x`` hits
   cache, so HBM traffic stays at one read of ``x`` and one write of ``y``.

State and arithmetic are fp32 whatever the input dtype. A chunk only waits on a program with
a smaller id, which the hardware (and the interpreter, which runs ids in order) has already
started, so the chain cannot deadlock.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _eigen_scan_kernel(xr_ptr, xi_ptr, nu_ptr, th_ptr, h0r_ptr, h0i_ptr, yr_ptr, yi_ptr,
                       carry_ptr, flag_ptr, B, T, K, sx_b, sx_t, sy_b, sy_t, sh_b,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    n_slots = B * n_kb
    chunk = pid // n_slots
    slot = pid % n_slots
    b = (slot // n_kb).to(tl.int64)
    offs_k = (slot % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rate = tl.exp(tl.load(nu_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    th = tl.load(th_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    mag = tl.exp(-rate)
    lam_re = mag * tl.cos(th)
    lam_im = mag * tl.sin(th)
    t0 = chunk * BLOCK_T
    zero_k = tl.zeros((BLOCK_K,), dtype=tl.int32)   # row masks as vectors (interpreter-safe)
    x_r = xr_ptr + b * sx_b + t0.to(tl.int64) * sx_t + offs_k
    x_i = xi_ptr + b * sx_b + t0.to(tl.int64) * sx_t + offs_k

    # 1. end state of the chunk from a zero start
    s_re = tl.zeros((BLOCK_K,), dtype=tl.float32)
    s_im = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in tl.static_range(BLOCK_T):
        m = mask_k & (zero_k + i < T - t0)
        xr = tl.load(x_r + i * sx_t, mask=m, other=0.0).to(tl.float32)
        xi = tl.load(x_i + i * sx_t, mask=m, other=0.0).to(tl.float32)
        s_re, s_im = lam_re * s_re - lam_im * s_im + xr, lam_re * s_im + lam_im * s_re + xi

    # 2. chained look-back for the state entering the chunk
    state = b * K + offs_k
    if chunk == 0:
        h_re = tl.load(h0r_ptr + b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        h_im = tl.load(h0i_ptr + b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        flag_prev = flag_ptr + (chunk - 1) * n_slots + slot
        ready = tl.atomic_add(flag_prev, 0, sem="acquire")
        while ready == 0:
            ready = tl.atomic_add(flag_prev, 0, sem="acquire")
        prev = carry_ptr + (chunk - 1).to(tl.int64) * 2 * B * K
        h_re = tl.load(prev + state, mask=mask_k, other=0.0, volatile=True)
        h_im = tl.load(prev + B * K + state, mask=mask_k, other=0.0, volatile=True)
    if t0 + BLOCK_T < T:
        # lam^BLOCK_T, a relative power, straight from nu and theta
        pmag = tl.exp(-rate * BLOCK_T)
        p_re = pmag * tl.cos(th * BLOCK_T)
        p_im = pmag * tl.sin(th * BLOCK_T)
        mine = carry_ptr + chunk.to(tl.int64) * 2 * B * K
        tl.store(mine + state, s_re + p_re * h_re - p_im * h_im, mask=mask_k)
        tl.store(mine + B * K + state, s_im + p_re * h_im + p_im * h_re, mask=mask_k)
        tl.debug_barrier()   # every thread's carry is stored before the flag is raised
        tl.atomic_xchg(flag_ptr + chunk * n_slots + slot, 1, sem="release")

    # 3. the recurrence from the true entering state; x comes from cache this time
    y_r = yr_ptr + b * sy_b + t0.to(tl.int64) * sy_t + offs_k
    y_i = yi_ptr + b * sy_b + t0.to(tl.int64) * sy_t + offs_k
    for i in tl.static_range(BLOCK_T):
        m = mask_k & (zero_k + i < T - t0)
        xr = tl.load(x_r + i * sx_t, mask=m, other=0.0).to(tl.float32)
        xi = tl.load(x_i + i * sx_t, mask=m, other=0.0).to(tl.float32)
        h_re, h_im = lam_re * h_re - lam_im * h_im + xr, lam_re * h_im + lam_im * h_re + xi
        tl.store(y_r + i * sy_t, h_re.to(yr_ptr.dtype.element_ty), mask=m)
        tl.store(y_i + i * sy_t, h_im.to(yi_ptr.dtype.element_ty), mask=m)


def launch_config(B: int, T: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps), tuned on an H200 (benchmarks/eigen_scan.py --sweep)."""
    block_k = min(64, triton.next_power_of_2(K))
    block_t = 32 if T >= 32 else triton.next_power_of_2(T)
    return block_t, block_k, 1


def triton_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im, out=None, block_t=None, block_k=None,
                      num_warps=None):
    """Launch the kernel. ``x_*`` may be strided views with unit stride over K (e.g. halves
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
    n_chunks = triton.cdiv(T, bt)
    n_slots = B * triton.cdiv(K, bk)
    carry = torch.empty(max(n_chunks - 1, 1) * 2 * B * K, dtype=torch.float32, device=x_re.device)
    flags = torch.zeros(max(n_chunks - 1, 1) * n_slots, dtype=torch.int32, device=x_re.device)
    _eigen_scan_kernel[(n_chunks * n_slots,)](
        x_re, x_im, nu, theta, h0_re, h0_im, y_re, y_im, carry, flags, B, T, K,
        x_re.stride(0), x_re.stride(1), y_re.stride(0), y_re.stride(1), h0_re.stride(0),
        BLOCK_T=bt, BLOCK_K=bk, num_warps=nw)
    return y_re, y_im
