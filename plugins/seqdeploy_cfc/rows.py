"""The ``rows`` design of ``cfc_scan``: one program per ``BLOCK_B`` batch rows, all H columns,
so programs exchange nothing. It runs wherever Triton does (the interpreter too); the
default wherever no other design is chosen. The state ``h [BLOCK_B, BLOCK_H]`` stays in
fp32 registers. ``w_rec`` stays on chip where it fits (``W_RESIDENT``: H <= 256 in
fp16/bf16); else it is re-read from L2 every step in ``[BLOCK_K, BLOCK_H]`` slices, with
``h_{t-1}`` read back in the same slices from ``y[:, t-1]``, which this program just wrote
(``h`` rounded to the input dtype: the operand the resident path feeds to ``tl.dot``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from seqdeploy_cfc.common import _first_x, _load_w, _prefetch, _start, _streamed_matmul, _tanh


@triton.jit
def _cfc_scan_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                     sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                     SERIES_BELOW: tl.constexpr, FAST_TANH: tl.constexpr):
    """``y [B, T, H] = cfc_scan(xw [B, T, H], h0 [B, H], w_rec [H, H], tau [H] fp32, dt)`` for
    rows ``pid*BLOCK_B ...``; ``xw``, ``h0``, ``w_rec`` and ``y`` share one dtype, unit stride
    over H (``s*``: the other strides, in elements). ``BLOCK_H``: H rounded up to a power of
    two >= 16; ``BLOCK_K``: the slice of a streamed ``w_rec``."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask_b = rows < B
    mask_h = cols < H
    mask = mask_b[:, None] & mask_h[None, :]
    out_ty = y_ptr.dtype.element_ty

    alpha, gain, h = _start(h0_ptr, tau_ptr, rows, cols, mask, mask_h, dt, sh_b, SERIES_BELOW)
    if W_RESIDENT:
        w = _load_w(w_ptr, sw_k, cols, mask_h, cols, mask_h, DOT_F32, out_ty)
    x_ptrs, step, x_next = _first_x(xw_ptr, rows, cols, mask, T, sx_b)
    y_ptrs = y_ptr + rows[:, None] * sy_b + cols[None, :]
    # num_stages=1: no software pipelining across steps. The streamed path reads y[:, t-1]
    # back from memory, which a pipelined loop could load before it is stored; the one step
    # of prefetch hides the latency of xw instead.
    for t in tl.range(0, T, num_stages=1):
        x, x_next = _prefetch(x_ptrs, x_next, mask, step, t, T, sx_t)
        if W_RESIDENT:
            if DOT_F32:
                acc = tl.dot(h, w, input_precision="ieee")
            else:
                acc = tl.dot(h.to(out_ty), w)
        else:
            if t == 0:
                acc = _streamed_matmul(h0_ptr, sh_b, w_ptr, sw_k, rows, mask_b, cols, mask_h, H,
                                       BLOCK_B, BLOCK_H, BLOCK_H, BLOCK_K, DOT_F32)
            else:
                acc = _streamed_matmul(y_ptr + (t - 1) * sy_t, sy_b, w_ptr, sw_k, rows, mask_b,
                                       cols, mask_h, H, BLOCK_B, BLOCK_H, BLOCK_H, BLOCK_K,
                                       DOT_F32)
        h = alpha * h + gain * _tanh(x + acc, FAST_TANH)
        tl.store(y_ptrs + t * sy_t, h.to(out_ty), mask=mask)
        if not W_RESIDENT:
            tl.debug_barrier()   # every thread's y_t is stored before any thread reads it back
