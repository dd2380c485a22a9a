"""The ``split`` design of ``cfc_scan``: the columns of ``h`` spread over programs, so a step
runs on more SMs than ``rows`` gives it (B = 64 is 4 rows programs). Program ``(pb, pn)``
(pn fastest) owns rows ``pb*BLOCK_B ...`` and columns ``pn*BLOCK_N ...`` of ``h`` and ``y``,
keeps ``w_rec[:, n-block]`` on chip (``W_RESIDENT``; else re-read every step in ``BLOCK_K``
slices) and its columns' fp32 state in registers. The dot needs all of ``h_{t-1}`` of its
rows, which the sibling programs (same ``pb``) computed:

- ``CLUSTER``: the siblings run as one thread-block cluster (sm_90 on). Step t stores its
  slice of ``y_t``; step t+1 meets them at the cluster barrier (arrive with release, wait
  with acquire: their stores are then visible under the PTX memory model) and reads
  ``y[rows, t, :]`` past L1. A cluster's programs are scheduled together, so none waits on
  one that has not started, and clusters never wait on each other.
- otherwise it is launched for one step only (``T == 1``, streaming): the dot reads ``h0``.
``y`` holds ``h`` rounded to the input dtype, the operand ``rows`` also feeds its dot.
"""
from __future__ import annotations

import triton
import triton.language as tl

from seqdeploy_cfc.common import _first_x, _load_w, _prefetch, _start, _streamed_matmul, _tanh


@triton.jit
def _cluster_barrier(dep):
    """Arrive at the cluster barrier (release) and wait on it (acquire); every thread runs it
    (``dep``: a scalar), every program of the cluster equally often."""
    return tl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
        "\n\tmov.u32 $0, 0;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _cfc_split_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                      sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                      SERIES_BELOW: tl.constexpr, FAST_TANH: tl.constexpr,
                      CLUSTER: tl.constexpr):
    """Arguments as ``rows._cfc_scan_kernel``'s; ``BLOCK_N`` columns per program. Launched as
    clusters of a batch block's ``cdiv(H, BLOCK_N)`` programs, or without only for T == 1."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(H, BLOCK_N)
    pb = pid // n_nb
    pn = pid % n_nb
    rows = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)      # this program's columns of h and y
    ks = tl.arange(0, BLOCK_H)                       # the contraction axis: all of h
    mask_b = rows < B
    mask_n = cols < H
    mask_k = ks < H
    mask = mask_b[:, None] & mask_n[None, :]
    mask_hk = mask_b[:, None] & mask_k[None, :]
    out_ty = y_ptr.dtype.element_ty

    alpha, gain, h = _start(h0_ptr, tau_ptr, rows, cols, mask, mask_n, dt, sh_b, SERIES_BELOW)
    if W_RESIDENT:
        w = _load_w(w_ptr, sw_k, ks, mask_k, cols, mask_n, DOT_F32, out_ty)
    x_ptrs, step, x_next = _first_x(xw_ptr, rows, cols, mask, T, sx_b)
    y_ptrs = y_ptr + rows[:, None] * sy_b + cols[None, :]
    # the offsets of the rows' words in one step of y (formed here, not in the loop: faster)
    hk = rows[:, None] * sy_b + ks[None, :]
    # num_stages=1: a pipelined loop could issue the next step's loads of y early
    for t in tl.range(0, T, num_stages=1):
        # the next xw load is issued before the barrier and the dot, so it hides behind them
        x, x_next = _prefetch(x_ptrs, x_next, mask, step, t, T, sx_t)
        if W_RESIDENT:
            if t == 0:
                hp = tl.load(h0_ptr + rows[:, None] * sh_b + ks[None, :], mask=mask_hk,
                             other=0.0)
            else:
                if CLUSTER:
                    _cluster_barrier(t)   # every sibling's y_{t-1} is stored and visible
                hp = tl.load(y_ptr + (t - 1) * sy_t + hk, mask=mask_hk, other=0.0,
                             cache_modifier=".cg")
            if DOT_F32:
                z = tl.dot(hp.to(tl.float32), w, x, input_precision="ieee")
            else:
                z = tl.dot(hp, w, x)
        else:
            if t == 0:
                acc = _streamed_matmul(h0_ptr, sh_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H,
                                       BLOCK_B, BLOCK_H, BLOCK_N, BLOCK_K, DOT_F32)
            else:
                if CLUSTER:
                    _cluster_barrier(t)
                acc = _streamed_matmul(y_ptr + (t - 1) * sy_t, sy_b, w_ptr, sw_k, rows, mask_b,
                                       cols, mask_n, H, BLOCK_B, BLOCK_H, BLOCK_N, BLOCK_K,
                                       DOT_F32)
            z = x + acc
        h = alpha * h + gain * _tanh(z, FAST_TANH)
        tl.store(y_ptrs + t * sy_t, h.to(out_ty), mask=mask)
