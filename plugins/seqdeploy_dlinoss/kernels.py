"""Triton kernels for ``linoss_scan``: one pass over HBM, fp32 state.

Per oscillator p the transition ``M`` (2x2, real) is time-invariant and the real and
imaginary parts share it, so each (b, p) carries two independent 2-vectors ``w = (z, x)``.
Inputs ``b_re, b_im [B, T, P]`` (fp32/fp16/bf16, unit stride over P), outputs ``x_re, x_im``
alike, states ``[B, P, 4]`` fp32; P, the contiguous axis, goes across a warp's lanes, so
every load and store of one time step is one coalesced row.

Three designs, chosen by :func:`choose` or named in a :class:`LaunchPlan`: two ways to walk a
tile of ``BLOCK_T`` steps by ``BLOCK_P`` oscillators, on two grids:

- the scan tile (``chunk``, ``rows``): ``tl.associative_scan`` over the affine maps
  ``w -> M w + c b_t`` (eight fp32 values per element: the cumulative power of M relative
  to the tile, never a negative power, and the sums), with M rounded once to fp32 and the
  state entering the tile folded into its first step (``_tile_scan``);
- the step loop (``chunk_loop``): each thread walks its oscillators' steps in
  order in registers, the tile held as ``BLOCK_T`` vectors of ``[BLOCK_P]`` loaded before
  any step runs (``_load_tile``), in the model's IMEX form ``z' = m00 z + m01 x + c0 b``,
  ``x' = x + dt z'`` (``_imex_step``: three FMAs per part, no matrix products);

- grid over chunks (``chunk``, ``chunk_loop``; few rows, e.g. B=32, P=128): (chunk of T,
  batch row, block of P), one tile per program, chunk-major. The tile is walked from a zero
  state and that aggregate published at once; the state entering the chunk comes by
  decoupled look-back (back over the flags of earlier chunks to the latest that has
  published its inclusive end state, then forward from that state over the aggregates in
  between, ``h <- Q h + agg`` with ``Q = M^BLOCK_T`` applied as ``a h + b (M h)``; the
  first chunk starts from ``state0``; ``chunk_loop`` reads the flags and the aggregates
  ``LaunchPlan.window`` chunks at a time); then the tile, still in registers, is walked again
  from that state, which gives the outputs and this chunk's inclusive state. A chunk only
  waits on programs with smaller ids, which the hardware (and the interpreter, which runs
  ids in order) has already started;
- grid over rows (``rows``; many rows): (batch row, block of P); each program walks its
  rows' whole sequence tile by tile, the next tile's loads issued before the current one is
  walked. No look-back traffic at all. (The step loop on this grid was measured several
  times slower than the scan tile at every size and was dropped.)

HBM traffic is one read of ``b_re, b_im`` and one write of ``x_re, x_im`` (plus ``state0``,
``stateT`` and, for the chunk grids, 8 fp32 per (chunk, b, p) of look-back carries). Padded
time steps of a last partial tile leave the state alone (scan: ``M = I, c = 0``; loop: a
select), so the tile's end state is the state at T-1.

Error growth with T (see ``ops.py``): all designs make the errors of an fp32 step loop,
with M's entries computed in float64 and rounded once: they grow about linearly in T where
M's eigenvalues are well separated, and faster (up to T^2, until the damping time
``1/(1 - |lambda|)``) where they nearly coincide at the band's edges. There the scan tile's
per-step form (``m11 = 1 - dt^2 A/S`` rounded) has kappa = rel-L2 / (u T) about 32 at
T = 16384 with ``dt G = 1e-6``; the loop's IMEX form never rounds ``m11`` and measures
like the fp32 step loop (``tests/test_dlinoss_scan.py``). A look-back that crosses k
unfinished chunks applies Q k times in place of k BLOCK_T steps, each application as
accurate as those steps (``a, b`` squared in float64 and rounded once, no power of Q ever
formed), so how far the look-backs walk (which depends on the GPU's scheduling) does not
change this.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher


@triton.jit
def _compose(a00, a01, a10, a11, az_r, ax_r, az_i, ax_i,
             b00, b01, b10, b11, bz_r, bx_r, bz_i, bx_i):
    # apply (a) first, then (b):  w -> Mb (Ma w + fa) + fb, for the real and imaginary w
    return (b00 * a00 + b01 * a10, b00 * a01 + b01 * a11,
            b10 * a00 + b11 * a10, b10 * a01 + b11 * a11,
            b00 * az_r + b01 * ax_r + bz_r, b10 * az_r + b11 * ax_r + bx_r,
            b00 * az_i + b01 * ax_i + bz_i, b10 * az_i + b11 * ax_i + bx_i)


@triton.jit
def _transition(a_ptr, g_ptr, dt_ptr, offs_p, mask_p):
    """M and c per oscillator, computed in float64 and rounded once to fp32 (padded
    oscillators get M = I, c = 0). Near the band's edges M has a nearly repeated eigenvalue
    on the unit circle, where the solution is most sensitive to M's entries: ``1 - dt^2 A/S``
    evaluated in fp32 costs about 3x the error of the fp32 step loop at T = 512."""
    A = tl.load(a_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    G = tl.load(g_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    dt = tl.load(dt_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    inv = 1.0 / (1.0 + dt * G)
    return ((inv).to(tl.float32), (-dt * A * inv).to(tl.float32), (dt * inv).to(tl.float32),
            (1.0 - dt * dt * A * inv).to(tl.float32), (dt * inv).to(tl.float32),
            (dt * dt * inv).to(tl.float32))


@triton.jit
def _last(v, BLOCK_T: tl.constexpr):
    """The last column of a [BLOCK_P, BLOCK_T] tile."""
    last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, :]
    return tl.sum(tl.where(last, v, 0.0), axis=1)


@triton.jit
def _last4(zr, zi, xr, xi, BLOCK_T: tl.constexpr):
    """:func:`_last` of the four state tiles: the state after the tile's last step."""
    return _last(zr, BLOCK_T), _last(zi, BLOCK_T), _last(xr, BLOCK_T), _last(xi, BLOCK_T)


