"""Triton kernels for ``linoss_scan``: one pass over HBM, fp32 state.

Per oscillator p the transition ``M`` (2x2, real) is time-invariant and the real and
imaginary parts share it, so each (b, p) carries two independent 2-vectors ``w = (z, x)``.
A program owns a ``[BLOCK_P, BLOCK_T]`` tile (T is the inner axis, held in each thread's
registers) of ``b_re`` and ``b_im`` and scans it with ``tl.associative_scan`` over the affine
maps ``w -> M w + c b_t`` (eight fp32 values per element: the cumulative power of M relative
to the tile, never a negative power, and the sums). The state entering the tile is folded
into its first step (``_tile_scan``), so the outputs come out of the scan itself.

Two grids, chosen by :func:`launch_config`:

- ``_linoss_chunk_kernel`` (few rows, e.g. B=32, P=128: 128 tiles of P per time step): grid
  over (chunk of T, batch row, block of P), one tile per program, chunk-major. The tile is
  scanned from a zero state and its aggregate published at once; the state entering the
  chunk comes by decoupled look-back (back over the flags of earlier chunks to the latest
  that has published its inclusive end state, then forward from that state over the
  aggregates in between, ``h <- Q h + agg`` with ``Q = M^BLOCK_T`` applied as ``a h +
  b (M h)``; the first chunk starts from ``state0``); then the tile, still in registers, is
  scanned again from that state, which gives the outputs and this chunk's inclusive state.
  A chunk only waits on programs with smaller ids, which the hardware (and the
  interpreter, which runs ids in order) has already started.
- ``_linoss_rows_kernel`` (many rows): grid over (batch row, block of P); each program walks
  its rows' whole sequence tile by tile, the next tile's load issued before the current one
  is scanned. No look-back traffic at all.

HBM traffic is one read of ``b_re, b_im`` and one write of ``x_re, x_im`` (plus ``state0``,
``stateT`` and, for the chunk kernel, 8 fp32 per (chunk, b, p) of look-back carries). Padded
time steps of the last tile use ``M = I, c = 0`` so the tile's last column is the state at
T-1.

Error growth with T (see ``ops.py``): both kernels make the fp32 step loop's errors, with M
computed in float64 and rounded once: they grow about linearly in T where M's eigenvalues
are well separated, and faster (up to T^2, until the damping time ``1/(1 - |lambda|)``)
where they nearly coincide at the band's edges; kappa = rel-L2 / (u T) is about 32 at
T = 16384 with ``dt G = 1e-6``. A look-back that crosses k unfinished chunks applies Q k
times in place of k BLOCK_T steps of M, each application as accurate as those steps, so
how far the look-backs walk (which depends on the GPU's scheduling) does not change this.
"""
from __future__ import annotations

import functools

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
    a = tl.zeros_like(tr)
    b = a + 1.0
    for _ in tl.static_range(LOG2_T):
        a, b = a * a - b * b * det, 2.0 * a * b + b * b * tr
    return a.to(tl.float32), b.to(tl.float32)


@triton.jit
def _store_state(ptr, b, offs_p, mask_p, P, zr, zi, xr, xi):
    base = ptr + b * P * 4 + offs_p * 4
    tl.store(base, zr, mask=mask_p)
    tl.store(base + 1, zi, mask=mask_p)
    tl.store(base + 2, xr, mask=mask_p)
    tl.store(base + 3, xi, mask=mask_p)


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
        s0 = s0_ptr + b * P * 4 + offs_p * 4
        h_zr = tl.load(s0, mask=mask_p, other=0.0)
        h_zi = tl.load(s0 + 1, mask=mask_p, other=0.0)
        h_xr = tl.load(s0 + 2, mask=mask_p, other=0.0)
        h_xi = tl.load(s0 + 3, mask=mask_p, other=0.0)
    else:
        if publish:
            tl.store(mine + state, agg_zr, mask=mask_p)
            tl.store(mine + plane + state, agg_zi, mask=mask_p)
            tl.store(mine + 2 * plane + state, agg_xr, mask=mask_p)
            tl.store(mine + 3 * plane + state, agg_xi, mask=mask_p)
            tl.debug_barrier()   # every thread's values are stored before the flag is raised
            tl.atomic_xchg(my_flag, 1, sem="release")
        # 1. back over the flags: 0 nothing yet (wait), 1 aggregate (go on), 2 inclusive (stop)
        j = chunk - 1
        flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
        while flag != 2:
            j = j - (flag == 1).to(tl.int32)
            flag = tl.atomic_add(flag_ptr + j * n_slots + slot, 0, sem="acquire")
        # 2. forward from chunk j's inclusive state over the later chunks' aggregates
        src = carry_ptr + j.to(tl.int64) * 8 * plane + 4 * plane + state
        h_zr = tl.load(src, mask=mask_p, other=0.0, volatile=True)
        h_zi = tl.load(src + plane, mask=mask_p, other=0.0, volatile=True)
        h_xr = tl.load(src + 2 * plane, mask=mask_p, other=0.0, volatile=True)
        h_xi = tl.load(src + 3 * plane, mask=mask_p, other=0.0, volatile=True)
        src = src + 4 * plane       # chunk j + 1's aggregate
        for _ in range(j + 1, chunk):
            v_zr = tl.load(src, mask=mask_p, other=0.0, volatile=True)
            v_zi = tl.load(src + plane, mask=mask_p, other=0.0, volatile=True)
            v_xr = tl.load(src + 2 * plane, mask=mask_p, other=0.0, volatile=True)
            v_xi = tl.load(src + 3 * plane, mask=mask_p, other=0.0, volatile=True)
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
    tl.store(mine + 4 * plane, zr, mask=mask_p)
    tl.store(mine + 5 * plane, zi, mask=mask_p)
    tl.store(mine + 6 * plane, xr, mask=mask_p)
    tl.store(mine + 7 * plane, xi, mask=mask_p)
    tl.debug_barrier()   # every thread's values are stored before the flag is raised
    tl.atomic_xchg(flag_ptr + chunk * n_slots + slot, 2, sem="release")


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
    agg_zr = _last(s_zr, BLOCK_T)
    agg_zi = _last(s_zi, BLOCK_T)
    agg_xr = _last(s_xr, BLOCK_T)
    agg_xi = _last(s_xi, BLOCK_T)
    qa, qb = _tile_power(m00, m01, m10, m11, LOG2_T)
    # 2. the state entering the chunk
    publish = t0 + BLOCK_T < T
    h_zr, h_zi, h_xr, h_xi = _look_back(carry_ptr, flag_ptr, s0_ptr, agg_zr, agg_zi, agg_xr,
                                        agg_xi, m00, m01, m10, m11, qa, qb, chunk, slot,
                                        n_slots, b, offs_p, mask_p, B, P, publish, BLOCK_P)
    # 3. the tile again from that state: the outputs and the inclusive end state
    _, _, _, _, w_zr, w_xr, w_zi, w_xi = _tile_scan(b_r, b_i, valid, m00, m01, m10, m11, c0,
                                                    c1, h_zr, h_zi, h_xr, h_xi)
    end_zr = _last(w_zr, BLOCK_T)
    end_zi = _last(w_zi, BLOCK_T)
    end_xr = _last(w_xr, BLOCK_T)
    end_xi = _last(w_xi, BLOCK_T)
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
    s0 = s0_ptr + b * P * 4 + offs_p * 4
    h_zr = tl.load(s0, mask=mask_p, other=0.0)
    h_zi = tl.load(s0 + 1, mask=mask_p, other=0.0)
    h_xr = tl.load(s0 + 2, mask=mask_p, other=0.0)
    h_xi = tl.load(s0 + 3, mask=mask_p, other=0.0)
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
        h_zr = _last(w_zr, BLOCK_T)
        h_zi = _last(w_zi, BLOCK_T)
        h_xr = _last(w_xr, BLOCK_T)
        h_xi = _last(w_xi, BLOCK_T)
    _store_state(sT_ptr, b, offs_p, mask_p, P, h_zr, h_zi, h_xr, h_xi)


