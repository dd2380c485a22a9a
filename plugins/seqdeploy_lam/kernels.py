"""Triton kernels for ``dual_delta_rule``: the chunkwise (WY / UT) gated delta rule for both
memories, and a one-step-per-token recurrent kernel for short calls and streaming.

Chunked path, chunk BT = 64, two launches, each serving both memories from one load of its
inputs (within a chunk, ``gamma`` is the inclusive cumulative log-decay from the chunk start,
fp32, and only ``exp(gamma_i - gamma_j)`` with i >= j is formed, masked before the ``exp``):

1. ``_wy_kernel``, grid (chunk, batch*head), fully parallel: loads k, v, beta and both
   log-decays once, forms ``K K^T`` once, then per memory the strictly lower
   ``A = beta_i (k_i . k_j) e^{gamma_i - gamma_j}``, inverts ``I + A`` blockwise in registers
   (forward substitution on its four 16 x 16 diagonal blocks, products for the rest, fp32)
   and writes the WY representation ``W = (I+A)^-1 (beta e^gamma K)``,
   ``U = (I+A)^-1 (beta V)`` and ``gamma`` to a workspace (W, U in the input dtype for fp16 and
   bf16 inputs, fp32 otherwise).
2. ``_chunk_kernel``, grid (batch*head, block of dv), sequential over chunks, holding both
   states ``[d, BV]`` in fp32 registers: ``V' = U - W S``, the output
   ``e^gamma (Q S) + (causal(Q K^T) * e^{gamma_i - gamma_j}) V'`` per memory, mixed by ``mix``, and
   ``S <- e^{gamma_last} S + (K e^{gamma_last - gamma})^T V'``. ``Q K^T`` is formed once for both.

Rows past T are loaded as zeros (k = v = beta = g = 0): they leave ``A`` and the state
untouched, so no tail special case exists. Every dot takes fp32 operands: ``ieee`` for fp32
inputs, ``tf32`` for fp16/bf16 (tf32 holds fp16 and bf16 values exactly, so products of the
inputs lose nothing; products with fp32 intermediates, the state and the inverse, round
those to about fp16 precision, as fine as the half inputs themselves).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher

BT = 64
#: at or below this many tokens the recurrent kernel runs: its per-token loop has no
#: workspace and one launch, where the chunked path pays two launches and a 64-row chunk
RECURRENT_MAX_T = 16


@triton.jit
def _inv_unit_lower(A, BC: tl.constexpr):
    """``(I + A)^-1`` of a strictly lower ``[BC, BC]`` fp32 tile, by forward substitution:
    with ``X = (I + A)^-1 - I`` and ``L = -A``, row i of X is ``L_i + sum_{j<i} L_ij X_j``."""
    rows = tl.arange(0, BC)
    X = -A
    for i in range(1, BC):
        li = tl.sum(tl.where(rows[:, None] == i, X, 0.0), 0)
        new = li + tl.sum(li[:, None] * X, 0)
        X = tl.where(rows[:, None] == i, new[None, :], X)
    return X + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)


@triton.jit
def _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t,
                sv_h, BD: tl.constexpr, BDV: tl.constexpr):
    """k [16, BD] and beta * v [16, BDV] (fp32), beta [16] of the rows ``t``; zeros past T."""
    mt = t < T
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + od[None, :],
                mask=mt[:, None] & (od < d)[None, :], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + t64[:, None] * sv_t + ov[None, :],
                mask=mt[:, None] & (ov < dv)[None, :], other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
    return k, beta[:, None] * v, beta


@triton.jit
def _log_decays(g_ptr, b, h, t, T, n):
    return tl.load(g_ptr + (b * T + t.to(tl.int64)) * n + h, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _off_block(beta_i, kk, gam_i, gam_j):
    """A_IJ for a block I after block J: every i > j, and gamma_i <= gamma_j."""
    return beta_i[:, None] * kk * tl.exp(gam_i[:, None] - gam_j[None, :])


@triton.jit
def _diag_block(beta_i, kk, gam_i):
    r = tl.arange(0, 16)
    strict = r[:, None] > r[None, :]
    return beta_i[:, None] * kk * tl.exp(tl.where(strict, gam_i[:, None] - gam_i[None, :], float("-inf")))


@triton.jit
def _store_rows(w_ptr, u_ptr, gam_ptr, base, W, U, gam, d, dv, BD: tl.constexpr, BDV: tl.constexpr):
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    tl.store(w_ptr + base[:, None] * d + od[None, :], W.to(w_ptr.dtype.element_ty), mask=(od < d)[None, :])
    tl.store(u_ptr + base[:, None] * dv + ov[None, :], U.to(u_ptr.dtype.element_ty), mask=(ov < dv)[None, :])
    tl.store(gam_ptr + base, gam)


@triton.jit
def _wy_kernel(k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, w_ptr, u_ptr, gam_ptr,
               T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, Tp,
               BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
               INV_PREC: tl.constexpr):
    """One chunk of 64 rows as four blocks of 16: ``(I + A)^-1`` is block lower triangular;
    its diagonal blocks come from forward substitution on 16 x 16 tiles and the blocks below
    from products of those (``T_IJ = -T_II sum_{J<=M<I} A_IM T_MJ``), never from powers of A.
    Those products chain, so they run at ``INV_PREC`` (``tf32x3``, about fp32, for half inputs)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n).to(tl.int64)
    h = bh % n
    r = tl.arange(0, 16)
    t0 = c * BT + r
    t1 = t0 + 16
    t2 = t0 + 32
    t3 = t0 + 48
    k0, bv0, b0 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t0, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k1, bv1, b1 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t1, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k2, bv2, b2 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t2, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k3, bv3, b3 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t3, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    # K K^T once for both memories (its lower blocks)
    kk00 = tl.dot(k0, tl.trans(k0), input_precision=PREC)
    kk11 = tl.dot(k1, tl.trans(k1), input_precision=PREC)
    kk22 = tl.dot(k2, tl.trans(k2), input_precision=PREC)
    kk33 = tl.dot(k3, tl.trans(k3), input_precision=PREC)
    kk10 = tl.dot(k1, tl.trans(k0), input_precision=PREC)
    kk20 = tl.dot(k2, tl.trans(k0), input_precision=PREC)
    kk21 = tl.dot(k2, tl.trans(k1), input_precision=PREC)
    kk30 = tl.dot(k3, tl.trans(k0), input_precision=PREC)
    kk31 = tl.dot(k3, tl.trans(k1), input_precision=PREC)
    kk32 = tl.dot(k3, tl.trans(k2), input_precision=PREC)
    for s in tl.static_range(2):
        if s == 0:
            g_ptr = gf_ptr
        else:
            g_ptr = gs_ptr
        g0 = _log_decays(g_ptr, b, h, t0, T, n)
        g1 = _log_decays(g_ptr, b, h, t1, T, n)
        g2 = _log_decays(g_ptr, b, h, t2, T, n)
        g3 = _log_decays(g_ptr, b, h, t3, T, n)
        e0 = tl.cumsum(g0, 0)
        e1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
        e2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
        e3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
        T00 = _inv_unit_lower(_diag_block(b0, kk00, e0), 16)
        T11 = _inv_unit_lower(_diag_block(b1, kk11, e1), 16)
        T22 = _inv_unit_lower(_diag_block(b2, kk22, e2), 16)
        T33 = _inv_unit_lower(_diag_block(b3, kk33, e3), 16)
        A10 = _off_block(b1, kk10, e1, e0)
        A20 = _off_block(b2, kk20, e2, e0)
        A21 = _off_block(b2, kk21, e2, e1)
        A30 = _off_block(b3, kk30, e3, e0)
        A31 = _off_block(b3, kk31, e3, e1)
        A32 = _off_block(b3, kk32, e3, e2)
        T10 = -tl.dot(T11, tl.dot(A10, T00, input_precision=INV_PREC), input_precision=INV_PREC)
        T21 = -tl.dot(T22, tl.dot(A21, T11, input_precision=INV_PREC), input_precision=INV_PREC)
        T32 = -tl.dot(T33, tl.dot(A32, T22, input_precision=INV_PREC), input_precision=INV_PREC)
        T20 = -tl.dot(T22, tl.dot(A20, T00, input_precision=INV_PREC) + tl.dot(A21, T10, input_precision=INV_PREC),
                      input_precision=INV_PREC)
        T31 = -tl.dot(T33, tl.dot(A31, T11, input_precision=INV_PREC) + tl.dot(A32, T21, input_precision=INV_PREC),
                      input_precision=INV_PREC)
        T30 = -tl.dot(T33, tl.dot(A30, T00, input_precision=INV_PREC) + tl.dot(A31, T10, input_precision=INV_PREC)
                      + tl.dot(A32, T20, input_precision=INV_PREC), input_precision=INV_PREC)
        # W = (I+A)^-1 (beta e^gamma K), U = (I+A)^-1 (beta V), block row by block row
        r0 = (b0 * tl.exp(e0))[:, None] * k0
        r1 = (b1 * tl.exp(e1))[:, None] * k1
        r2 = (b2 * tl.exp(e2))[:, None] * k2
        r3 = (b3 * tl.exp(e3))[:, None] * k3
        base = (bh * 2 + s).to(tl.int64) * Tp + c * BT + r
        _store_rows(w_ptr, u_ptr, gam_ptr, base, tl.dot(T00, r0, input_precision=PREC),
                    tl.dot(T00, bv0, input_precision=PREC), e0, d, dv, BD, BDV)
        _store_rows(w_ptr, u_ptr, gam_ptr, base + 16,
                    tl.dot(T10, r0, input_precision=PREC) + tl.dot(T11, r1, input_precision=PREC),
                    tl.dot(T10, bv0, input_precision=PREC) + tl.dot(T11, bv1, input_precision=PREC),
                    e1, d, dv, BD, BDV)
        _store_rows(w_ptr, u_ptr, gam_ptr, base + 32,
                    tl.dot(T20, r0, input_precision=PREC) + tl.dot(T21, r1, input_precision=PREC)
                    + tl.dot(T22, r2, input_precision=PREC),
                    tl.dot(T20, bv0, input_precision=PREC) + tl.dot(T21, bv1, input_precision=PREC)
                    + tl.dot(T22, bv2, input_precision=PREC), e2, d, dv, BD, BDV)
        _store_rows(w_ptr, u_ptr, gam_ptr, base + 48,
                    tl.dot(T30, r0, input_precision=PREC) + tl.dot(T31, r1, input_precision=PREC)
                    + tl.dot(T32, r2, input_precision=PREC) + tl.dot(T33, r3, input_precision=PREC),
                    tl.dot(T30, bv0, input_precision=PREC) + tl.dot(T31, bv1, input_precision=PREC)
                    + tl.dot(T32, bv2, input_precision=PREC) + tl.dot(T33, bv3, input_precision=PREC),
                    e3, d, dv, BD, BDV)


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, w_ptr, u_ptr, gam_ptr, mix_ptr, s0_ptr, o_ptr, sT_ptr,
                  T, n, d, dv, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, so_b, so_t, so_h, Tp,
                  BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = (bh // n).to(tl.int64)
    h = bh % n
    rows = tl.arange(0, BT)
    od = tl.arange(0, BD)
    ov = vb * BV + tl.arange(0, BV)
    md = od < d
    mv = ov < dv
    smask = md[:, None] & mv[None, :]
    plane = d * dv
    s_off = (bh * 2).to(tl.int64) * plane + od[:, None] * dv + ov[None, :]
    S0 = tl.load(s0_ptr + s_off, mask=smask, other=0.0)
    S1 = tl.load(s0_ptr + plane + s_off, mask=smask, other=0.0)
    incl = rows[:, None] >= rows[None, :]
    last = rows == BT - 1
    for c in range(0, tl.cdiv(T, BT)):
        t = c * BT + rows
        mt = t < T
        t64 = t.to(tl.int64)
        m2 = mt[:, None] & md[None, :]
        qt = tl.load(q_ptr + b * sq_b + h * sq_h + t64[:, None] * sq_t + od[None, :], mask=m2, other=0.0)
        kt = tl.load(k_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + od[None, :], mask=m2, other=0.0)
        qf = qt.to(tl.float32)
        kf = kt.to(tl.float32)
        qk = tl.dot(qf, tl.trans(kf), input_precision=PREC)    # once for both memories
        m = tl.load(mix_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
        o = tl.zeros((BT, BV), dtype=tl.float32)
        for s in tl.static_range(2):
            if s == 0:
                S = S0
            else:
                S = S1
            base = (bh * 2 + s).to(tl.int64) * Tp + c * BT + rows
            W = tl.load(w_ptr + base[:, None] * d + od[None, :], mask=md[None, :], other=0.0)
            U = tl.load(u_ptr + base[:, None] * dv + ov[None, :], mask=mv[None, :], other=0.0)
            gam = tl.load(gam_ptr + base)
            vn = U.to(tl.float32) - tl.dot(W.to(tl.float32), S, input_precision=PREC)
            dec = tl.exp(tl.where(incl, gam[:, None] - gam[None, :], float("-inf")))
            o_s = tl.exp(gam)[:, None] * tl.dot(qf, S, input_precision=PREC) + \
                tl.dot(qk * dec, vn, input_precision=PREC)
            g_last = tl.sum(tl.where(last, gam, 0.0), 0)
            S = tl.exp(g_last) * S + tl.dot(tl.trans(kf * tl.exp(g_last - gam)[:, None]), vn,
                                            input_precision=PREC)
            if s == 0:
                o += m[:, None] * o_s
                S0 = S
            else:
                o += (1.0 - m)[:, None] * o_s
                S1 = S
        tl.store(o_ptr + b * so_b + h * so_h + t64[:, None] * so_t + ov[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])
    tl.store(sT_ptr + s_off, S0, mask=smask)
    tl.store(sT_ptr + plane + s_off, S1, mask=smask)


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, mix_ptr, s0_ptr, o_ptr,
                      sT_ptr, T, n, d, dv, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                      so_b, so_t, so_h, BD: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = (bh // n).to(tl.int64)
    h = bh % n
    od = tl.arange(0, BD)
    ov = vb * BV + tl.arange(0, BV)
    md = od < d
    mv = ov < dv
    smask = md[:, None] & mv[None, :]
    plane = d * dv
    s_off = (bh * 2).to(tl.int64) * plane + od[:, None] * dv + ov[None, :]
    S0 = tl.load(s0_ptr + s_off, mask=smask, other=0.0)
    S1 = tl.load(s0_ptr + plane + s_off, mask=smask, other=0.0)
    for t in range(0, T):
        t64 = tl.full((), t, tl.int64)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + t64 * sq_t + od, mask=md, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + t64 * sk_t + od, mask=md, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + t64 * sv_t + ov, mask=mv, other=0.0).to(tl.float32)
        sc = (b * T + t64) * n + h
        bet = tl.load(beta_ptr + sc).to(tl.float32)
        m = tl.load(mix_ptr + sc).to(tl.float32)
        a0 = tl.exp(tl.load(gf_ptr + sc).to(tl.float32))
        a1 = tl.exp(tl.load(gs_ptr + sc).to(tl.float32))
        S0 = a0 * S0
        S0 = S0 + k[:, None] * (bet * (v - tl.sum(S0 * k[:, None], 0)))[None, :]
        S1 = a1 * S1
        S1 = S1 + k[:, None] * (bet * (v - tl.sum(S1 * k[:, None], 0)))[None, :]
        o = m * tl.sum(S0 * q[:, None], 0) + (1.0 - m) * tl.sum(S1 * q[:, None], 0)
        tl.store(o_ptr + b * so_b + h * so_h + t64 * so_t + ov, o.to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(sT_ptr + s_off, S0, mask=smask)
    tl.store(sT_ptr + plane + s_off, S1, mask=smask)


_wy = Launcher(_wy_kernel, tensors=8)
_chunk = Launcher(_chunk_kernel, tensors=9)
_recurrent = Launcher(_recurrent_kernel, tensors=10)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, n, e] with unit stride over e (views of a projection are fine)."""
    return x if x.stride(3) == 1 else x.contiguous()


def launch_config(T: int, d: int, dv: int, dtype: torch.dtype) -> dict:
    """Block sizes and dot precision. BD covers the head (dots need >= 16); BV = 32 splits
    dv = 64 into two programs per head, doubling the sequential kernel's parallelism at
    B * n = 64 heads (fewer than an H100's 132 SMs)."""
    return {"BD": max(16, triton.next_power_of_2(d)),
            "BV": max(16, min(32, triton.next_power_of_2(dv))),
            "BDV": max(16, triton.next_power_of_2(dv)),
            "PREC": "ieee" if dtype == torch.float32 else "tf32",
            "INV_PREC": "ieee" if dtype == torch.float32 else "tf32x3",
            "recurrent": T <= RECURRENT_MAX_T}


def triton_dual_delta_rule(q, k, v, beta, g_fast, g_slow, mix, state0, out=None,
                           recurrent: bool | None = None, block_v: int | None = None,
                           num_warps: int = 4):
    """Launch the kernels (see the module docstring). ``out``: optional preallocated
    ``(o [B, T, n, dv] q.dtype, stateT [B, n, 2, d, dv] fp32)``; ``recurrent`` forces a path;
    ``block_v`` and ``num_warps`` tune the sequential kernels (benchmarks/lam_dual_delta.py
    --sweep)."""
    B, T, n, d = q.shape
    dv = v.shape[3]
    q, k, v = _rows(q), _rows(k), _rows(v)
    beta, g_fast, g_slow, mix = (x.contiguous() for x in (beta, g_fast, g_slow, mix))
    state0 = state0.float().contiguous()
    if out is None:
        out = (torch.empty(B, T, n, dv, dtype=q.dtype, device=q.device),
               torch.empty(B, n, 2, d, dv, dtype=torch.float32, device=q.device))
    o, state = out
    cfg = launch_config(T, d, dv, q.dtype)
    if recurrent is None:
        recurrent = cfg["recurrent"]
    if block_v is not None:
        cfg["BV"] = block_v
    strides = lambda x: (x.stride(0), x.stride(1), x.stride(2))   # noqa: E731
    if recurrent:
        _recurrent((B * n, triton.cdiv(dv, cfg["BV"])),
                   (q, k, v, beta, g_fast, g_slow, mix, state0, o, state, T, n, d, dv,
                    *strides(q), *strides(k), *strides(v), *strides(o)),
                   (cfg["BD"], cfg["BV"]), num_warps=num_warps)
        return o, state
    n_chunks = triton.cdiv(T, BT)
    Tp = n_chunks * BT
    ws = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = torch.empty(B, n, 2, Tp, d, dtype=ws, device=q.device)
    u = torch.empty(B, n, 2, Tp, dv, dtype=ws, device=q.device)
    gam = torch.empty(B, n, 2, Tp, dtype=torch.float32, device=q.device)
    _wy((n_chunks, B * n),
        (k, v, beta, g_fast, g_slow, w, u, gam, T, n, d, dv, *strides(k), *strides(v), Tp),
        (BT, cfg["BD"], cfg["BDV"], cfg["PREC"], cfg["INV_PREC"]), num_warps=4)
    _chunk((B * n, triton.cdiv(dv, cfg["BV"])),
           (q, k, w, u, gam, mix, state0, o, state, T, n, d, dv, *strides(q), *strides(k),
            *strides(o), Tp),
           (BT, cfg["BD"], cfg["BV"], cfg["PREC"]), num_warps=num_warps)
    return o, state