@triton.jit
def _tile_scan(b_r, b_i, valid, m00, m01, m10, m11, c0, c1, h_zr, h_zi, h_xr, h_xi):
    """Scan one tile from the state ``h`` entering it: ``(M^(t+1), w_t)`` per element.

    ``h`` is folded into the first step's offset (``c b_0 + M h``), so ``w_t`` comes out of
    the scan's own left-to-right composition, which within a thread is the step loop: no
    power of M multiplies the state (near the band's edges M is far from normal and
    ``M^k h`` cancels heavily, so ``local + M^(t+1) h`` would lose digits). Steps outside
    ``valid`` are the identity map, so the scan stops changing after T-1."""
    one = tl.where(valid, 1.0, 0.0)
    zero = tl.zeros(b_r.shape, dtype=tl.float32)
    first = (tl.arange(0, b_r.shape[1]) == 0)[None, :]
    M00 = tl.where(valid, m00[:, None] + zero, 1.0)
    M01 = m01[:, None] * one
    M10 = m10[:, None] * one
    M11 = tl.where(valid, m11[:, None] + zero, 1.0)
    k0 = c0[:, None] * one
    k1 = c1[:, None] * one
    fz_r = k0 * b_r + tl.where(first, (m00 * h_zr + m01 * h_xr)[:, None], 0.0)
    fx_r = k1 * b_r + tl.where(first, (m10 * h_zr + m11 * h_xr)[:, None], 0.0)
    fz_i = k0 * b_i + tl.where(first, (m00 * h_zi + m01 * h_xi)[:, None], 0.0)
    fx_i = k1 * b_i + tl.where(first, (m10 * h_zi + m11 * h_xi)[:, None], 0.0)
    return tl.associative_scan((M00, M01, M10, M11, fz_r, fx_r, fz_i, fx_i), 1, _compose)


@triton.jit
def _power_coefficients(tr, det, LOG2_T: tl.constexpr):
    """``(a, b)`` fp32 with ``X^(2^LOG2_T) = a I + b X`` for a 2x2 ``X`` of trace ``tr`` and
    determinant ``det`` (float64): ``LOG2_T`` squarings of ``a I + b X`` in float64, using
    ``X^2 = tr X - det I``, rounded once at the end."""
    a = tl.zeros_like(tr)
    b = a + 1.0
    for _ in tl.static_range(LOG2_T):
        a, b = a * a - b * b * det, 2.0 * a * b + b * b * tr
    return a.to(tl.float32), b.to(tl.float32)


@triton.jit
def _tile_power(m00, m01, m10, m11, LOG2_T: tl.constexpr):
    """``(a, b)`` with ``M^(2^LOG2_T) = a I + b M`` (Cayley-Hamilton: ``M^2 = tr M - det I``)
    for the fp32 M the tiles apply, squared in float64 and rounded once to fp32.

    Not the matrix ``Q = M^BLOCK_T`` itself: near the band's edge at -1, M is far from normal
    and Q's entries are ~50 with ``det Q ~ 1`` left after cancelling them, so rounding Q (and
    every fp32 product of Qs) moves its eigenvalues off M's by ~u |Q|^2 per chunk, an error
    that compounds over every chunk the look-back crosses. A polynomial in M keeps M's
    eigenvectors exactly; rounding ``a`` and ``b`` moves an eigenvalue ``a + b lambda`` by
    ~u (|a| + |b|), with ``|a|, |b| <= BLOCK_T`` however close the eigenvalues are."""
    t00 = m00.to(tl.float64)
    t11 = m11.to(tl.float64)
    tr = t00 + t11
    det = t00 * t11 - m01.to(tl.float64) * m10.to(tl.float64)
    return _power_coefficients(tr, det, LOG2_T)


@triton.jit
def _store_state(ptr, b, offs_p, mask_p, P, zr, zi, xr, xi):
    base = ptr + b * P * 4 + offs_p * 4
    tl.store(base, zr, mask=mask_p)
    tl.store(base + 1, zi, mask=mask_p)
    tl.store(base + 2, xr, mask=mask_p)
    tl.store(base + 3, xi, mask=mask_p)


@triton.jit
def _load_state(ptr, b, offs_p, mask_p, P):
    """``(z_re, z_im, x_re, x_im)`` of rows ``b`` of a ``[B, P, 4]`` fp32 state."""
    base = ptr + b * P * 4 + offs_p * 4
    return (tl.load(base, mask=mask_p, other=0.0), tl.load(base + 1, mask=mask_p, other=0.0),
            tl.load(base + 2, mask=mask_p, other=0.0), tl.load(base + 3, mask=mask_p, other=0.0))


@triton.jit
def _load_planes(src, plane, mask_p):
    """Four consecutive carry planes at ``src`` (``plane`` apart), read past the caches:
    other programs write them while this one runs."""
    return (tl.load(src, mask=mask_p, other=0.0, volatile=True),
            tl.load(src + plane, mask=mask_p, other=0.0, volatile=True),
            tl.load(src + 2 * plane, mask=mask_p, other=0.0, volatile=True),
            tl.load(src + 3 * plane, mask=mask_p, other=0.0, volatile=True))