#: the rows kernel needs about this many (batch row, block of P) programs per SM to keep HBM
#: busy on its own (each one-warp program has one 4 KB tile in flight while it scans the one
#: before; 164 registers allow 12 per SM). A guess until benchmarks/dlinoss_scan.py has run
#: on a GPU: it times both kernels at every size.
ROWS_PER_SM = 6


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(B: int, T: int, P: int, device: torch.device) -> tuple[str, int, int, int]:
    """(kernel, BLOCK_T, BLOCK_P, num_warps). Eight fp32 scan values per element live in
    registers, so a tile is 32 oscillators (one per thread of one warp) by 16 steps. Not yet
    tuned on a GPU: ``benchmarks/dlinoss_scan.py --sweep`` measures the alternatives."""
    block_p = min(32, triton.next_power_of_2(P))
    block_t = 16 if T >= 16 else max(2, triton.next_power_of_2(T))
    slots = B * triton.cdiv(P, block_p)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    kernel = "rows" if slots >= ROWS_PER_SM * sms or T <= block_t else "chunk"
    return kernel, block_t, block_p, 1


_chunk_launcher = Launcher(_linoss_chunk_kernel, tensors=11)
_rows_launcher = Launcher(_linoss_rows_kernel, tensors=9)


def triton_linoss_scan(b_re, b_im, A, G, dt, state0, out=None, kernel=None, block_t=None,
                       block_p=None, num_warps=None):
    """Launch the kernel. ``b_*`` may be strided views with unit stride over P (e.g. halves
    of one [B, T, 2P] projection). ``out``: optional preallocated ``(x_re, x_im, stateT)``.
    ``kernel`` ("chunk" or "rows") and the block sizes override :func:`launch_config`."""
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
    kind, bt, bp, nw = launch_config(B, T, P, b_re.device)
    kind, bt, bp, nw = kernel or kind, block_t or bt, block_p or bp, num_warps or nw
    if bt & (bt - 1) or bp & (bp - 1):
        raise ValueError(f"linoss_scan: block sizes must be powers of two, got {bt}, {bp}")
    tensors = (b_re, b_im, A, G, dt, state0, x_re, x_im, state_t)
    sizes = (B, T, P, b_re.stride(0), b_re.stride(1), x_re.stride(0), x_re.stride(1))
    if kind == "rows":
        _rows_launcher((B * triton.cdiv(P, bp),), (*tensors, *sizes), (bt, bp), num_warps=nw)
        return x_re, x_im, state_t
    n_chunks = triton.cdiv(T, bt)
    n_slots = B * triton.cdiv(P, bp)
    carry = torch.empty(max(n_chunks - 1, 1) * 8 * B * P, dtype=torch.float32, device=b_re.device)
    flags = torch.zeros(max(n_chunks - 1, 1) * n_slots, dtype=torch.int32, device=b_re.device)
    _chunk_launcher((n_chunks * n_slots,), (*tensors, carry, flags, *sizes),
                    (bt, bp, bt.bit_length() - 1), num_warps=nw)
    return x_re, x_im, state_t
