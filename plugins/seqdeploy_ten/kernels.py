"""Triton kernel for ``eigen_scan``: chunk-parallel, one pass over HBM.

The grid is (chunk of T, batch row, block of K), chunk-major. Each program owns a
``[BLOCK_K, BLOCK_T]`` tile (T is the inner axis, held in each thread's registers):

1. it loads the tile once and scans it from a zero state with ``tl.associative_scan``,
   composing the affine maps ``h -> lam h + x``; the cumulative ``lam^(t+1)`` is a power
   relative to the chunk (never ``lam^-t``);
2. a decoupled look-back gives the state entering the chunk: publish the chunk's aggregate
   at once, then walk back over earlier chunks, combining their aggregates with relative
   powers of ``lam^BLOCK_T``, until one has published its inclusive end state (the first
   chunk starts from ``h0``); then publish this chunk's inclusive end state;
3. ``y = local scan + lam^(t+1) h`` is written once.

HBM traffic is one read of ``x`` and one write of ``y``; no ``T*K*K`` intermediate exists.
State and arithmetic are fp32 whatever the input dtype. A chunk only waits on programs with
smaller ids, which the hardware (and the interpreter, which runs ids in order) has already
started, so the look-back cannot deadlock.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher


@triton.jit
def _look_back(carry_ptr, flag_ptr, h0r_ptr, h0i_ptr, s_re, s_im, p_re, p_im, chunk, slot,
               n_slots, b, offs_k, mask_k, B, K, sh_b, publish, BLOCK_K: tl.constexpr):
    """The state entering ``chunk``, by decoupled look-back. Publishes this chunk's aggregate
    ``s`` at once (flag 1) and its inclusive end state ``s + p h`` (flag 2) when known, where
    ``p = lam^BLOCK_T``. Walking back, aggregates are combined with growing relative powers
    of ``p`` until a predecessor with an inclusive state is found. Per chunk, the carry buffer
    holds four planes: aggregate re/im, inclusive re/im."""
    state = b * K + offs_k
    plane = B * K
    mine = carry_ptr + chunk.to(tl.int64) * 4 * plane
    my_flag = flag_ptr + chunk * n_slots + slot
    if chunk == 0:
        h_re = tl.load(h0r_ptr + b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        h_im = tl.load(h0i_ptr + b * sh_b + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        if publish:
            tl.store(mine + state, s_re, mask=mask_k)
            tl.store(mine + plane + state, s_im, mask=mask_k)
            tl.debug_barrier()   # every thread's values are stored before the flag is raised
            tl.atomic_xchg(my_flag, 1, sem="release")
        h_re = tl.zeros((BLOCK_K,), dtype=tl.float32)
        h_im = tl.zeros((BLOCK_K,), dtype=tl.float32)
        m_re = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
        m_im = tl.zeros((BLOCK_K,), dtype=tl.float32)
        j = chunk - 1
        done = 0
        while done == 0:
            flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
            if flag != 0:
                # flag 1: aggregate, keep walking back; flag 2: inclusive state, stop
                src = carry_ptr + j.to(tl.int64) * 4 * plane + (flag - 1) * 2 * plane
                v_re = tl.load(src + state, mask=mask_k, other=0.0, volatile=True)
                v_im = tl.load(src + plane + state, mask=mask_k, other=0.0, volatile=True)
                h_re, h_im = h_re + m_re * v_re - m_im * v_im, h_im + m_re * v_im + m_im * v_re
                m_re, m_im = m_re * p_re - m_im * p_im, m_re * p_im + m_im * p_re
                j = j - 1
                done = (flag == 2).to(tl.int32)
    if publish:
        tl.store(mine + 2 * plane + state, s_re + p_re * h_re - p_im * h_im, mask=mask_k)
        tl.store(mine + 3 * plane + state, s_im + p_re * h_im + p_im * h_re, mask=mask_k)
        tl.debug_barrier()
        tl.atomic_xchg(my_flag, 2, sem="release")
    return h_re, h_im


@triton.jit
def _decay(nu_ptr, th_ptr, offs_k, mask_k):
    """``(Re lam, Im lam)`` fp32 ``[BLOCK_K]``, ``lam = exp(-exp(nu)) e^(i theta)`` (padded
    channels: ``exp(-1)``, harmless)."""
    rate = tl.exp(tl.load(nu_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    th = tl.load(th_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    mag = tl.exp(-rate)
    return mag * tl.cos(th), mag * tl.sin(th)


@triton.jit
def _compose(a_re, a_im, b_re, b_im, c_re, c_im, d_re, d_im):
    # apply (a, b) first, then (c, d):  h -> c (a h + b) + d
    return (c_re * a_re - c_im * a_im, c_re * a_im + c_im * a_re,
            c_re * b_re - c_im * b_im + d_re, c_re * b_im + c_im * b_re + d_im)


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
    lam_re, lam_im = _decay(nu_ptr, th_ptr, offs_k, mask_k)
    t0 = chunk * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    # the tile is [K, T]: T is the scanned axis, kept inside each thread's registers
    mask = mask_k[:, None] & (offs_t < T)[None, :]
    x_off = b * sx_b + offs_t[None, :].to(tl.int64) * sx_t + offs_k[:, None]
    x_re = tl.load(xr_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x_im = tl.load(xi_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    a_re = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32) + lam_re[:, None]
    a_im = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32) + lam_im[:, None]
    # local scan from a zero start: pw = lam^(t+1) relative to the chunk, s = local sums
    pw_re, pw_im, s_re, s_im = tl.associative_scan((a_re, a_im, x_re, x_im), 1, _compose)
    last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, :]
    agg_re = tl.sum(tl.where(last, s_re, 0.0), axis=1)
    agg_im = tl.sum(tl.where(last, s_im, 0.0), axis=1)
    p_re = tl.sum(tl.where(last, pw_re, 0.0), axis=1)      # lam^BLOCK_T
    p_im = tl.sum(tl.where(last, pw_im, 0.0), axis=1)
    h_re, h_im = _look_back(carry_ptr, flag_ptr, h0r_ptr, h0i_ptr, agg_re, agg_im, p_re, p_im,
                            chunk, slot, n_slots, b, offs_k, mask_k, B, K, sh_b,
                            t0 + BLOCK_T < T, BLOCK_K)
    y_re = s_re + pw_re * h_re[:, None] - pw_im * h_im[:, None]
    y_im = s_im + pw_re * h_im[:, None] + pw_im * h_re[:, None]
    y_off = b * sy_b + offs_t[None, :].to(tl.int64) * sy_t + offs_k[:, None]
    tl.store(yr_ptr + y_off, y_re.to(yr_ptr.dtype.element_ty), mask=mask)
    tl.store(yi_ptr + y_off, y_im.to(yi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _eigen_scan_aot_kernel(xr_ptr, xi_ptr, nu_ptr, th_ptr, h0r_ptr, h0i_ptr, B, T, K,
                           yr_ptr, yi_ptr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """TensorRT's AOT entry (``seqdeploy.trt.aot``): parameters in TensorRT's order (inputs,
    scalars, outputs), every tensor dense (``x, y [B, T, K]``, ``h0 [B, K]``), and no workspace,
    so no look-back: a program per (batch row, block of K) walks the whole sequence in
    ``[BLOCK_K, BLOCK_T]`` tiles, each scanned as in ``_eigen_scan_kernel`` (same ``_decay``
    and ``_compose``) from the end state of the tile before, carried in registers. Grid:
    ``B * cdiv(K, BLOCK_K)`` programs (less parallel than the chunked kernel at small B; it is
    what one workspace-free launch allows). HBM traffic is still one read of ``x`` and one
    write of ``y``."""
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    b = (pid // n_kb).to(tl.int64)
    offs_k = (pid % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    lam_re, lam_im = _decay(nu_ptr, th_ptr, offs_k, mask_k)
    h_re = tl.load(h0r_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    h_im = tl.load(h0i_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    a_re = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32) + lam_re[:, None]
    a_im = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32) + lam_im[:, None]
    offs_tt = tl.arange(0, BLOCK_T)
    base = b * T * K + offs_k[:, None]
    for t0 in tl.range(0, T, BLOCK_T):
        offs_t = t0 + offs_tt
        mask = mask_k[:, None] & (offs_t < T)[None, :]
        off = base + offs_t[None, :].to(tl.int64) * K
        x_re = tl.load(xr_ptr + off, mask=mask, other=0.0).to(tl.float32)
        x_im = tl.load(xi_ptr + off, mask=mask, other=0.0).to(tl.float32)
        pw_re, pw_im, s_re, s_im = tl.associative_scan((a_re, a_im, x_re, x_im), 1, _compose)
        y_re = s_re + pw_re * h_re[:, None] - pw_im * h_im[:, None]
        y_im = s_im + pw_re * h_im[:, None] + pw_im * h_re[:, None]
        tl.store(yr_ptr + off, y_re.to(yr_ptr.dtype.element_ty), mask=mask)
        tl.store(yi_ptr + off, y_im.to(yi_ptr.dtype.element_ty), mask=mask)
        # the state after the tile's last valid step (padded steps still multiply by lam)
        last = (offs_tt == tl.minimum(T - t0, BLOCK_T) - 1)[None, :]
        h_re = tl.sum(tl.where(last, y_re, 0.0), axis=1)
        h_im = tl.sum(tl.where(last, y_im, 0.0), axis=1)


def launch_config(B: int, T: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps), tuned on an H200 (benchmarks/eigen_scan.py --sweep)."""
    block_k = min(32, triton.next_power_of_2(K))
    block_t = 32 if T >= 32 else max(2, triton.next_power_of_2(T))
    return block_t, block_k, 1