@triton.jit
def _publish(dst, plane, mask_p, zr, zi, xr, xi, flag, value):
    """Store four carry planes at ``dst`` and then raise ``flag`` to ``value`` (1: the
    chunk's aggregate, 2: its inclusive end state)."""
    tl.store(dst, zr, mask=mask_p)
    tl.store(dst + plane, zi, mask=mask_p)
    tl.store(dst + 2 * plane, xr, mask=mask_p)
    tl.store(dst + 3 * plane, xi, mask=mask_p)
    tl.debug_barrier()   # every thread's values are stored before the flag is raised
    tl.atomic_xchg(flag, value, sem="release")


@triton.jit
def _look_back(carry_ptr, flag_ptr, s0_ptr, agg_zr, agg_zi, agg_xr, agg_xi,
               m00, m01, m10, m11, qa, qb, chunk, slot, n_slots, b, offs_p, mask_p, B, P,
               publish, BLOCK_P: tl.constexpr):
    """The state (z_re, z_im, x_re, x_im) entering ``chunk``, by decoupled look-back.

    Publishes this chunk's aggregate (its scan from a zero state) at once, flag 1; the
    caller publishes the inclusive end state with :func:`_publish_inclusive`, flag 2.
    First back over the flags alone, to the latest earlier chunk j with an inclusive state
    (waiting on chunks that have published nothing yet); then forward from that state over
    the aggregates of chunks j+1 .. chunk-1, Horner's way: ``h <- Q h + agg``, with
    ``Q h = a h + b (M h)`` (:func:`_tile_power`). So the state crosses each skipped chunk
    by one application of Q, as the step loop would cross it by BLOCK_T steps of M, and no
    power of Q is ever formed (the products ``Q^k``, k up to the walk's length, lost up to
    ~u |Q|^2 each at the band's edge at -1: rel-L2 0.42 at T = 16384 on an H100). Per chunk
    the carry buffer holds eight planes of [B, P]: aggregate z_re, z_im, x_re, x_im, then
    the inclusive ones."""
    state = b * P + offs_p
    plane = B * P
    mine = carry_ptr + chunk.to(tl.int64) * 8 * plane
    my_flag = flag_ptr + chunk * n_slots + slot
    if chunk == 0:
        h_zr, h_zi, h_xr, h_xi = _load_state(s0_ptr, b, offs_p, mask_p, P)
    else:
        if publish:
            _publish(mine + state, plane, mask_p, agg_zr, agg_zi, agg_xr, agg_xi, my_flag, 1)
        # 1. back over the flags: 0 nothing yet (wait), 1 aggregate (go on), 2 inclusive (stop)
        j = chunk - 1
        flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
        while flag != 2:
            j = j - (flag == 1).to(tl.int32)
            flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
        # 2. forward from chunk j's inclusive state over the later chunks' aggregates
        src = carry_ptr + j.to(tl.int64) * 8 * plane + 4 * plane + state
        h_zr, h_zi, h_xr, h_xi = _load_planes(src, plane, mask_p)
        src = src + 4 * plane       # chunk j + 1's aggregate
        for _ in range(j + 1, chunk):
            v_zr, v_zi, v_xr, v_xi = _load_planes(src, plane, mask_p)
            mz_r = m00 * h_zr + m01 * h_xr
            mx_r = m10 * h_zr + m11 * h_xr
            mz_i = m00 * h_zi + m01 * h_xi
            mx_i = m10 * h_zi + m11 * h_xi
            h_zr = qa * h_zr + qb * mz_r + v_zr
            h_xr = qa * h_xr + qb * mx_r + v_xr
            h_zi = qa * h_zi + qb * mz_i + v_zi
            h_xi = qa * h_xi + qb * mx_i + v_xi
            src += 8 * plane
    return h_zr, h_zi, h_xr, h_xi


@triton.jit
def _publish_inclusive(carry_ptr, flag_ptr, chunk, slot, n_slots, b, offs_p, mask_p, B, P,
                       zr, zi, xr, xi):
    plane = B * P
    mine = carry_ptr + chunk.to(tl.int64) * 8 * plane + b * P + offs_p
    _publish(mine + 4 * plane, plane, mask_p, zr, zi, xr, xi, flag_ptr + chunk * n_slots + slot, 2)


@triton.jit
def _linoss_chunk_kernel(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                         carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t,
                         BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, LOG2_T: tl.constexpr):
    pid = tl.program_id(0)
    n_slots = B * tl.cdiv(P, BLOCK_P)
    _linoss_chunk(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                  carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t, pid // n_slots,
                  pid % n_slots, False, BLOCK_T, BLOCK_P, LOG2_T)


