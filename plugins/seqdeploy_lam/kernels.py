"""Triton kernels for ``dual_delta_rule``: the chunkwise (WY / UT) gated delta rule for both
memories, and a one-step-per-token recurrent kernel for short calls and streaming.

Chunked path, chunk BT = 64 (within a chunk, ``gamma`` is the inclusive cumulative log-decay
from the chunk start, fp32, and only ``exp(gamma_i - gamma_j)`` with i >= j is formed, masked
before the ``exp``). Every launch serves both memories from one load of its inputs, except
where a :class:`LaunchPlan` puts the memories in separate programs:

1. ``_wy_kernel``, grid (chunk, batch*head), fully parallel: loads k, v, beta and both
   log-decays once, forms ``K K^T`` once, then per memory the strictly lower
   ``A = beta_i (k_i . k_j) e^{gamma_i - gamma_j}``, inverts ``I + A`` blockwise in registers
   (forward substitution on its four 16 x 16 diagonal blocks, products for the rest, fp32)
   and writes the WY representation ``W = (I+A)^-1 (beta e^gamma K)``,
   ``U = (I+A)^-1 (beta V)`` and ``gamma`` to a workspace ``[B, n, 2, Tp, .]`` (W, U in the
   plan's workspace dtype).

Then one of two designs (``LaunchPlan.design``):

- ``"split"`` (the default for T > 16): the only sequential work is the state recurrence,
  and the outputs, most of the flops, run fully parallel, as flash-linear-attention splits
  ``chunk_gated_delta_rule`` (chunk_delta_h, then chunk_o):

  2. ``_state_kernel``, grid (dv block, batch*head, memory), sequential over chunks, one state
     ``[d, BV]`` (or both, ``mems_per_program = 2``) in fp32 registers: stores the entering
     state ``S_c`` per chunk to ``h [B, n, 2, NT, d, dv]``, ``V' = U - W S_c`` over ``U`` in
     place, ``S <- e^{gamma_last} S + (K e^{gamma_last - gamma})^T V'``.
  3. ``_output_kernel``, grid (dv block, chunk, batch*head), fully parallel: ``Q K^T`` once,
     then per memory ``e^gamma (Q S_c) + (causal(Q K^T) * e^{gamma_i - gamma_j}) V'``, mixed
     by ``mix``.

  ``h`` and ``V'`` go through HBM in the workspace dtype: for bf16 / fp16 inputs by default
  the input dtype (fla keeps ``h`` in bf16 too; each value is rounded once from fp32 and the
  recurrence itself never reads the rounded copies, so rounding does not accumulate over
  chunks; it halves their traffic, which at fp32 is 4 * d * dv bytes of ``h`` per chunk,
  memory and head, written once and read once), fp32 on request.

- ``"fused"`` (the previous design, kept for comparison and used by the ONNX Runtime
  library): 2. ``_chunk_kernel``, grid (batch*head, block of dv), sequential over chunks,
  holding both states ``[d, BV]`` in fp32 registers, computes ``V' = U - W S``, the output
  ``e^gamma (Q S) + (causal(Q K^T) * e^{gamma_i - gamma_j}) V'`` per memory, mixed by
  ``mix``, and ``S <- e^{gamma_last} S + (K e^{gamma_last - gamma})^T V'``, all inside the
  sequential loop: with B * n = 64 heads it leaves most of an H100 idle.

Rows past T are loaded as zeros (k = v = beta = g = 0): they leave ``A`` and the state
untouched, so no tail special case exists. Every dot takes fp32 operands: ``ieee`` for fp32
inputs, ``tf32`` for fp16/bf16 (tf32 holds fp16 and bf16 values exactly, so products of the
inputs lose nothing; products with fp32 intermediates, the state and the inverse, round
those to about fp16 precision, as fine as the half inputs themselves).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher, interpreter_widens_bf16

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
def _inv_unit_lower_rows(A, ptr):
    """:func:`_inv_unit_lower` of a 16 x 16 tile with one cross-row reduction per row instead
    of two: ``-A`` goes to ``ptr`` (row-major, row stride 64: a diagonal block of the
    caller's own output tile, overwritten later) and row i of ``L`` is loaded back from there,
    as flash-linear-attention's 16 x 16 solve loads its rows, instead of being extracted from
    the registers. Row i of ``L`` is row i of ``-A`` itself (the substitution has not changed
    that row yet), so the result is the same."""
    rows = tl.arange(0, 16)
    tl.store(ptr + rows[:, None] * 64 + rows[None, :], -A)
    tl.debug_barrier()                    # every thread's part of -A is written
    X = -A
    for i in range(1, 16):
        li = tl.load(ptr + i * 64 + rows)
        new = li + tl.sum(li[:, None] * X, 0)
        X = tl.where(rows[:, None] == i, new[None, :], X)
    return X + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)


@triton.jit
def _doubling_level(X, A, SIZE: tl.constexpr, PREC: tl.constexpr):
    """One level of :func:`_inv_unit_lower_doubling`: ``X`` holds the inverses of the
    ``SIZE x SIZE`` diagonal blocks of ``I + A`` (zero elsewhere); returns those of the
    ``2 SIZE`` blocks. Within a 2 SIZE block ``[[P, 0], [C, Q]]`` the inverse is
    ``[[P^-1, 0], [-Q^-1 C P^-1, Q^-1]]``, which is ``X - X M X`` with ``M`` the C parts of
    ``A`` (rows in the lower half of a 2 SIZE block, columns in its upper half)."""
    r = tl.arange(0, 16)
    pair = (r[:, None] // (2 * SIZE)) == (r[None, :] // (2 * SIZE))
    M = tl.where(pair & ((r[:, None] // SIZE) != (r[None, :] // SIZE)), A, 0.0)
    return X - tl.dot(tl.dot(X, M, input_precision=PREC), X, input_precision=PREC)


@triton.jit
def _inv_unit_lower_doubling(A, PREC: tl.constexpr):
    """``(I + A)^-1`` of a strictly lower ``[16, 16]`` fp32 tile by recursive doubling: the
    inverses of the 1 x 1 diagonal blocks (ones) give those of the 2 x 2 blocks, then 4, 8,
    16 (:func:`_doubling_level`), six 16 x 16 products at ``PREC`` in place of
    :func:`_inv_unit_lower`'s fifteen dependent row steps, each two reductions across the
    tile's rows. It is the same block recursion :func:`_inverse_blocks` runs from 16 to 64
    (products of the diagonal blocks' inverses, never powers of A)."""
    r = tl.arange(0, 16)
    X = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - \
        tl.where(r[:, None] // 2 == r[None, :] // 2, A, 0.0)     # the 2 x 2 blocks: I - A
    X = _doubling_level(X, A, 2, PREC)
    X = _doubling_level(X, A, 4, PREC)
    return _doubling_level(X, A, 8, PREC)


@triton.jit
def _inv_diag(A, scratch, INVERSE: tl.constexpr, INV_PREC: tl.constexpr):
    """A diagonal 16 x 16 block's inverse by substitution (``"extract"``), by substitution
    loading its rows back from ``scratch`` (``"rows"``) or by doubling."""
    if INVERSE == "doubling":
        return _inv_unit_lower_doubling(A, INV_PREC)
    elif INVERSE == "rows":
        return _inv_unit_lower_rows(A, scratch)
    else:
        return _inv_unit_lower(A, 16)


@triton.jit
def _block_keys(k_ptr, beta_ptr, b, h, t, T, n, d, sk_b, sk_t, sk_h, BD: tl.constexpr):
    """k [16, BD] (fp32) and beta [16] of the rows ``t``; zeros past T."""
    mt = t < T
    od = tl.arange(0, BD)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + od[None, :],
                mask=mt[:, None] & (od < d)[None, :], other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
    return k, beta


@triton.jit
def _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t,
                sv_h, BD: tl.constexpr, BDV: tl.constexpr):
    """k [16, BD] and beta * v [16, BDV] (fp32), beta [16] of the rows ``t``; zeros past T
    (:func:`_block_keys` and the values)."""
    k, beta = _block_keys(k_ptr, beta_ptr, b, h, t, T, n, d, sk_b, sk_t, sk_h, BD)
    ov = tl.arange(0, BDV)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + t.to(tl.int64)[:, None] * sv_t + ov[None, :],
                mask=(t < T)[:, None] & (ov < dv)[None, :], other=0.0).to(tl.float32)
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
def _chunk_blocks(c, bh, n, BT: tl.constexpr):
    """Chunk ``c`` of program (batch*head ``bh``): the batch row (int64), the head, ``r =
    arange(16)`` and the token indices of the chunk's four 16-row blocks."""
    b = (bh // n).to(tl.int64)
    h = bh % n
    r = tl.arange(0, 16)
    t0 = c * BT + r
    return b, h, r, t0, t0 + 16, t0 + 32, t0 + 48


@triton.jit
def _kk_blocks(k0, k1, k2, k3, PREC: tl.constexpr):
    """The lower 16 x 16 blocks of ``K K^T`` for a chunk's four row blocks, diagonal first:
    kk00, kk11, kk22, kk33, kk10, kk20, kk21, kk30, kk31, kk32."""
    return (tl.dot(k0, tl.trans(k0), input_precision=PREC),
            tl.dot(k1, tl.trans(k1), input_precision=PREC),
            tl.dot(k2, tl.trans(k2), input_precision=PREC),
            tl.dot(k3, tl.trans(k3), input_precision=PREC),
            tl.dot(k1, tl.trans(k0), input_precision=PREC),
            tl.dot(k2, tl.trans(k0), input_precision=PREC),
            tl.dot(k2, tl.trans(k1), input_precision=PREC),
            tl.dot(k3, tl.trans(k0), input_precision=PREC),
            tl.dot(k3, tl.trans(k1), input_precision=PREC),
            tl.dot(k3, tl.trans(k2), input_precision=PREC))


@triton.jit
def _chunk_decays(g_ptr, b, h, t0, t1, t2, t3, T, n):
    """``gamma`` of a chunk's four row blocks: the inclusive cumulative log-decay from the
    chunk start (fp32)."""
    g0 = _log_decays(g_ptr, b, h, t0, T, n)
    g1 = _log_decays(g_ptr, b, h, t1, T, n)
    g2 = _log_decays(g_ptr, b, h, t2, T, n)
    g3 = _log_decays(g_ptr, b, h, t3, T, n)
    e0 = tl.cumsum(g0, 0)
    e1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    e2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    e3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
    return e0, e1, e2, e3


@triton.jit
def _inverse_blocks(b0, b1, b2, b3, kk, e0, e1, e2, e3, scratch, INV_PREC: tl.constexpr,
                    INVERSE: tl.constexpr):
    """The ten lower blocks ``T_IJ`` of ``(I + A)^-1`` for one memory (``kk``:
    :func:`_kk_blocks`), in the order T00, T10, T11, T20, T21, T22, T30, T31, T32, T33: the
    diagonal ones by forward substitution on 16 x 16 tiles, the ones below from products of
    those (``T_IJ = -T_II sum_{J<=M<I} A_IM T_MJ``), never from powers of A. Those products
    chain, so they run at ``INV_PREC``. ``INVERSE``: how the diagonal blocks are made
    (:func:`_inv_diag`); ``"rows"`` uses the diagonal 16 x 16 blocks of the row-major
    64 x 64 tile at ``scratch`` (the caller's own output, written after this returns), which
    the other forms never touch."""
    T00 = _inv_diag(_diag_block(b0, kk[0], e0), scratch, INVERSE, INV_PREC)
    T11 = _inv_diag(_diag_block(b1, kk[1], e1), scratch + 16 * 64 + 16, INVERSE, INV_PREC)
    T22 = _inv_diag(_diag_block(b2, kk[2], e2), scratch + 32 * 64 + 32, INVERSE, INV_PREC)
    T33 = _inv_diag(_diag_block(b3, kk[3], e3), scratch + 48 * 64 + 48, INVERSE, INV_PREC)
    if INVERSE == "rows":
        tl.debug_barrier()                # every row is read before the caller overwrites it
    kk10, kk20, kk21, kk30, kk31, kk32 = kk[4], kk[5], kk[6], kk[7], kk[8], kk[9]
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
    return T00, T10, T11, T20, T21, T22, T30, T31, T32, T33


@triton.jit
def _wy_kernel(k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, w_ptr, u_ptr, gam_ptr,
               T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, Tp,
               BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
               INV_PREC: tl.constexpr, INVERSE: tl.constexpr):
    """One chunk of 64 rows as four blocks of 16, both memories (:func:`_inverse_blocks`),
    then ``W`` and ``U`` block row by block row from 16-row products."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, r, t0, t1, t2, t3 = _chunk_blocks(c, bh, n, BT)
    k0, bv0, b0 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t0, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k1, bv1, b1 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t1, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k2, bv2, b2 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t2, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    k3, bv3, b3 = _block_rows(k_ptr, v_ptr, beta_ptr, b, h, t3, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, BD, BDV)
    kk = _kk_blocks(k0, k1, k2, k3, PREC)     # K K^T once for both memories (its lower blocks)
    for s in tl.static_range(2):
        if s == 0:
            g_ptr = gf_ptr
        else:
            g_ptr = gs_ptr
        e0, e1, e2, e3 = _chunk_decays(g_ptr, b, h, t0, t1, t2, t3, T, n)
        # (w_ptr as scratch is never touched: "rows" is refused with this kernel)
        T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _inverse_blocks(
            b0, b1, b2, b3, kk, e0, e1, e2, e3, w_ptr, INV_PREC, INVERSE)
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
def _store_block(ptr, X, row0: tl.constexpr, col0: tl.constexpr):
    """A 16 x 16 block of a row-major 64 x 64 matrix at ``ptr`` (rounded to its dtype)."""
    r = tl.arange(0, 16)
    tl.store(ptr + (row0 + r)[:, None] * 64 + (col0 + r)[None, :], X.to(ptr.dtype.element_ty))


@triton.jit
def _chunk_inverse(k_ptr, beta_ptr, gf_ptr, gs_ptr, tinv_ptr, T, n, d, sk_b, sk_t, sk_h, NT,
                   BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                   INV_PREC: tl.constexpr, INVERSE: tl.constexpr, KK_INPUT: tl.constexpr):
    """The program's chunk ``c``, (batch*head) ``bh`` and memory ``mem`` (grid (chunk,
    batch*head, memory)) and that chunk's ``((T00, T10, T11, T20, T21, T22, T30, T31, T32,
    T33), (gamma0, gamma1, gamma2, gamma3), tile)``: the lower 16 x 16 blocks of
    ``(I + A)^-1`` (fp32, :func:`_inverse_blocks`), the four row blocks' ``gamma`` [16]
    (fp32) and ``tile``, this program's 64 x 64 block of ``tinv_ptr [B*n, 2, NT, 64, 64]``,
    which ``INVERSE="rows"`` uses (:func:`_inverse_blocks`) and no other form touches. It
    loads k and beta, but no v. ``KK_INPUT``: the ``K K^T`` products take the fp16 / bf16
    keys as they are (each product of two half values is exact in fp32, as it is in tf32
    after widening: the same sums at twice tf32's tensor-core rate)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    mem = tl.program_id(2)
    b, h, r, t0, t1, t2, t3 = _chunk_blocks(c, bh, n, BT)
    k0, b0 = _block_keys(k_ptr, beta_ptr, b, h, t0, T, n, d, sk_b, sk_t, sk_h, BD)
    k1, b1 = _block_keys(k_ptr, beta_ptr, b, h, t1, T, n, d, sk_b, sk_t, sk_h, BD)
    k2, b2 = _block_keys(k_ptr, beta_ptr, b, h, t2, T, n, d, sk_b, sk_t, sk_h, BD)
    k3, b3 = _block_keys(k_ptr, beta_ptr, b, h, t3, T, n, d, sk_b, sk_t, sk_h, BD)
    if mem == 0:
        g_ptr = gf_ptr
    else:
        g_ptr = gs_ptr
    e0, e1, e2, e3 = _chunk_decays(g_ptr, b, h, t0, t1, t2, t3, T, n)
    if KK_INPUT:
        DT = k_ptr.dtype.element_ty     # the widened keys back to their own dtype: exact
        kk = _kk_blocks(k0.to(DT), k1.to(DT), k2.to(DT), k3.to(DT), PREC)
    else:
        kk = _kk_blocks(k0, k1, k2, k3, PREC)
    ws = bh * 2 + mem
    out = tinv_ptr + (ws.to(tl.int64) * NT + c) * BT * BT
    return c, bh, mem, _inverse_blocks(b0, b1, b2, b3, kk, e0, e1, e2, e3, out, INV_PREC,
                                       INVERSE), (e0, e1, e2, e3), out


@triton.jit
def _solve_kernel(k_ptr, beta_ptr, gf_ptr, gs_ptr, tinv_ptr, gam_ptr,
                  T, n, d, sk_b, sk_t, sk_h, Tp, NT,
                  BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                  INV_PREC: tl.constexpr, INVERSE: tl.constexpr, KK_INPUT: tl.constexpr):
    """The ``"solve"`` WY form, first half: grid (chunk, batch*head, memory). One memory's
    ``(I + A)^-1`` (:func:`_chunk_inverse`): its ten lower 16 x 16 blocks to
    ``tinv [B*n, 2, NT, 64, 64]`` (fp32, or the input dtype, rounded once; the six upper
    blocks are never written: ``_apply_kernel`` masks them to zero), and its ``gamma`` to
    the workspace. It holds k but neither v nor the W and U products (ptxas for sm_90,
    4 warps: 249 registers and no spills, where ``_wy_kernel``, holding all of them for both
    memories, takes 255 and spills). ``INVERSE``: the diagonal blocks as
    :func:`_inverse_blocks` makes them, or (``"rows"``, fp32 ``tinv`` only) by
    :func:`_inv_unit_lower_rows`, through this program's own diagonal blocks of ``tinv``."""
    c, bh, mem, inv, gam, out = _chunk_inverse(k_ptr, beta_ptr, gf_ptr, gs_ptr, tinv_ptr, T, n, d,
                                               sk_b, sk_t, sk_h, NT, BT, BD, PREC, INV_PREC,
                                               INVERSE, KK_INPUT)
    T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = inv
    e0, e1, e2, e3 = gam
    _store_block(out, T00, 0, 0)
    _store_block(out, T10, 16, 0)
    _store_block(out, T11, 16, 16)
    _store_block(out, T20, 32, 0)
    _store_block(out, T21, 32, 16)
    _store_block(out, T22, 32, 32)
    _store_block(out, T30, 48, 0)
    _store_block(out, T31, 48, 16)
    _store_block(out, T32, 48, 32)
    _store_block(out, T33, 48, 48)
    base = (bh * 2 + mem).to(tl.int64) * Tp + c * BT + tl.arange(0, 16)
    tl.store(gam_ptr + base, e0)
    tl.store(gam_ptr + base + 16, e1)
    tl.store(gam_ptr + base + 32, e2)
    tl.store(gam_ptr + base + 48, e3)


@triton.jit
def _chunk_rows(c, bh, n, T, BT: tl.constexpr):
    """Chunk ``c`` of (batch*head ``bh``) as 64 rows: the batch row (int64), the head,
    ``rows = arange(64)``, the token indices ``t64 [64]`` (int64) and their mask."""
    b = (bh // n).to(tl.int64)
    h = bh % n
    rows = tl.arange(0, BT)
    t = c * BT + rows
    mt = t < T
    return b, h, rows, t.to(tl.int64), mt


@triton.jit
def _load_rows(x_ptr, s_t, t64, mt, width, BX: tl.constexpr):
    """Rows ``t64`` of the head at ``x_ptr`` (row stride ``s_t``, ``width`` columns):
    ``[64, BX]`` fp32, zeros past T and past ``width``."""
    ox = tl.arange(0, BX)
    return tl.load(x_ptr + t64[:, None] * s_t + ox[None, :],
                   mask=mt[:, None] & (ox < width)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_wy(ptr, base, X, width, BX: tl.constexpr):
    """``X [64, BX]`` to the workspace rows ``base`` (row stride ``width``, rounded to its
    dtype)."""
    ox = tl.arange(0, BX)
    tl.store(ptr + base[:, None] * width + ox[None, :], X.to(ptr.dtype.element_ty),
             mask=(ox < width)[None, :])


@triton.jit
def _apply_kernel(k_ptr, v_ptr, beta_ptr, tinv_ptr, gam_ptr, w_ptr, u_ptr,
                  T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, Tp, NT,
                  BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    """The ``"solve"`` WY form, second half: grid (chunk, batch*head, memory).
    ``tinv``'s upper blocks (unwritten) load as zeros.
    ``W = (I+A)^-1 (beta e^gamma K)`` and ``U = (I+A)^-1 (beta V)`` as two 64-row products
    (where ``_wy_kernel`` makes twenty of 16 rows), from ``_solve_kernel``'s inverse."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    mem = tl.program_id(2)
    b, h, rows, t64, mt = _chunk_rows(c, bh, n, T, BT)
    ws = (bh * 2 + mem).to(tl.int64)
    lower = (rows[:, None] // 16) >= (rows[None, :] // 16)     # the blocks _solve_kernel wrote
    tinv = tl.load(tinv_ptr + (ws * NT + c) * BT * BT + rows[:, None] * BT + rows[None, :],
                   mask=lower, other=0.0).to(tl.float32)
    gam = tl.load(gam_ptr + ws * Tp + c * BT + rows)
    beta = tl.load(beta_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
    k = _load_rows(k_ptr + b * sk_b + h * sk_h, sk_t, t64, mt, d, BD)
    v = _load_rows(v_ptr + b * sv_b + h * sv_h, sv_t, t64, mt, dv, BDV)
    W = tl.dot(tinv, (beta * tl.exp(gam))[:, None] * k, input_precision=PREC)
    U = tl.dot(tinv, beta[:, None] * v, input_precision=PREC)
    base = ws * Tp + c * BT + rows
    _store_wy(w_ptr, base, W, d, BD)
    _store_wy(u_ptr, base, U, dv, BDV)


@triton.jit
def _join4(x0, x1, x2, x3):
    """``[..., 2 (q), 2 (p)]``: ``x_{2p+q}`` at ``[..., q, p]``."""
    return tl.join(tl.join(x0, x1), tl.join(x2, x3))


@triton.jit
def _cat_cols(x0, x1, x2, x3):
    """Four ``[R, C]`` tiles side by side: ``[R, 4C]``."""
    return tl.reshape(tl.permute(_join4(x0, x1, x2, x3), (0, 3, 2, 1)),
                      (x0.shape[0], 4 * x0.shape[1]))


@triton.jit
def _cat_rows(x0, x1, x2, x3):
    """Four ``[R, C]`` tiles stacked: ``[4R, C]``."""
    return tl.reshape(tl.permute(_join4(x0, x1, x2, x3), (3, 2, 0, 1)),
                      (4 * x0.shape[0], x0.shape[1]))


@triton.jit
def _cat_vec(x0, x1, x2, x3):
    """Four ``[R]`` vectors in a row: ``[4R]``."""
    return tl.reshape(tl.permute(_join4(x0, x1, x2, x3), (2, 1, 0)), (4 * x0.shape[0],))


@triton.jit
def _solve_apply_kernel(k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, scratch_ptr, w_ptr, u_ptr,
                        gam_ptr, T, n, d, dv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, Tp, NT,
                        BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                        PREC: tl.constexpr, INV_PREC: tl.constexpr, INVERSE: tl.constexpr,
                        KK_INPUT: tl.constexpr):
    """The ``"solve-apply"`` WY form, grid (chunk, batch*head, memory): ``_solve_kernel`` and
    ``_apply_kernel`` in one program. The ten blocks of ``(I + A)^-1``
    (:func:`_chunk_inverse`) are joined, with zeros above them, into one ``[64, 64]`` fp32
    tile in registers (Triton moves them through shared memory), from which W and U are
    made as ``_apply_kernel`` makes them: the inverse never goes to HBM and is never
    rounded, and there is one launch fewer. ``scratch [B*n, 2, NT, 64, 64]`` fp32 serves
    ``INVERSE="rows"`` only (the diagonal blocks' rows, as ``_solve_kernel`` uses its own
    ``tinv``); the other forms never touch it. k is loaded twice (16-row blocks for
    ``K K^T``, then 64 rows for W), so the keys are not held through the inverse."""
    c, bh, mem, inv, gam4, _ = _chunk_inverse(k_ptr, beta_ptr, gf_ptr, gs_ptr, scratch_ptr, T, n,
                                              d, sk_b, sk_t, sk_h, NT, BT, BD, PREC, INV_PREC,
                                              INVERSE, KK_INPUT)
    T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = inv
    z = tl.zeros_like(T00)
    tinv = _cat_rows(_cat_cols(T00, z, z, z), _cat_cols(T10, T11, z, z),
                     _cat_cols(T20, T21, T22, z), _cat_cols(T30, T31, T32, T33))
    gam = _cat_vec(gam4[0], gam4[1], gam4[2], gam4[3])
    b, h, rows, t64, mt = _chunk_rows(c, bh, n, T, BT)
    beta = tl.load(beta_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
    base = (bh * 2 + mem).to(tl.int64) * Tp + c * BT + rows
    tl.store(gam_ptr + base, gam)
    # W stored before v loads (a load does not move above a store that may alias it): with
    # k, v, W and U all live at once, as in _apply_kernel, 2 warps spill
    k = _load_rows(k_ptr + b * sk_b + h * sk_h, sk_t, t64, mt, d, BD)
    _store_wy(w_ptr, base, tl.dot(tinv, (beta * tl.exp(gam))[:, None] * k, input_precision=PREC),
              d, BD)
    v = _load_rows(v_ptr + b * sv_b + h * sv_h, sv_t, t64, mt, dv, BDV)
    _store_wy(u_ptr, base, tl.dot(tinv, beta[:, None] * v, input_precision=PREC), dv, BDV)


@triton.jit
def _head_tile(bh, vb, n, d, dv, BD: tl.constexpr, BV: tl.constexpr):
    """Program (batch*head ``bh``, dv block ``vb``): the batch row (int64), the head, the
    key offsets ``od [BD]`` and value offsets ``ov [BV]`` with their masks."""
    od = tl.arange(0, BD)
    ov = vb * BV + tl.arange(0, BV)
    return (bh // n).to(tl.int64), bh % n, od, ov, od < d, ov < dv


@triton.jit
def _load_qk(q_ptr, k_ptr, b, h, t64, od, m2, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h):
    """Rows ``t64`` of q and k of head (b, h), ``[BT, BD]`` in the input dtype."""
    qt = tl.load(q_ptr + b * sq_b + h * sq_h + t64[:, None] * sq_t + od[None, :], mask=m2,
                 other=0.0)
    kt = tl.load(k_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + od[None, :], mask=m2,
                 other=0.0)
    return qt, kt


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, w_ptr, u_ptr, gam_ptr, mix_ptr, s0_ptr, o_ptr, sT_ptr,
                  T, n, d, dv, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, so_b, so_t, so_h, Tp,
                  BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b, h, od, ov, md, mv = _head_tile(bh, vb, n, d, dv, BD, BV)
    rows = tl.arange(0, BT)
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
        qt, kt = _load_qk(q_ptr, k_ptr, b, h, t64, od, m2, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h)
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


# (NT unspecialised: its divisibility changes nothing, and one binary serves every T)
@triton.jit(do_not_specialize=["NT"])
def _state_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, s0_ptr, h_ptr, sT_ptr,
                  T, n, d, dv, sk_b, sk_t, sk_h, Tp, NT,
                  BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, MEMS: tl.constexpr,
                  PREC: tl.constexpr, HALF_DOTS: tl.constexpr):
    """Split design, sequential part: grid (dv block, batch*head, 2 // MEMS); a program holds
    ``MEMS`` states ``[d, BV]`` in fp32 registers (MEMS = 1: the memory is program_id(2);
    MEMS = 2: both, sharing each chunk's load of k). Per chunk it stores the entering state
    ``S_c`` to ``h [B*n, 2, NT, d, dv]``, overwrites ``U`` in place with ``V' = U - W S_c``
    (same rows and columns, owned by this program alone) and advances
    ``S <- e^{gamma_last} S + (K e^{gamma_last - gamma})^T V'``. Nothing else: the outputs
    are ``_output_kernel``'s, fully parallel over chunks. ``HALF_DOTS``: both products take
    operands rounded to the input dtype (the state, V' and the decayed keys; fp32
    accumulation), as fla's chunk_delta_h does, for twice tf32's tensor-core rate."""
    vb = tl.program_id(0)
    bh = tl.program_id(1)
    mem0 = tl.program_id(2) * MEMS
    b, h, od, ov, md, mv = _head_tile(bh, vb, n, d, dv, BD, BV)
    rows = tl.arange(0, BT)
    smask = md[:, None] & mv[None, :]
    plane = d * dv
    tile = od[:, None] * dv + ov[None, :]
    S0 = tl.load(s0_ptr + (bh * 2 + mem0).to(tl.int64) * plane + tile, mask=smask, other=0.0)
    S1 = S0
    if MEMS == 2:
        S1 = tl.load(s0_ptr + (bh * 2 + 1).to(tl.int64) * plane + tile, mask=smask, other=0.0)
    for c in range(0, NT):
        t = c * BT + rows
        t64 = t.to(tl.int64)
        kf = tl.load(k_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + od[None, :],
                     mask=(t < T)[:, None] & md[None, :], other=0.0).to(tl.float32)
        for s in tl.static_range(MEMS):
            if s == 0:
                S = S0
            else:
                S = S1
            mem = (bh * 2 + mem0 + s).to(tl.int64)
            tl.store(h_ptr + (mem * NT + c) * plane + tile, S.to(h_ptr.dtype.element_ty), mask=smask)
            base = mem * Tp + c * BT + rows
            W = tl.load(w_ptr + base[:, None] * d + od[None, :], mask=md[None, :], other=0.0)
            U = tl.load(u_ptr + base[:, None] * dv + ov[None, :], mask=mv[None, :], other=0.0)
            gam = tl.load(gam_ptr + base)
            g_last = tl.load(gam_ptr + mem * Tp + c * BT + BT - 1)
            kd = kf * tl.exp(g_last - gam)[:, None]
            if HALF_DOTS:
                DT = k_ptr.dtype.element_ty
                vn = U.to(tl.float32) - tl.dot(W.to(DT), S.to(DT))
                upd = tl.dot(tl.trans(kd.to(DT)), vn.to(DT))
            else:
                vn = U.to(tl.float32) - tl.dot(W.to(tl.float32), S, input_precision=PREC)
                upd = tl.dot(tl.trans(kd), vn, input_precision=PREC)
            tl.store(u_ptr + base[:, None] * dv + ov[None, :], vn.to(u_ptr.dtype.element_ty),
                     mask=mv[None, :])
            S = tl.exp(g_last) * S + upd
            if s == 0:
                S0 = S
            else:
                S1 = S
    tl.store(sT_ptr + (bh * 2 + mem0).to(tl.int64) * plane + tile, S0, mask=smask)
    if MEMS == 2:
        tl.store(sT_ptr + (bh * 2 + 1).to(tl.int64) * plane + tile, S1, mask=smask)


# (NT unspecialised: its divisibility changes nothing, and one binary serves every T)
@triton.jit(do_not_specialize=["NT"])
def _output_kernel(q_ptr, k_ptr, u_ptr, gam_ptr, h_ptr, mix_ptr, o_ptr,
                   T, n, d, dv, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, so_b, so_t, so_h, Tp, NT,
                   BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                   HALF_DOTS: tl.constexpr):
    """Split design, parallel part: grid (dv block, chunk, batch*head). One load of q, k and
    one ``Q K^T`` per chunk serve both memories: per memory
    ``e^gamma (Q S_c) + (causal(Q K^T) * e^{gamma_i - gamma_j}) V'`` from the state kernel's
    ``S_c`` and ``V'``, mixed by ``mix`` and stored once. ``HALF_DOTS``: products take
    input-dtype operands (q, k, S_c and V' already are; ``Q K^T * decay`` is rounded)."""
    vb = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, od, ov, md, mv = _head_tile(bh, vb, n, d, dv, BD, BV)
    rows = tl.arange(0, BT)
    t = c * BT + rows
    mt = t < T
    t64 = t.to(tl.int64)
    m2 = mt[:, None] & md[None, :]
    qt, kt = _load_qk(q_ptr, k_ptr, b, h, t64, od, m2, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h)
    DT = q_ptr.dtype.element_ty
    if HALF_DOTS:
        qk = tl.dot(qt, tl.trans(kt))
    else:
        qk = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision=PREC)
    m = tl.load(mix_ptr + (b * T + t64) * n + h, mask=mt, other=0.0).to(tl.float32)
    incl = rows[:, None] >= rows[None, :]
    plane = d * dv
    o = tl.zeros((BT, BV), dtype=tl.float32)
    for s in tl.static_range(2):
        mem = (bh * 2 + s).to(tl.int64)
        S = tl.load(h_ptr + (mem * NT + c) * plane + od[:, None] * dv + ov[None, :],
                    mask=md[:, None] & mv[None, :], other=0.0)
        base = mem * Tp + c * BT + rows
        vn = tl.load(u_ptr + base[:, None] * dv + ov[None, :], mask=mv[None, :], other=0.0)
        gam = tl.load(gam_ptr + base)
        dec = tl.exp(tl.where(incl, gam[:, None] - gam[None, :], float("-inf")))
        if HALF_DOTS:
            o_s = tl.exp(gam)[:, None] * tl.dot(qt, S.to(DT)) + tl.dot((qk * dec).to(DT), vn.to(DT))
        else:
            o_s = tl.exp(gam)[:, None] * tl.dot(qt.to(tl.float32), S.to(tl.float32), input_precision=PREC) + \
                tl.dot(qk * dec, vn.to(tl.float32), input_precision=PREC)
        if s == 0:
            o += m[:, None] * o_s
        else:
            o += (1.0 - m)[:, None] * o_s
    tl.store(o_ptr + b * so_b + h * so_h + t64[:, None] * so_t + ov[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, mix_ptr, s0_ptr, o_ptr,
                      sT_ptr, T, n, d, dv, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                      so_b, so_t, so_h, BD: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b, h, od, ov, md, mv = _head_tile(bh, vb, n, d, dv, BD, BV)
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


@triton.jit
def _dual_delta_rule_aot_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, mix_ptr, s0_ptr,
                                T, n, d, dv, o_ptr, sT_ptr, BD: tl.constexpr, BV: tl.constexpr):
    """TensorRT's AOT entry (``seqdeploy.trt.aot``): the recurrent design (one launch, the
    states in registers, no workspace, unlike the chunked designs' W, U and per-chunk states)
    for every T, with its parameters in TensorRT's order (inputs, scalars, outputs) on dense
    tensors (``q, k [B, T, n, d]``, ``v, o [B, T, n, dv]``, ``beta, g_*, mix [B, T, n]``,
    states ``[B, n, 2, d, dv]``). Grid ``(B * n, cdiv(dv, BV))``. A per-token loop: exact at
    any T, but without the chunked path's parallelism over T."""
    _recurrent_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gf_ptr, gs_ptr, mix_ptr, s0_ptr, o_ptr,
                      sT_ptr, T, n, d, dv, T * n * d, n * d, d, T * n * d, n * d, d,
                      T * n * dv, n * dv, dv, T * n * dv, n * dv, dv, BD, BV)


_wy = Launcher(_wy_kernel, tensors=8)
_solve = Launcher(_solve_kernel, tensors=6)
_apply = Launcher(_apply_kernel, tensors=7)
_solve_apply = Launcher(_solve_apply_kernel, tensors=9)
_chunk = Launcher(_chunk_kernel, tensors=9)
_state = Launcher(_state_kernel, tensors=7)
_output = Launcher(_output_kernel, tensors=7)
_recurrent = Launcher(_recurrent_kernel, tensors=10)

DESIGNS = ("recurrent", "fused", "split")
WY_FORMS = ("fused", "solve", "solve-apply")
HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one call runs. Tiles are powers of two >= 16 (``tl.dot``).

    - ``design``: ``"recurrent"`` (one launch, a loop over tokens), ``"fused"`` (WY, then one
      sequential kernel computing states and outputs) or ``"split"`` (WY, then a sequential
      kernel advancing only the states, then a fully parallel output kernel);
    - ``BD``: head tile (all of d); ``BDV``: the WY kernel's value tile (all of dv);
    - ``BV``: value block of the sequential kernel (recurrent, fused's chunk kernel or
      split's state kernel): dv / BV programs per head and memory;
    - ``mems_per_program``: split's state kernel, 1 (one program per memory: twice the
      programs) or 2 (one program holds both states and loads each chunk's k once);
    - ``BV_OUT``: split's output kernel value block;
    - ``workspace``: dtype of W, U / V' and split's per-chunk states: ``"input"`` keeps them in
      the input dtype for fp16 / bf16 inputs (half the bytes through HBM; they are rounded
      once, each from an fp32 value, so the error stays at the inputs' own rounding, as fla
      keeps ``h`` in bf16) or ``"fp32"``; fp32 inputs always use fp32;
    - ``PREC`` / ``INV_PREC``: dot precisions (module docstring);
    - ``dot_operands``: split's state and output kernels, ``"fp32"`` (products at ``PREC``,
      tf32 for half inputs) or ``"input"`` (operands rounded to the fp16 / bf16 input dtype,
      fp32 accumulation, as fla does: twice the tensor-core rate and half the shared
      memory, at one more rounding of the state and V' per product); fp32 inputs ignore it.
      On CUDA the split design refuses "input" (:func:`triton_dual_delta_rule`): it ended in
      an illegal memory access on an H100 at 2 and 4 warps, cause not found; Triton's
      interpreter runs it, and the tests check its arithmetic there;
    - ``num_warps`` (the sequential kernel) and ``out_warps`` (split's output kernel; the WY
      kernel always runs 4, as the ONNX Runtime library compiles it);
    - ``state_stages``: split's state kernel's software-pipelining depth (Triton's
      ``num_stages``: how many chunks of W, U and k are in flight ahead of the recurrence);
      None leaves Triton's default (3);
    - ``wy``: how the WY representation is made, ``"fused"`` (``_wy_kernel``: one program a
      chunk for both memories, W and U from 16-row products; the ONNX Runtime library's) or
      ``"solve"`` (``_solve_kernel`` stores each memory's ``(I + A)^-1``, its lower blocks,
      to a workspace, then ``_apply_kernel`` makes W and U as 64-row products: two
      launches, a program a chunk and memory, each holding fewer values; the default, see
      :func:`launch_plan`) or ``"solve-apply"`` (``_solve_apply_kernel``: the same two
      steps in one program a chunk and memory, the inverse kept in registers: no stored
      inverse, one launch);
    - ``wy_warps``: warps of the kernel that inverts ``I + A`` (``_wy_kernel``,
      ``_solve_kernel`` or ``_solve_apply_kernel``, which then also makes W and U on them).
      Its forward substitution reduces a 16 x 16 tile across its rows twice per row, 120
      times per inverse: within one warp that is register shuffles, across warps a round
      trip through shared memory and a barrier each (fla's 16 x 16 solve is tuned over 1-8
      warps). ``_apply_kernel`` always runs 4;
    - ``inverse``: how the four 16 x 16 diagonal blocks of ``(I + A)^-1`` are made.
      ``"extract"``: forward substitution taking row i of the tile out of the registers (a
      second reduction per row); ``"rows"`` (``wy="solve"`` or ``"solve-apply"``):
      substitution that writes the tile to a 64 x 64 fp32 block of its own (``"solve"``:
      the program's output block; ``"solve-apply"``: a scratch of the same size) and loads
      its rows back (:func:`_inv_unit_lower_rows`); ``"doubling"``: six 16 x 16 products,
      no row steps (:func:`_inv_unit_lower_doubling`);
    - ``kk_dots`` (``wy="solve"`` or ``"solve-apply"``): ``"input"`` runs the ``K K^T``
      products on the fp16 / bf16 keys as they are (exact products, fp32 sums: the same
      values as tf32 on the widened keys, at twice the rate), ``"fp32"`` widens them first;
      fp32 inputs always use fp32;
    - ``tinv`` (``wy="solve"``, not with ``inverse="rows"``, whose substitution reads its
      rows back from there): dtype of the stored inverse, ``"fp32"`` or ``"input"`` (fp16 /
      bf16: rounded once, half the bytes between the two launches, as fla stores its
      inverse in the input dtype); fp32 inputs always use fp32.
    """
    design: str
    BD: int
    BDV: int
    BV: int
    PREC: str
    INV_PREC: str
    mems_per_program: int = 1
    BV_OUT: int = 32
    workspace: str = "input"
    dot_operands: str = "fp32"
    num_warps: int = 4
    out_warps: int = 4
    state_stages: int | None = None
    wy: str = "fused"
    wy_warps: int = 4
    inverse: str = "extract"
    kk_dots: str = "input"
    tinv: str = "fp32"

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"dual_delta_rule: design must be one of {DESIGNS}, got {self.design!r}")
        if self.mems_per_program not in (1, 2) or self.workspace not in ("input", "fp32") or \
                self.dot_operands not in ("input", "fp32") or self.wy not in WY_FORMS or \
                self.wy_warps not in (1, 2, 4, 8) or \
                self.inverse not in ("extract", "rows", "doubling") or \
                (self.inverse == "rows" and self.wy == "fused") or \
                self.kk_dots not in ("input", "fp32") or self.tinv not in ("input", "fp32") or \
                (self.tinv == "input" and (self.wy != "solve" or self.inverse == "rows")):
            raise ValueError(f"dual_delta_rule: bad plan {self}")

    def half_dots(self, dtype: torch.dtype) -> bool:
        return dtype in HALF and self.dot_operands == "input"

    def kk_input(self, dtype: torch.dtype) -> bool:
        """``kk_dots="input"`` for fp16 / bf16 inputs, except where Triton's interpreter
        needs bf16 widened (``seqdeploy.launch.interpreter_widens_bf16``)."""
        return dtype in HALF and self.kk_dots == "input" and not interpreter_widens_bf16(dtype)

    def tinv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in HALF and self.tinv == "input" else torch.float32

    def workspace_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in HALF and self.workspace == "input" else torch.float32


def launch_plan(T: int, d: int, dv: int, dtype: torch.dtype, design: str | None = None,
                **overrides) -> LaunchPlan:
    """The default plan for a call (``design`` and any :class:`LaunchPlan` field override it;
    benchmarks/lam_dual_delta.py --sweep times the alternatives). Recurrent at
    T <= RECURRENT_MAX_T, else split. BV = 32 splits dv = 64 into two programs per head (and,
    in split, per memory): 64 heads x 2 x 2 = 256 state programs at B * n = 64, where the fused
    kernel had 128 for an H100's 132 SMs. BV_OUT = 32: at d = 64, bf16, 4 warps, sm_90, the
    output kernel needs 227 registers a thread at 32 and spills (255 + 352 bytes of stack) at
    64 (cuobjdump -res-usage of triton 3.9's cubin). The WY representation: ``"solve"`` with
    row loads on 2 warps and input-dtype ``K K^T`` (one H100 sweep, bf16, B=8 n=8 d=64, CUDA
    graphs: 0.401 / 0.109 / 0.041 ms in all at T = 2048 / 512 / 128, against 0.512 / 0.144 /
    0.056 for the fused WY kernel on 4 warps; benchmarks/lam_dual_delta.py --sweep). The same
    sweep measured ``INV_PREC="tf32"`` faster still (0.375 / 0.100 / 0.039 ms, the same error
    against the float64 loop at those shapes); it stays a sweep variant until the GPU tests
    at the plugin's limits (T = 4096, near-unit decays) have run with it."""
    if design is None:
        design = "recurrent" if T <= RECURRENT_MAX_T else "split"
    bdv = max(16, triton.next_power_of_2(dv))
    plan = LaunchPlan(design=design, BD=max(16, triton.next_power_of_2(d)), BDV=bdv,
                      BV=max(16, min(32, bdv)), BV_OUT=max(16, min(32, bdv)),
                      PREC="ieee" if dtype == torch.float32 else "tf32",
                      INV_PREC="ieee" if dtype == torch.float32 else "tf32x3",
                      wy="solve", inverse="rows", wy_warps=2)
    return dataclasses.replace(plan, **overrides) if overrides else plan


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, n, e] with unit stride over e (views of a projection are fine)."""
    return x if x.stride(3) == 1 else x.contiguous()


def triton_dual_delta_rule(q, k, v, beta, g_fast, g_slow, mix, state0, out=None,
                           plan: LaunchPlan | None = None):
    """Launch the kernels (see the module docstring) as ``plan`` says (default
    :func:`launch_plan`). ``out``: optional preallocated ``(o [B, T, n, dv] q.dtype,
    stateT [B, n, 2, d, dv] fp32)``."""
    B, T, n, d = q.shape
    dv = v.shape[3]
    q, k, v = _rows(q), _rows(k), _rows(v)
    beta, g_fast, g_slow, mix = (x.contiguous() for x in (beta, g_fast, g_slow, mix))
    state0 = state0.float().contiguous()
    if out is None:
        out = (torch.empty(B, T, n, dv, dtype=q.dtype, device=q.device),
               torch.empty(B, n, 2, d, dv, dtype=torch.float32, device=q.device))
    o, state = out
    if plan is None:
        plan = launch_plan(T, d, dv, q.dtype)
    if q.is_cuda and plan.design == "split" and plan.half_dots(q.dtype):
        # seen on an H100 (triton 3.6, bf16, 2 and 4 warps); the interpreter runs it correctly
        raise ValueError("dual_delta_rule: the split design's input-dtype dots "
                         "(dot_operands='input') end in an illegal memory access on the GPU "
                         "(cause not found); use dot_operands='fp32'")
    strides = lambda x: (x.stride(0), x.stride(1), x.stride(2))   # noqa: E731
    if plan.design == "recurrent":
        _recurrent((B * n, triton.cdiv(dv, plan.BV)),
                   (q, k, v, beta, g_fast, g_slow, mix, state0, o, state, T, n, d, dv,
                    *strides(q), *strides(k), *strides(v), *strides(o)),
                   (plan.BD, plan.BV), num_warps=plan.num_warps)
        return o, state
    n_chunks = triton.cdiv(T, BT)
    Tp = n_chunks * BT
    ws = plan.workspace_dtype(q.dtype)
    w = torch.empty(B, n, 2, Tp, d, dtype=ws, device=q.device)
    u = torch.empty(B, n, 2, Tp, dv, dtype=ws, device=q.device)
    gam = torch.empty(B, n, 2, Tp, dtype=torch.float32, device=q.device)
    if plan.wy == "solve-apply":
        # (scratch only for the "rows" substitution: the other forms never touch it)
        scratch = torch.empty(B * n * 2 * n_chunks * BT * BT if plan.inverse == "rows" else 1,
                              dtype=torch.float32, device=q.device)
        _solve_apply((n_chunks, B * n, 2),
                     (k, v, beta, g_fast, g_slow, scratch, w, u, gam, T, n, d, dv, *strides(k),
                      *strides(v), Tp, n_chunks),
                     (BT, plan.BD, plan.BDV, plan.PREC, plan.INV_PREC, plan.inverse,
                      plan.kk_input(q.dtype)), num_warps=plan.wy_warps)
    elif plan.wy == "solve":
        tinv = torch.empty(B * n * 2 * n_chunks * BT * BT, dtype=plan.tinv_dtype(q.dtype),
                           device=q.device)
        _solve((n_chunks, B * n, 2),
               (k, beta, g_fast, g_slow, tinv, gam, T, n, d, *strides(k), Tp, n_chunks),
               (BT, plan.BD, plan.PREC, plan.INV_PREC, plan.inverse, plan.kk_input(q.dtype)),
               num_warps=plan.wy_warps)
        _apply((n_chunks, B * n, 2),
               (k, v, beta, tinv, gam, w, u, T, n, d, dv, *strides(k), *strides(v), Tp, n_chunks),
               (BT, plan.BD, plan.BDV, plan.PREC), num_warps=4)
    else:
        _wy((n_chunks, B * n),
            (k, v, beta, g_fast, g_slow, w, u, gam, T, n, d, dv, *strides(k), *strides(v), Tp),
            (BT, plan.BD, plan.BDV, plan.PREC, plan.INV_PREC, plan.inverse),
            num_warps=plan.wy_warps)
    if plan.design == "fused":
        _chunk((B * n, triton.cdiv(dv, plan.BV)),
               (q, k, w, u, gam, mix, state0, o, state, T, n, d, dv, *strides(q), *strides(k),
                *strides(o), Tp),
               (BT, plan.BD, plan.BV, plan.PREC), num_warps=plan.num_warps)
        return o, state
    # split: the entering state of every chunk, per memory; u becomes V' in place
    h = torch.empty(B, n, 2, n_chunks, d, dv, dtype=ws, device=q.device)
    mems = plan.mems_per_program
    stages = {} if plan.state_stages is None else {"num_stages": plan.state_stages}
    _state((triton.cdiv(dv, plan.BV), B * n, 2 // mems),
           (k, w, u, gam, state0, h, state, T, n, d, dv, *strides(k), Tp, n_chunks),
           (BT, plan.BD, plan.BV, mems, plan.PREC, plan.half_dots(q.dtype)), num_warps=plan.num_warps,
           **stages)
    _output((triton.cdiv(dv, plan.BV_OUT), n_chunks, B * n),
            (q, k, u, gam, h, mix, o, T, n, d, dv, *strides(q), *strides(k), *strides(o), Tp,
             n_chunks),
            (BT, plan.BD, plan.BV_OUT, plan.PREC, plan.half_dots(q.dtype)), num_warps=plan.out_warps)
    return o, state