_launcher = Launcher(_eigen_scan_kernel, tensors=10)


def triton_eigen_scan(x_re, x_im, nu, theta, h0_re, h0_im, out=None, block_t=None, block_k=None,
                      num_warps=None):
    """Launch the kernel. ``x_*`` may be strided views with unit stride over K (e.g. halves
    of one [B, T, 2K] projection). ``out``: optional preallocated ``(y_re, y_im)``."""
    B, T, K = x_re.shape
    if x_re.stride(2) != 1 or x_im.stride(2) != 1 or x_re.stride()[:2] != x_im.stride()[:2]:
        x_re, x_im = x_re.contiguous(), x_im.contiguous()
    if not (nu.is_contiguous() and theta.is_contiguous()):
        nu, theta = nu.contiguous(), theta.contiguous()
    if not (h0_re.is_contiguous() and h0_im.is_contiguous()):
        h0_re, h0_im = h0_re.contiguous(), h0_im.contiguous()
    if out is None:
        out = (torch.empty(B, T, K, dtype=x_re.dtype, device=x_re.device),
               torch.empty(B, T, K, dtype=x_re.dtype, device=x_re.device))
    y_re, y_im = out
    bt, bk, nw = launch_config(B, T, K, x_re.device)
    bt, bk, nw = block_t or bt, block_k or bk, num_warps or nw
    n_chunks = triton.cdiv(T, bt)
    n_slots = B * triton.cdiv(K, bk)
    carry = torch.empty(max(n_chunks - 1, 1) * 4 * B * K, dtype=torch.float32, device=x_re.device)
    flags = torch.zeros(max(n_chunks - 1, 1) * n_slots, dtype=torch.int32, device=x_re.device)
    _launcher((n_chunks * n_slots,),
              (x_re, x_im, nu, theta, h0_re, h0_im, y_re, y_im, carry, flags, B, T, K,
               x_re.stride(0), x_re.stride(1), y_re.stride(0), y_re.stride(1), h0_re.stride(0)),
              (bt, bk), num_warps=nw)
    return y_re, y_im