@triton.jit
def _linoss_chunk(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                  carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t, chunk, slot, hold,
                  BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, LOG2_T: tl.constexpr):
    """One program of the chunk kernel: ``chunk`` of T for ``slot`` (batch row, block of P).
    ``hold``: keep the inclusive state unpublished, as when this chunk is still running while
    later ones look back (the kernel passes False; the CPU tests, whose interpreter runs
    programs in order, hold some back so that the look-back walks)."""
    n_pb = tl.cdiv(P, BLOCK_P)
    n_slots = B * n_pb
    b = (slot // n_pb).to(tl.int64)
    offs_p = (slot % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    m00, m01, m10, m11, c0, c1 = _transition(a_ptr, g_ptr, dt_ptr, offs_p, mask_p)
    t0 = chunk * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    valid = (offs_t < T)[None, :]
    mask = mask_p[:, None] & valid
    b_off = b * sb_b + offs_t[None, :].to(tl.int64) * sb_t + offs_p[:, None]
    b_r = tl.load(br_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    b_i = tl.load(bi_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    zero = tl.zeros((BLOCK_P,), dtype=tl.float32)
    # 1. the tile's aggregate: its scan from a zero state
    _, _, _, _, s_zr, s_xr, s_zi, s_xi = _tile_scan(b_r, b_i, valid, m00, m01, m10, m11, c0,
                                                    c1, zero, zero, zero, zero)
    agg_zr, agg_zi, agg_xr, agg_xi = _last4(s_zr, s_zi, s_xr, s_xi, BLOCK_T)
    qa, qb = _tile_power(m00, m01, m10, m11, LOG2_T)
    # 2. the state entering the chunk
    publish = t0 + BLOCK_T < T
    h_zr, h_zi, h_xr, h_xi = _look_back(carry_ptr, flag_ptr, s0_ptr, agg_zr, agg_zi, agg_xr,
                                        agg_xi, m00, m01, m10, m11, qa, qb, chunk, slot,
                                        n_slots, b, offs_p, mask_p, B, P, publish, BLOCK_P)
    # 3. the tile again from that state: the outputs and the inclusive end state
    _, _, _, _, w_zr, w_xr, w_zi, w_xi = _tile_scan(b_r, b_i, valid, m00, m01, m10, m11, c0,
                                                    c1, h_zr, h_zi, h_xr, h_xi)
    end_zr, end_zi, end_xr, end_xi = _last4(w_zr, w_zi, w_xr, w_xi, BLOCK_T)
    if publish:
        if hold == 0:
            _publish_inclusive(carry_ptr, flag_ptr, chunk, slot, n_slots, b, offs_p, mask_p,
                               B, P, end_zr, end_zi, end_xr, end_xi)
    else:
        _store_state(sT_ptr, b, offs_p, mask_p, P, end_zr, end_zi, end_xr, end_xi)
    x_off = b * sx_b + offs_t[None, :].to(tl.int64) * sx_t + offs_p[:, None]
    tl.store(xr_ptr + x_off, w_xr.to(xr_ptr.dtype.element_ty), mask=mask)
    tl.store(xi_ptr + x_off, w_xi.to(xi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linoss_rows_kernel(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                        B, T, P, sb_b, sb_t, sx_b, sx_t,
                        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n_pb = tl.cdiv(P, BLOCK_P)
    b = (pid // n_pb).to(tl.int64)
    offs_p = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    m00, m01, m10, m11, c0, c1 = _transition(a_ptr, g_ptr, dt_ptr, offs_p, mask_p)
    h_zr, h_zi, h_xr, h_xi = _load_state(s0_ptr, b, offs_p, mask_p, P)
    offs_tt = tl.arange(0, BLOCK_T)
    b_base = b * sb_b + offs_p[:, None]
    x_base = b * sx_b + offs_p[:, None]
    mask0 = mask_p[:, None] & (offs_tt < T)[None, :]
    nxt_r = tl.load(br_ptr + b_base + offs_tt[None, :].to(tl.int64) * sb_t, mask=mask0, other=0.0)
    nxt_i = tl.load(bi_ptr + b_base + offs_tt[None, :].to(tl.int64) * sb_t, mask=mask0, other=0.0)
    for t0 in tl.range(0, T, BLOCK_T):
        offs_t = t0 + offs_tt
        valid = (offs_t < T)[None, :]
        b_r = nxt_r.to(tl.float32)
        b_i = nxt_i.to(tl.float32)
        # the next tile's load goes out before this tile's stores (which it could alias)
        offs_n = offs_t + BLOCK_T
        mask_n = mask_p[:, None] & (offs_n < T)[None, :]
        n_off = b_base + offs_n[None, :].to(tl.int64) * sb_t
        nxt_r = tl.load(br_ptr + n_off, mask=mask_n, other=0.0)
        nxt_i = tl.load(bi_ptr + n_off, mask=mask_n, other=0.0)
        _, _, _, _, w_zr, w_xr, w_zi, w_xi = _tile_scan(b_r, b_i, valid, m00, m01, m10, m11,
                                                        c0, c1, h_zr, h_zi, h_xr, h_xi)
        x_off = x_base + offs_t[None, :].to(tl.int64) * sx_t
        mask = mask_p[:, None] & valid
        tl.store(xr_ptr + x_off, w_xr.to(xr_ptr.dtype.element_ty), mask=mask)
        tl.store(xi_ptr + x_off, w_xi.to(xi_ptr.dtype.element_ty), mask=mask)
        h_zr, h_zi, h_xr, h_xi = _last4(w_zr, w_zi, w_xr, w_xi, BLOCK_T)
    _store_state(sT_ptr, b, offs_p, mask_p, P, h_zr, h_zi, h_xr, h_xi)


@triton.jit
def _linoss_scan_aot_kernel(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, B, T, P,
                            xr_ptr, xi_ptr, sT_ptr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """TensorRT's AOT entry (``seqdeploy.trt.aot``): the ``rows`` design (one launch, no
    carry or flag buffers, unlike the chunk designs) with its parameters in TensorRT's order
    (inputs, scalars, outputs) on dense tensors (``b, x [B, T, P]``, states ``[B, P, 4]``)."""
    _linoss_rows_kernel(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                        B, T, P, T * P, P, T * P, P, BLOCK_T, BLOCK_P)


# --- the step-loop design: one oscillator per thread, T walked in order in its registers -----


@triton.jit
def _imex_transition(a_ptr, g_ptr, dt_ptr, offs_p, mask_p):
    """``(m00, m01, dt, c0)`` fp32 ``[BLOCK_P]``: the IMEX step as the loop design applies it,
    ``z' = m00 z + m01 x + c0 b``, ``x' = x + dt z'`` (``m00 = 1/S``, ``m01 = -dt A/S``,
    ``c0 = dt/S``, from float64 and rounded once; padded oscillators get 0, a harmless
    map). ``x'`` is formed from ``z'`` as the model's update does, not as ``m10 z + m11 x``:
    ``m11 = 1 - dt^2 A/S`` rounded to fp32 loses the low digits of ``dt^2 A/S``, which near
    the band's edges is the part of M the solution is most sensitive to."""
    A = tl.load(a_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    G = tl.load(g_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    dt32 = tl.load(dt_ptr + offs_p, mask=mask_p, other=0.0)
    dt = dt32.to(tl.float64)
    inv = 1.0 / (1.0 + dt * G)
    return (inv.to(tl.float32), (-dt * A * inv).to(tl.float32), dt32, (dt * inv).to(tl.float32))


@triton.jit
def _imex_step(m00, m01, dt, c0, z, x, b):
    z = m00 * z + m01 * x + c0 * b
    return z, x + dt * z


@triton.jit
def _imex_power(m00, m01, dt, LOG2_T: tl.constexpr):
    """``(a, b)`` with ``E^(2^LOG2_T) = a I + b E`` for the step map ``E`` the loop design
    applies, ``E = [[m00, m01], [dt m00, 1 + dt m01]]`` in the fp32 coefficients (so
    ``tr E = m00 + 1 + dt m01``, ``det E = m00``), squared in float64 and rounded once; the
    reasons are :func:`_tile_power`'s. ``E h`` itself is :func:`_imex_step` with ``b = 0``."""
    t00 = m00.to(tl.float64)
    tr = t00 + 1.0 + dt.to(tl.float64) * m01.to(tl.float64)
    det = t00
    return _power_coefficients(tr, det, LOG2_T)


@triton.jit
def _load_tile(ptr, stride_t, n_valid, mask_p, BLOCK_T: tl.constexpr):
    """``BLOCK_T`` fp32 ``[BLOCK_P]`` vectors: steps ``0 .. BLOCK_T-1`` from ``ptr`` (steps
    ``>= n_valid`` read as 0). All the loads are issued before any use, so a thread has
    ``2 BLOCK_T`` of them in flight per plane pair."""
    lim = tl.where(mask_p, n_valid, 0)     # (a vector: the interpreter masks with no scalar)
    vals = ()
    for t in tl.static_range(BLOCK_T):
        vals = vals + (tl.load(ptr + t * stride_t, mask=t < lim,
                               other=0.0).to(tl.float32),)
    return vals


@triton.jit
def _aggregate(b_r, b_i, m00, m01, dt, c0, BLOCK_T: tl.constexpr):
    """The end state of a full tile from a zero state: ``(z_re, z_im, x_re, x_im)``."""
    zr = c0 * b_r[0]
    zi = c0 * b_i[0]
    xr = dt * zr
    xi = dt * zi
    for t in tl.static_range(1, BLOCK_T):
        zr, xr = _imex_step(m00, m01, dt, c0, zr, xr, b_r[t])
        zi, xi = _imex_step(m00, m01, dt, c0, zi, xi, b_i[t])
    return zr, zi, xr, xi


@triton.jit
def _walk_tile(b_r, b_i, m00, m01, dt, c0, zr, zi, xr, xi, xr_ptr, xi_ptr, stride_t, n_valid,
               mask_p, BLOCK_T: tl.constexpr):
    """The step loop over one tile from the state entering it, storing ``x_re, x_im`` per
    step (one coalesced ``[BLOCK_P]`` store each, steps ``>= n_valid`` not stored); returns
    the state after all ``BLOCK_T`` steps, which is the tile's end state only where the tile
    is full (a partial tile's comes from :func:`_walk_tail`). One unrolled walk, not a
    masked and an unmasked one: Triton's coalescing pass costs about the square of the
    kernel's memory operations, and a second walk doubled the compile time. The store mask
    is ``mask_p`` and a scalar test (a per-lane ``t < n_valid`` vector cost ptxas 38 more
    registers)."""
    for t in tl.static_range(BLOCK_T):
        zr, xr = _imex_step(m00, m01, dt, c0, zr, xr, b_r[t])
        zi, xi = _imex_step(m00, m01, dt, c0, zi, xi, b_i[t])
        live = tl.where(n_valid > t, mask_p, False)
        tl.store(xr_ptr + t * stride_t, xr.to(xr_ptr.dtype.element_ty), mask=live)
        tl.store(xi_ptr + t * stride_t, xi.to(xi_ptr.dtype.element_ty), mask=live)
    return zr, zi, xr, xi


@triton.jit
def _walk_tail(br_ptr, bi_ptr, stride_t, n_valid, mask_p, m00, m01, dt, c0, zr, zi, xr, xi):
    """The state after the first ``n_valid`` steps of a partial tile (the sequence's last,
    which publishes nothing): a runtime loop over the steps, reading the inputs again (the
    tile's own loads moments ago, so cache hits) rather than a second unrolled walk."""
    for t in range(0, n_valid):
        b_r = tl.load(br_ptr + t * stride_t, mask=mask_p, other=0.0).to(tl.float32)
        b_i = tl.load(bi_ptr + t * stride_t, mask=mask_p, other=0.0).to(tl.float32)
        zr, xr = _imex_step(m00, m01, dt, c0, zr, xr, b_r)
        zi, xi = _imex_step(m00, m01, dt, c0, zi, xi, b_i)
    return zr, zi, xr, xi


@triton.jit
def _loop_look_back(carry_ptr, flag_ptr, s0_ptr, agg_zr, agg_zi, agg_xr, agg_xi,
                    m00, m01, dt, qa, qb, chunk, slot, n_slots, b, offs_p, mask_p, B, P,
                    publish, WINDOW: tl.constexpr):
    """:func:`_look_back` for the loop design's step map E (:func:`_imex_power`): the same
    flags, carry planes and forward walk ``h <- a h + b (E h) + agg``.

    ``WINDOW = 1`` reads the flags and then the aggregates one at a time, each read waiting
    on the one before (a walk across k chunks costs about 2k L2 round trips, which the first
    wave of programs, all walking back to chunk 0, pays in full). ``WINDOW > 1`` reads the
    flags of ``WINDOW`` chunks at once (:func:`_window_back`) and then the aggregates
    ``WINDOW`` at a time, all loads of a group in flight together, combined in order in
    registers: the same arithmetic in the same order, about 2k / WINDOW round trips."""
    state = b * P + offs_p
    plane = B * P
    mine = carry_ptr + chunk.to(tl.int64) * 8 * plane
    if chunk == 0:
        h_zr, h_zi, h_xr, h_xi = _load_state(s0_ptr, b, offs_p, mask_p, P)
    else:
        if publish:
            _publish(mine + state, plane, mask_p, agg_zr, agg_zi, agg_xr, agg_xi,
                     flag_ptr + chunk * n_slots + slot, 1)
        if WINDOW == 1:
            j = chunk - 1
            flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
            while flag != 2:
                j = j - (flag == 1).to(tl.int32)
                flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
        else:
            j = _window_back(flag_ptr, chunk, slot, n_slots, WINDOW)
        src = carry_ptr + j.to(tl.int64) * 8 * plane + 4 * plane + state
        h_zr, h_zi, h_xr, h_xi = _load_planes(src, plane, mask_p)
        src = src + 4 * plane       # chunk j + 1's aggregate
        for i0 in range(j + 1, chunk, WINDOW):
            # WINDOW aggregates' loads in flight at once, then applied in order
            v_zr = ()
            v_zi = ()
            v_xr = ()
            v_xi = ()
            lim = tl.where(mask_p, chunk - i0, 0)     # (a vector mask, as in _load_tile)
            for g in tl.static_range(WINDOW):
                m = g < lim
                at = src + g * 8 * plane
                v_zr = v_zr + (tl.load(at, mask=m, other=0.0, volatile=True),)
                v_zi = v_zi + (tl.load(at + plane, mask=m, other=0.0, volatile=True),)
                v_xr = v_xr + (tl.load(at + 2 * plane, mask=m, other=0.0, volatile=True),)
                v_xi = v_xi + (tl.load(at + 3 * plane, mask=m, other=0.0, volatile=True),)
            for g in tl.static_range(WINDOW):
                live = g < lim
                ez_r, ex_r = _imex_step(m00, m01, dt, 0.0, h_zr, h_xr, 0.0)
                ez_i, ex_i = _imex_step(m00, m01, dt, 0.0, h_zi, h_xi, 0.0)
                h_zr = tl.where(live, qa * h_zr + qb * ez_r + v_zr[g], h_zr)
                h_xr = tl.where(live, qa * h_xr + qb * ex_r + v_xr[g], h_xr)
                h_zi = tl.where(live, qa * h_zi + qb * ez_i + v_zi[g], h_zi)
                h_xi = tl.where(live, qa * h_xi + qb * ex_i + v_xi[g], h_xi)
            src += WINDOW * 8 * plane
    return h_zr, h_zi, h_xr, h_xi


@triton.jit
def _window_back(flag_ptr, chunk, slot, n_slots, WINDOW: tl.constexpr):
    """The latest chunk j < ``chunk`` whose inclusive state is published (flag 2) with every
    chunk after it having published at least its aggregate (flag 1), reading the flags of
    ``WINDOW`` chunks at a time: a window with an unpublished chunk after its latest
    inclusive one is read again (those chunks started earlier and will publish); a window
    of aggregates only moves the window back. Chunk 0 always ends the search (it publishes
    its inclusive state and nothing else). Flags only ever rise (0, 1, 2), so a window
    found clear stays clear."""
    w = tl.arange(0, WINDOW)
    zero = tl.zeros((WINDOW,), dtype=tl.int32)
    hi = chunk
    found = chunk * 0 - 1
    while found < 0:
        idx = hi - WINDOW + w
        f = tl.atomic_add(flag_ptr + tl.maximum(idx, 0) * n_slots + slot, zero, sem="acquire")
        f = tl.where(idx >= 0, f, 1)          # (before chunk 0: never reached, see above)
        last = tl.max(tl.where(f == 2, idx, -1), axis=0)
        waiting = tl.sum(((f == 0) & (idx > last)).to(tl.int32), axis=0)
        found = tl.where(waiting == 0, last, -1)
        hi = tl.where((waiting == 0) & (last < 0), hi - WINDOW, hi)
    return found


@triton.jit
def _linoss_chunk_loop_kernel(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr,
                              sT_ptr, carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t,
                              BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                              LOG2_T: tl.constexpr, WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    n_slots = B * tl.cdiv(P, BLOCK_P)
    _linoss_chunk_loop(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                       carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t, pid // n_slots,
                       pid % n_slots, False, BLOCK_T, BLOCK_P, LOG2_T, WINDOW)


@triton.jit
def _linoss_chunk_loop(br_ptr, bi_ptr, a_ptr, g_ptr, dt_ptr, s0_ptr, xr_ptr, xi_ptr, sT_ptr,
                       carry_ptr, flag_ptr, B, T, P, sb_b, sb_t, sx_b, sx_t, chunk, slot, hold,
                       BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, LOG2_T: tl.constexpr,
                       WINDOW: tl.constexpr):
    """One program of the ``chunk_loop`` design: ``chunk`` of T for ``slot`` (batch row,
    block of P); ``hold`` as in :func:`_linoss_chunk`, ``WINDOW`` :func:`_loop_look_back`'s.
    The tile is ``BLOCK_T`` vectors of
    ``[BLOCK_P]`` (one oscillator per thread lane, P the contiguous axis, so each step's
    load and store is one coalesced row). Its aggregate is the step loop from a zero state,
    the state entering it comes by look-back, and its outputs are the step loop again from
    that state: 2 x 3 FMAs per element per pass, no matrix products, no scan network."""
    n_pb = tl.cdiv(P, BLOCK_P)
    n_slots = B * n_pb
    b = (slot // n_pb).to(tl.int64)
    offs_p = (slot % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    m00, m01, dt, c0 = _imex_transition(a_ptr, g_ptr, dt_ptr, offs_p, mask_p)
    t0 = chunk * BLOCK_T
    n_valid = T - t0
    b_off = b * sb_b + t0.to(tl.int64) * sb_t + offs_p
    b_r = _load_tile(br_ptr + b_off, sb_t, n_valid, mask_p, BLOCK_T)
    b_i = _load_tile(bi_ptr + b_off, sb_t, n_valid, mask_p, BLOCK_T)
    publish = t0 + BLOCK_T < T
    # 1. the aggregate (used only when published: a full tile that is not the last)
    agg_zr, agg_zi, agg_xr, agg_xi = _aggregate(b_r, b_i, m00, m01, dt, c0, BLOCK_T)
    qa, qb = _imex_power(m00, m01, dt, LOG2_T)
    # 2. the state entering the chunk
    h_zr, h_zi, h_xr, h_xi = _loop_look_back(carry_ptr, flag_ptr, s0_ptr, agg_zr, agg_zi,
                                             agg_xr, agg_xi, m00, m01, dt, qa, qb, chunk,
                                             slot, n_slots, b, offs_p, mask_p, B, P, publish,
                                             WINDOW)
    # 3. the outputs and the inclusive end state
    x_off = b * sx_b + t0.to(tl.int64) * sx_t + offs_p
    e_zr, e_zi, e_xr, e_xi = _walk_tile(b_r, b_i, m00, m01, dt, c0, h_zr, h_zi, h_xr, h_xi,
                                        xr_ptr + x_off, xi_ptr + x_off, sx_t, n_valid, mask_p,
                                        BLOCK_T)
    if n_valid < BLOCK_T:
        e_zr, e_zi, e_xr, e_xi = _walk_tail(br_ptr + b_off, bi_ptr + b_off, sb_t, n_valid,
                                            mask_p, m00, m01, dt, c0, h_zr, h_zi, h_xr, h_xi)
    if publish:
        if hold == 0:
            _publish_inclusive(carry_ptr, flag_ptr, chunk, slot, n_slots, b, offs_p, mask_p,
                               B, P, e_zr, e_zi, e_xr, e_xi)
    else:
        _store_state(sT_ptr, b, offs_p, mask_p, P, e_zr, e_zi, e_xr, e_xi)


#: between the two scan-based designs (the ONNX Runtime library's, which launches no
#: chunk_loop): the rows grid needs about this many (batch row, block of P) programs per SM
#: to keep HBM busy on their own (each one-warp program has one tile in flight while it walks
#: the one before). The rows kernel measured 86% of copy at B=256 T=4096 P=128 on an H100
#: (1024 programs, about 7.8 per SM), 1.26x faster than the chunk kernel there.
ROWS_PER_SM = 6
#: the tile of the AOT kernels that ort_linoss_scan.cc launches (the scan-based designs):
#: (BLOCK_T, BLOCK_P, num_warps); it keeps its own copy of ROWS_PER_SM's rule
ORT_TILE = (16, 32, 1)
DESIGNS = ("chunk", "rows", "chunk_loop")
#: chunk_loop's default look-back window (LaunchPlan.window)
LOOK_BACK_WINDOW = 4


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One launch of ``linoss_scan``. Tiles are powers of two.

    - ``design``: ``"chunk"`` / ``"rows"`` (the tile scanned with ``tl.associative_scan``
      over 8-value affine maps, M rounded once) or ``"chunk_loop"`` (a per-thread step
      loop in the IMEX form, :func:`_imex_step`); the ``chunk*`` designs put one program on
      each chunk of ``block_t`` steps and hand the state on by decoupled look-back, ``rows``
      walks a row's whole T in one program;
    - ``block_t``: steps per tile (per chunk for the chunk designs);
    - ``block_p``: oscillators per program (``block_p / (32 num_warps)`` per thread);
    - ``num_warps``;
    - ``window``: ``chunk_loop`` only, the chunks whose flags (then aggregates) one read
      of its look-back covers (:func:`_loop_look_back`; 1: one at a time, as ``chunk``).
    """
    design: str
    block_t: int
    block_p: int
    num_warps: int
    window: int = 1

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"linoss_scan: design must be one of {DESIGNS}, got {self.design!r}")
        if self.window != 1 and self.design != "chunk_loop":
            raise ValueError(f"linoss_scan: window applies to chunk_loop only, not {self.design}")
        for name in ("block_t", "block_p", "num_warps", "window"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"linoss_scan: {name} must be a power of two, got {v}")

    @property
    def chunked(self) -> bool:
        return self.design in ("chunk", "chunk_loop")

    def slots(self, B: int, P: int) -> int:
        """(batch row, block of P) pairs: the rows grid, one chunk's for the chunk designs."""
        return B * triton.cdiv(P, self.block_p)


def choose(B: int, T: int, P: int) -> LaunchPlan:
    """The default plan for ``[B, T, P]``, from the designs' measured
    ranking (``benchmarks/dlinoss_scan.py`` times them all at the issue's sizes; the
    numbers are in BENCHMARKS.md):

    - ``chunk_loop`` with 32-step chunks, 32 oscillators, one warp and a look-back window
      of ``LOOK_BACK_WINDOW`` chunks wherever T is longer than 16: it was the fastest
      design at every measured size on an H100 and an H200, at the copy bandwidth where
      the data moved is large (also where the (batch row, 32 oscillators) programs alone
      would fill the GPU, which the ``rows`` design once served: 12-14% slower there). A
      wider window cost registers and so resident programs (8 was slower at B=32 T=1024,
      where the first wave of programs walks back furthest);
    - ``rows`` (the scan tile, one warp) where T fits one tile (streaming steps, short
      calls): no look-back and no flags.

    The scan-based ``chunk`` costs two 8-value affine-map scans per element where the loop
    costs 2 x 3 FMAs; it stays for the ONNX Runtime library, whose ahead-of-time kernels
    are the scan tile's (chosen there between ``chunk`` and ``rows`` by ``ROWS_PER_SM``)."""
    return default_plan("rows" if T <= 16 else "chunk_loop", B, T, P)


def _tile_t(block_t: int, T: int) -> int:
    """``block_t``, or T rounded up to a power of two (at least 2) where that is shorter."""
    return block_t if T >= block_t else max(2, triton.next_power_of_2(T))


def default_plan(design: str, B: int, T: int, P: int) -> LaunchPlan:
    """``design``'s plan with its default tile: 16 steps for the scan designs (as measured),
    32 for the loop design; 32 oscillators and one warp for all; chunk_loop's look-back
    window ``LOOK_BACK_WINDOW``."""
    block_t = 16 if design in ("chunk", "rows") else 32
    return LaunchPlan(design, _tile_t(block_t, T), min(32, triton.next_power_of_2(P)), 1,
                      LOOK_BACK_WINDOW if design == "chunk_loop" else 1)


_LAUNCHERS = {"chunk": Launcher(_linoss_chunk_kernel, tensors=11),
              "rows": Launcher(_linoss_rows_kernel, tensors=9),
              "chunk_loop": Launcher(_linoss_chunk_loop_kernel, tensors=11)}


def triton_linoss_scan(b_re, b_im, A, G, dt, state0, out=None, plan: LaunchPlan | None = None,
                       kernel: str | None = None):
    """Launch ``plan`` (default :func:`choose`'s; ``kernel``, a design name, takes that
    design's :func:`default_plan`). ``b_* [B, T, P]`` fp32/fp16/bf16 may be strided views
    with unit stride over P (e.g. halves of one [B, T, 2P] projection); ``A, G, dt [P]`` and
    ``state0 [B, P, 4]`` fp32. ``out``: optional preallocated ``(x_re, x_im, stateT)``.
    Returns ``x_re, x_im [B, T, P]`` in ``b_re``'s dtype and ``stateT [B, P, 4]`` fp32."""
    B, T, P = b_re.shape
    if b_re.stride(2) != 1 or b_im.stride(2) != 1 or b_re.stride()[:2] != b_im.stride()[:2]:
        b_re, b_im = b_re.contiguous(), b_im.contiguous()
    if not (A.is_contiguous() and G.is_contiguous() and dt.is_contiguous()):
        A, G, dt = A.contiguous(), G.contiguous(), dt.contiguous()
    state0 = state0.contiguous()
    if state0.dtype != torch.float32:
        raise ValueError(f"linoss_scan: state0 must be float32, got {state0.dtype}")
    if out is None:
        out = (torch.empty(B, T, P, dtype=b_re.dtype, device=b_re.device),
               torch.empty(B, T, P, dtype=b_re.dtype, device=b_re.device),
               torch.empty(B, P, 4, dtype=torch.float32, device=b_re.device))
    x_re, x_im, state_t = out
    if T == 0:
        state_t.copy_(state0)
        return x_re, x_im, state_t
    if plan is None:
        plan = default_plan(kernel, B, T, P) if kernel else choose(B, T, P)
    tensors = (b_re, b_im, A, G, dt, state0, x_re, x_im, state_t)
    sizes = (B, T, P, b_re.stride(0), b_re.stride(1), x_re.stride(0), x_re.stride(1))
    run, slots = _LAUNCHERS[plan.design], plan.slots(B, P)
    if not plan.chunked:
        run((slots,), (*tensors, *sizes), (plan.block_t, plan.block_p),
            num_warps=plan.num_warps)
        return x_re, x_im, state_t
    n_chunks = triton.cdiv(T, plan.block_t)
    carry = torch.empty(max(n_chunks - 1, 1) * 8 * B * P, dtype=torch.float32, device=b_re.device)
    flags = torch.zeros(max(n_chunks - 1, 1) * slots, dtype=torch.int32, device=b_re.device)
    values = (plan.block_t, plan.block_p, plan.block_t.bit_length() - 1)
    if plan.design == "chunk_loop":
        values += (plan.window,)
    run((n_chunks * slots,), (*tensors, carry, flags, *sizes), values, num_warps=plan.num_warps)
    return x_re, x_im, state_t
