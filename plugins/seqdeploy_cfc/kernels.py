"""Triton kernels for ``cfc_scan``: all T steps in one launch.

The recurrence is nonlinear, so there is no scan to parallelise over T: every launch walks the
T steps in order, and each step is one ``h_{t-1} @ w_rec`` on the tensor cores (``tl.dot``,
fp32 accumulation), then ``tanh`` and the blend with ``alpha`` in fp32. ``xw`` is read once
(the next step's tile is prefetched while this step computes) and ``y`` is written once. Two
designs share that step and differ in how the work of one step is spread over the GPU.

**rows** (``_cfc_scan_kernel``): one program per ``BLOCK_B`` batch rows, owning all H
columns; programs never talk to each other. The state ``h [BLOCK_B, BLOCK_H]`` stays in fp32
registers for the whole sequence. Where ``w_rec`` lives depends on its size (``W_RESIDENT``):

- small enough (``launch_config``: <= 128 KiB, i.e. H <= 256 in fp16/bf16): loaded once before
  the loop and kept on chip;
- larger (H = 512 in fp16 is 512 KiB, more than one SM holds): re-read from global memory
  each step in ``[BLOCK_K, BLOCK_H]`` slices, where it stays in L2. The dot's left operand
  ``h_{t-1}`` is then read back in the same slices from ``y[:, t-1]``, which this program just
  wrote: ``y`` holds ``h`` rounded to the input dtype, exactly the operand the resident path
  feeds to ``tl.dot``, so both paths compute the same thing.

Its limits: B = 64 gives 4 programs on a 132-SM GPU, each of which reads all of ``w_rec``
(from shared memory, or from L2 at H = 512) every step.

**split** (``_cfc_split_kernel``): a persistent grid of (batch block of ``BLOCK_B`` rows) x
(column block of ``BLOCK_N`` of H). Program ``(pb, pn)`` loads its slice
``w_rec[:, n-block]`` (``[BLOCK_H, BLOCK_N]``, 64 KiB at H = 512, BLOCK_N = 64 in fp16) once
into shared memory and keeps it there for the whole loop (``W_RESIDENT``; where the dot's
register tiles would spill, it re-reads the slice each step in ``[BLOCK_K, BLOCK_N]`` pieces
instead, served from L1/L2). It holds the fp32 state of its own columns in registers and
writes ``y[rows, t, n-block]``. The dot needs all of ``h_{t-1}`` of its rows, which the
sibling programs (same ``pb``, on other SMs) wrote into ``y[rows, t-1, :]``, rounded to the
input dtype as in the streamed rows path (step 0 reads ``h0``).

On Hopper and later (``clusters_available``), the siblings of a batch block run as one
thread-block cluster (``CLUSTER``; at most ``MAX_CLUSTER`` programs). Each step stores its
slice of ``y_t`` with plain stores; the next step first meets the siblings at the cluster's
hardware barrier (``barrier.cluster`` arrive with release, wait with acquire semantics, so
every sibling's earlier stores are visible once it returns) and then reads ``y[rows, t, :]``
past L1. That is correct under the PTX memory model, needs no fill of ``y``, and cannot
deadlock: the GPU schedules all programs of a cluster together, so no program ever waits on
one that has not started, and clusters never wait on each other (any grid size runs). On
the H200 it was also faster (see ``launch_config``). The paragraphs below describe the
exchange used without clusters (older GPUs, other launchers).

The siblings exchange ``h`` through ``y`` itself, with no barrier, counter or fence: before
the launch ``y`` is filled with the all-ones bit pattern (a NaN in fp16, bf16 and fp32),
which no stored value has (a computed all-ones NaN is stored as its neighbour, also a NaN).
Step t loads ``y[rows, t-1, :]`` with volatile loads (from L2, never a stale L1 line) and
reloads until no word is all ones. Each word is stored once, whole (an aligned 2- or 4-byte
store is never torn), so a word that has arrived is final; words are checked one by one,
so no ordering between them is needed. This is the "flag in the data" idea of low-latency
collectives: one L2 round trip per step instead of a fence, an atomic and polling on a
counter before the data can be read. The fill is one extra pass over ``y`` before the
launch (a memset node under CUDA graphs); a single step (``T == 1``) reads only ``h0`` and
skips it. With ``w_rec`` streamed, each ``BLOCK_K`` slice of
``h_{t-1}`` is awaited as it is read.

The stores are ordinary (weak) stores. Under the PTX memory model a weak store read by a
volatile load from another SM is a data race, so the scheme rests on how the hardware
behaves, as low-latency collectives do: global stores write through to L2, volatile loads
read L2 and are never hoisted out of the wait loop, and an aligned 2- or 4-byte store is
never torn. Triton has no strong (relaxed) store for 16-bit words. Every GPU test runs it.

Why the wait cannot deadlock: a program waits only for its siblings' step t-1, which needs
nothing but their own waits for step t-2; by induction over t, every wait ends once all
programs of the batch block are running. ``triton_cfc_scan`` launches the split kernel only
with at most as many programs as the GPU has SMs (each program fits on one SM, or the launch
fails instead), so all programs are resident together. It cannot rule out SMs held by other
work that itself waits on this kernel (e.g. two split launches on concurrent streams, each
partly resident), or an SM count cut below the reported one (MPS limits).

On Hopper, the cluster split kernel has a second form for fp16/bf16 up to H=512
(``wgmma.py``, written in Gluon): the same arithmetic, with the step's product computed
transposed so that ``w_rec`` sits in registers as warpgroup MMA's left operand instead of
being re-read from shared memory every step, and ``h`` handed to the siblings by bulk copies
into their shared memory instead of through ``y`` and the cluster barrier (``wgmma`` in the
config). It is the default at H of 129 to 512, where it measured faster (``WGMMA_BLOCK_H``),
and runs on request (``wgmma=True``) down to H=64.

The Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs programs one after the
other, so a program would spin forever on a sibling that has not started: the split kernel
is refused there (``triton_cfc_scan(method="split")`` raises). The CPU tests still run it
through ``_launch_split`` where no program waits on another: one column block per batch
block (each program waits only on its own stores), or a single step (chained one step per
call, fp32 reproduces the whole sequence, since then the state is exactly y).

``tl.dot`` needs every dimension >= 16, so ``BLOCK_B >= 16``, ``BLOCK_N >= 16`` and
``BLOCK_H`` is H rounded up to a power of two >= 16; padded rows and columns are masked
(padded columns stay exactly 0). fp32 inputs use ``input_precision="ieee"``.
"""
from __future__ import annotations

import functools
import re

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher, cluster_launch_available

#: largest ``w_rec`` tile (bytes, in the dot's operand dtype) kept on chip for the whole loop
W_RESIDENT_BYTES = 128 * 1024
#: below this ``dt / tau`` the series form of ``1 - exp(-r)`` is used (see ``_one_minus_exp_neg``)
SERIES_BELOW = 0.5
METHODS = ("rows", "split")
#: most programs in one thread-block cluster (the portable limit of CUDA)
MAX_CLUSTER = 8


@triton.jit
def _tanh(z, FAST_TANH: tl.constexpr):
    """``tanh`` in fp32. Per step the whole ``[rows, H]`` tile goes through this, so its
    instruction count is a visible part of a step.

    ``FAST_TANH`` (fp16/bf16 inputs on a GPU): the one-instruction ``tanh.approx.f32``
    (sm_75 on). Its relative error, up to 2^-10.987, is the size of fp16's rounding of
    ``y`` (2^-11 relative) and below bf16's; it enters the fp32 state each step, and the
    GPU tests bound what that adds over T=2048 against the exact form.

    Otherwise from exp (the interpreter has neither libdevice nor inline PTX):
    ``exp(-2|z|)`` lies in (0, 1] and cannot overflow for any z, and the division is the
    fast one (``div.full.f32``, 2 ulp), not the IEEE subroutine."""
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z],
                                         dtype=tl.float32, is_pure=True, pack=1)
    e = tl.exp(-2.0 * tl.abs(z))
    t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _one_minus_exp_neg(r, SERIES_BELOW: tl.constexpr):
    """``1 - exp(-r)`` for ``r >= 0``, accurate for small r (``-expm1(-r)``; Triton has no
    expm1). Below ``SERIES_BELOW`` the Taylor series to r^8 (the next term is < 2e-8 of the
    sum at r = 0.5); above it ``1 - exp(-r) > 0.39``, so the error of the GPU's approximate
    exp (a few 1e-7, relative) grows at most 1.6x in the subtraction."""
    s = r * (1.0 - r / 2.0 * (1.0 - r / 3.0 * (1.0 - r / 4.0 * (1.0 - r / 5.0 * (
        1.0 - r / 6.0 * (1.0 - r / 7.0 * (1.0 - r / 8.0)))))))
    return tl.where(r < SERIES_BELOW, s, 1.0 - tl.exp(-r))


@triton.jit
def _streamed_matmul(a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, AWAIT: tl.constexpr,
                     a_bits_ptr):
    """``a [BLOCK_B, H] @ w [H, cols]`` (``BLOCK_N`` columns) with both operands read in
    ``BLOCK_K`` slices of the contraction axis. ``a`` was written earlier in this launch, so
    it is read past L1 (``.cg``); with ``AWAIT`` (the split kernel: siblings on other SMs
    wrote it) each slice is awaited through ``a_bits_ptr``, the same memory as integers, as
    ``_await_state`` does for a whole row block, in a loop that is not unrolled (unrolled,
    one wait loop per slice made ptxas spill). ``w`` is re-read every step and served from
    L2 (or L1, for a split slice)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if AWAIT:
        for k0 in tl.range(0, BLOCK_H, BLOCK_K, num_stages=1):
            acc = _slice_dot(acc, a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H, k0,
                             BLOCK_K, DOT_F32, AWAIT, a_bits_ptr)
    else:
        for k0 in tl.static_range(0, BLOCK_H, BLOCK_K):
            acc = _slice_dot(acc, a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H, k0,
                             BLOCK_K, DOT_F32, AWAIT, a_bits_ptr)
    return acc


@triton.jit
def _slice_dot(acc, a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H, k0,
               BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, AWAIT: tl.constexpr, a_bits_ptr):
    """``acc + a[:, k0 : k0 + BLOCK_K] @ w[k0 : k0 + BLOCK_K, cols]`` (see _streamed_matmul)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask_k = ks < H
    mask_a = mask_b[:, None] & mask_k[None, :]
    offs = rows[:, None] * sa_b + ks[None, :]
    if AWAIT:
        a = _await_state(a_bits_ptr + offs, mask_a, False).to(a_ptr.dtype.element_ty,
                                                               bitcast=True)
    else:
        a = tl.load(a_ptr + offs, mask=mask_a, other=0.0, cache_modifier=".cg")
    w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :],
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    if DOT_F32:
        return acc + tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, w)


@triton.jit
def _decays(tau_ptr, cols, mask, dt, SERIES_BELOW: tl.constexpr):
    """``alpha = exp(-dt/tau)`` and ``1 - alpha`` in fp32, as [1, columns] rows, once per
    program; padded columns get tau = 1 (finite, unused)."""
    r = dt / tl.load(tau_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    return tl.exp(-r)[None, :], _one_minus_exp_neg(r, SERIES_BELOW)[None, :]


@triton.jit
def _load_w(w_ptr, sw_k, ks, mask_k, cols, mask_n, DOT_F32: tl.constexpr, out_ty: tl.constexpr):
    """``w_rec[ks, cols]``, kept on chip for the whole loop, in the dot's operand dtype."""
    w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :], mask=mask_k[:, None] & mask_n[None, :],
                other=0.0)
    if DOT_F32:
        return w.to(tl.float32)
    return w.to(out_ty)


@triton.jit
def _start(h0_ptr, tau_ptr, rows, cols, mask, mask_n, dt, sh_b, SERIES_BELOW: tl.constexpr):
    """What both designs set up first for their tile (``rows`` x ``cols``): ``alpha`` and
    ``1 - alpha`` of the columns, and the fp32 state (the blend never sees the rounded y)."""
    alpha, gain = _decays(tau_ptr, cols, mask_n, dt, SERIES_BELOW)
    h = tl.load(h0_ptr + rows[:, None] * sh_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return alpha, gain, h


@triton.jit
def _first_x(xw_ptr, rows, cols, mask, T, sx_b):
    """The tile's pointers into ``xw`` and its first tile. ``step`` is a per-row time index
    (zeros), so that masks stay vectors."""
    x_ptrs = xw_ptr + rows[:, None] * sx_b + cols[None, :]
    step = rows * 0
    x_next = tl.load(x_ptrs, mask=mask & (step < T)[:, None], other=0.0)
    return x_ptrs, step, x_next


@triton.jit
def _prefetch(x_ptrs, x_next, mask, step, t, T, sx_t):
    """Step t's ``xw`` tile in fp32, and the load of step t+1's, issued now so that its
    latency hides behind this step: ``xw`` is read once, one step ahead."""
    x = x_next.to(tl.float32)
    x_next = tl.load(x_ptrs + (t + 1) * sx_t, mask=mask & (step + t + 1 < T)[:, None],
                     other=0.0)
    return x, x_next


@triton.jit
def _cfc_scan_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                     sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                     SERIES_BELOW: tl.constexpr, FAST_TANH: tl.constexpr):
    """The rows design: one program per ``BLOCK_B`` rows, all H columns."""
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
                                       BLOCK_B, BLOCK_H, BLOCK_H, BLOCK_K, DOT_F32, False, h0_ptr)
            else:
                acc = _streamed_matmul(y_ptr + (t - 1) * sy_t, sy_b, w_ptr, sw_k, rows, mask_b,
                                       cols, mask_h, H, BLOCK_B, BLOCK_H, BLOCK_H, BLOCK_K,
                                       DOT_F32, False, y_ptr)
        h = alpha * h + gain * _tanh(x + acc, FAST_TANH)
        tl.store(y_ptrs + t * sy_t, h.to(out_ty), mask=mask)
        if not W_RESIDENT:
            tl.debug_barrier()   # every thread's y_t is stored before any thread reads it back


@triton.jit
def _await_state(bits_ptrs, mask, COUNT_ONLY: tl.constexpr):
    """The words at ``bits_ptrs`` (a tile of ``h_{t-1}`` as raw bits), once all have arrived:
    written in the previous step by this program and its siblings on other SMs. ``y`` was
    filled with the all-ones pattern before the launch, and a stored value never has it (see
    ``_publish``), so a word still all ones has not arrived yet: reload until none is. Each
    word is stored once and whole, so a word that has arrived is final. Loads are volatile
    (from L2, never from a stale L1 line, never hoisted out of the loop).

    ``COUNT_ONLY``: the wait loop carries only the count of words not yet arrived, and the
    arrived tile is loaded once more after it (volatile, so from L2 where the wait saw it).
    That costs a second read, but the loop no longer holds a second copy of the tile: for
    fp32, whose tiles are twice as wide, carrying it made ptxas spill."""
    if COUNT_ONLY:
        missing = _missing(tl.load(bits_ptrs, mask=mask, other=0, volatile=True))
        while missing > 0:
            missing = _missing(tl.load(bits_ptrs, mask=mask, other=0, volatile=True))
        return tl.load(bits_ptrs, mask=mask, other=0, volatile=True)
    bits = tl.load(bits_ptrs, mask=mask, other=0, volatile=True)
    while _missing(bits) > 0:
        bits = tl.load(bits_ptrs, mask=mask, other=0, volatile=True)
    return bits


@triton.jit
def _missing(bits):
    """How many words of ``bits`` are still the all-ones "not arrived" pattern."""
    return tl.sum(tl.sum((bits == -1).to(tl.int32), axis=1), axis=0)


@triton.jit
def _publish(bits_ptrs, h, mask, out_ty: tl.constexpr, bits_ty: tl.constexpr):
    """Store ``h`` rounded to ``out_ty`` as raw bits. The one value spelled all ones (a NaN)
    becomes its neighbour all-ones-minus-one (also a NaN), so no stored word looks like one
    that has not arrived."""
    bits = h.to(out_ty).to(bits_ty, bitcast=True)
    tl.store(bits_ptrs, tl.where(bits == -1, bits - 1, bits), mask=mask)


@triton.jit
def _cluster_barrier(dep):
    """Arrive at the thread-block cluster's barrier with release semantics and wait on it
    with acquire semantics: once it returns, every store that any program of the cluster
    made before arriving is visible to this one (global memory included). Every thread runs
    it once (``dep`` is a scalar); all programs of the cluster must run it equally often."""
    return tl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
        "\n\tmov.u32 $0, 0;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _previous_state(h0_ptr, sh_b, y_ptr, ybits_ptr, sy_b, sy_t, rows, mask_hk, ks, hk, t,
                    out_ty: tl.constexpr, COUNT_ONLY: tl.constexpr, CLUSTER: tl.constexpr,
                    BARRIER: tl.constexpr):
    """``h_{t-1}[:, ks]`` for this program's rows, in ``out_ty``: ``h0`` at step 0, else
    ``y[:, t-1]``: with ``CLUSTER`` read after the cluster barrier (``hk``: the offsets of
    the rows' words in one step of ``y``; ``BARRIER=False`` where this step already met
    it), otherwise awaited (``COUNT_ONLY``: see ``_await_state``)."""
    if t == 0:
        hp = tl.load(h0_ptr + rows[:, None] * sh_b + ks[None, :], mask=mask_hk, other=0.0)
    elif CLUSTER:
        # every sibling's y_{t-1} is stored and visible (offsets formed before the loop and
        # the barrier in this branch: 4-11% faster on the H200 than both in the loop body)
        if BARRIER:
            _cluster_barrier(t)
        hp = tl.load(y_ptr + (t - 1) * sy_t + hk, mask=mask_hk, other=0.0, cache_modifier=".cg")
    else:
        # (the pointers are formed here, not before the branch: formed before it, this path
        # measured 18% slower at H=512 on the H200)
        hp = _await_state(ybits_ptr + (t - 1) * sy_t + rows[:, None] * sy_b + ks[None, :],
                          mask_hk, COUNT_ONLY).to(out_ty, bitcast=True)
    return hp


@triton.jit
def _cfc_split_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, ybits_ptr, dt, B, T, H,
                      sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                      SERIES_BELOW: tl.constexpr, FAST_TANH: tl.constexpr,
                      K_SPLIT: tl.constexpr, CLUSTER: tl.constexpr):
    """The split design: program (pb, pn) computes columns ``pn*BLOCK_N ...`` of rows
    ``pb*BLOCK_B ...`` for every step. The grid is 1-D with pn fastest.

    ``K_SPLIT == 2`` (``W_RESIDENT`` only): the step's dot is two independent dots over the
    halves of the contraction axis, summed, each half of ``h_{t-1}`` read (or awaited) on
    its own, so the two chains of MMAs interleave and the first can start while the
    second half is still loading.

    ``CLUSTER``: the programs of a batch block form one thread-block cluster; step t writes
    ``y_t`` with plain stores, and step t+1 meets its siblings at the cluster barrier
    (release / acquire) before it reads ``y[rows, t, :]``. Otherwise ``ybits_ptr`` is ``y``
    viewed as integers of its width, pre-filled with all ones: step t publishes ``y_t``
    there and step t+1 waits for all of its rows' words to arrive."""
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
    bits_ty = ybits_ptr.dtype.element_ty

    # the state is of this program's own columns
    alpha, gain, h = _start(h0_ptr, tau_ptr, rows, cols, mask, mask_n, dt, sh_b, SERIES_BELOW)
    # the halves of the contraction axis (used where K_SPLIT == 2)
    KH: tl.constexpr = BLOCK_H // 2
    ks0 = tl.arange(0, KH)
    ks1 = KH + ks0
    if W_RESIDENT:
        if K_SPLIT == 2:
            w0 = _load_w(w_ptr, sw_k, ks0, ks0 < H, cols, mask_n, DOT_F32, out_ty)
            w1 = _load_w(w_ptr, sw_k, ks1, ks1 < H, cols, mask_n, DOT_F32, out_ty)
        else:
            w = _load_w(w_ptr, sw_k, ks, mask_k, cols, mask_n, DOT_F32, out_ty)
    x_ptrs, step, x_next = _first_x(xw_ptr, rows, cols, mask, T, sx_b)
    y_ptrs = ybits_ptr + rows[:, None] * sy_b + cols[None, :]
    yv_ptrs = y_ptr + rows[:, None] * sy_b + cols[None, :]
    hk = rows[:, None] * sy_b + ks[None, :]
    hk0 = rows[:, None] * sy_b + ks0[None, :]
    mask_hk0 = mask_b[:, None] & (ks0 < H)[None, :]
    mask_hk1 = mask_b[:, None] & (ks1 < H)[None, :]
    # num_stages=1: a pipelined loop could issue the next step's loads of y early
    for t in tl.range(0, T, num_stages=1):
        # the next xw load is issued before the wait and the dot, so it hides behind them
        x, x_next = _prefetch(x_ptrs, x_next, mask, step, t, T, sx_t)
        if W_RESIDENT and K_SPLIT == 2:
            hp0 = _previous_state(h0_ptr, sh_b, y_ptr, ybits_ptr, sy_b, sy_t, rows, mask_hk0,
                                  ks0, hk0, t, out_ty, DOT_F32, CLUSTER, True)
            hp1 = _previous_state(h0_ptr, sh_b, y_ptr, ybits_ptr, sy_b, sy_t, rows, mask_hk1,
                                  ks1, hk0 + KH, t, out_ty, DOT_F32, CLUSTER, False)
            if DOT_F32:
                z = tl.dot(hp0.to(tl.float32), w0, x, input_precision="ieee") + \
                    tl.dot(hp1.to(tl.float32), w1, input_precision="ieee")
            else:
                z = tl.dot(hp0, w0, x) + tl.dot(hp1, w1)
        elif W_RESIDENT:
            hp = _previous_state(h0_ptr, sh_b, y_ptr, ybits_ptr, sy_b, sy_t, rows, mask_hk, ks,
                                 hk, t, out_ty, DOT_F32, CLUSTER, True)
            if DOT_F32:
                z = tl.dot(hp.to(tl.float32), w, x, input_precision="ieee")
            else:
                z = tl.dot(hp, w, x)
        else:
            if t == 0:
                acc = _streamed_matmul(h0_ptr, sh_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H,
                                       BLOCK_B, BLOCK_H, BLOCK_N, BLOCK_K, DOT_F32, False, h0_ptr)
            else:
                if CLUSTER:
                    _cluster_barrier(t)   # then y_{t-1} is read without waiting on each slice
                acc = _streamed_matmul(y_ptr + (t - 1) * sy_t, sy_b, w_ptr, sw_k, rows, mask_b,
                                       cols, mask_n, H, BLOCK_B, BLOCK_H, BLOCK_N, BLOCK_K,
                                       DOT_F32, not CLUSTER, ybits_ptr + (t - 1) * sy_t)
            z = x + acc
        h = alpha * h + gain * _tanh(z, FAST_TANH)
        if CLUSTER:
            tl.store(yv_ptrs + t * sy_t, h.to(out_ty), mask=mask)
        else:
            _publish(y_ptrs + t * sy_t, h, mask, out_ty, bits_ty)


#: whether this process runs the kernels in Triton's interpreter: ``triton.jit`` reads
#: ``TRITON_INTERPRET`` when a kernel is decorated (at import), so the kernel objects say
#: what runs, whatever the variable says later
_INTERPRETED = not isinstance(_cfc_split_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int | None:
    """SMs of a CUDA device (the most split programs that are surely co-resident), else None."""
    device = torch.device(device)
    if device.type != "cuda" or _INTERPRETED or not torch.cuda.is_available():
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def clusters_available(device) -> bool:
    """Whether split launches on ``device`` can run as thread-block clusters: compiled Triton
    on a CUDA GPU of compute capability 9.0 or later, with a launcher that can ask for
    clusters (``seqdeploy.launch.cluster_launch_available``)."""
    device = torch.device(device)
    if device.type != "cuda" or _INTERPRETED or not torch.cuda.is_available():
        return False
    return _clusters(device.index if device.index is not None else torch.cuda.current_device())


def _clusters(index: int) -> bool:
    """:func:`clusters_available` for compiled Triton on CUDA device ``index``."""
    return cluster_launch_available() and _capability(index) >= (9, 0)


def wgmma_runs(device) -> bool:
    """Whether the wgmma form (``wgmma.py``) can run on ``device``: thread-block clusters
    (``clusters_available``), compute capability 9.x (wgmma is Hopper's: later GPUs lack the
    instruction, and compiling it for them aborts the process) and Gluon
    (``wgmma_available``)."""
    device = torch.device(device)
    return clusters_available(device) and _wgmma_device(
        device.index if device.index is not None else torch.cuda.current_device())


def _wgmma_device(index: int) -> bool:
    """:func:`wgmma_runs` for a CUDA device where clusters are available."""
    return _capability(index)[0] == 9 and wgmma_available()


@functools.lru_cache(maxsize=None)
def wgmma_available() -> bool:
    """Whether this Triton has Gluon's warpgroup MMA, which the Hopper form of the cluster
    kernel (``wgmma.py``) is written in."""
    try:
        from seqdeploy_cfc.wgmma import _cfc_wgmma_kernel
    except (ImportError, AttributeError):
        return False
    return _cfc_wgmma_kernel is not None


#: the block_h (H rounded up) at which the cluster kernel defaults to its wgmma form. With
#: the exchange through shared memory (``wgmma.py``), on the H200 (fp16, CUDA-graph time, a
#: prototype of the same kernel, 2026-12-05) it beat the Triton cluster kernel at every seed
#: point: 17.9 against 19.3 us at B=32 T=10 H=256, 34.5 against 65.9 at B=64 T=50, 63.4
#: against 130.5 at B=128 T=100, 66.5 against 115.1 at B=256 T=50 H=512; the integrated
#: kernel on an H100 the same day: 16.8-18.0 / 37.6-37.8 / 66.3-66.8 / 66.9-67.0 against
#: 19.7 / 70.2 / 134.4 / 113.0-113.2. At a smaller block_h the Triton kernels stay the
#: default (not measured there)
WGMMA_BLOCK_H = (256, 512)
#: whether ``launch_config`` picks the wgmma form by itself (at ``WGMMA_BLOCK_H``, fp16/bf16,
#: where it runs: ``wgmma_runs``); ``wgmma=True`` asks for it anywhere it can run
WGMMA_BY_DEFAULT = True


def _block_h(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def _rows_config(B: int, H: int, dtype: torch.dtype) -> dict:
    block_h = _block_h(H)
    dot_bytes = 4 if dtype == torch.float32 else 2
    # 4 warps where the step's tanh is the hardware one (fp16/bf16): on the H200 at H=256,
    # B=64 T=50, 0.0715 ms against 0.0760 with 8; with the exp-based tanh, 8 warps won
    # (0.0885 against 0.0934)
    return {"method": "rows", "block_b": 16,
            "num_warps": 4 if block_h <= 128 or (dot_bytes == 2 and block_h <= 256) else 8,
            "w_resident": block_h * block_h * dot_bytes <= W_RESIDENT_BYTES,
            "block_k": min(32, block_h), "block_n": block_h}


def split_tile_defaults(block_b: int, block_n: int, H: int, dtype: torch.dtype) -> dict:
    """``w_resident`` and ``num_warps`` for a split tiling. Register limits, from ptxas for
    sm_90 (no spills at these sizes, spills just above): with ``w_rec`` resident, the dot's
    operand tiles are all in registers within a step, so the resident slice is kept to
    ``block_b * block_h * block_n <= 2^20`` (fp16/bf16: mma fed from shared memory) or
    ``2^18`` (fp32: ``input_precision="ieee"`` is an FMA loop over register tiles); above
    that, w is streamed in ``block_k`` slices, which needs few registers."""
    block_h = _block_h(H)
    volume = block_b * block_h * block_n
    if dtype == torch.float32:
        # 16 rows with 8 warps made ptxas spill heavily at H=256..512; 4 warps did not
        return {"w_resident": volume <= 2 ** 18, "num_warps": 4 if block_b == 16 else 8}
    return {"w_resident": volume <= 2 ** 20 and block_h * block_n * 2 <= W_RESIDENT_BYTES,
            "num_warps": 4 if block_b * block_h <= 16 * 512 else 8}


def _split_config(B: int, H: int, dtype: torch.dtype, sms: int | None,
                  clusters: bool = False, wgmma: bool | None = None) -> dict:
    block_h = _block_h(H)
    if clusters and (wgmma or (wgmma is None and WGMMA_BY_DEFAULT and dtype != torch.float32
                                and block_h in WGMMA_BLOCK_H)):
        # (asked for where it cannot run, the plan refuses it: _wgmma_plan)
        # the wgmma form (wgmma.py): the default at WGMMA_BLOCK_H (measured there); at
        # H <= 256, 4 programs of 64 columns (0.060 ms against 0.068 for 2 of 128 at
        # B=64 T=50 H=256, with the exchange through y)
        block_n = 64 if block_h <= 256 else 128
        return {"method": "split", "block_b": 16, "block_k": min(32, block_h),
                "block_n": block_n, "cluster": True, "k_split": 1, "w_resident": True,
                "num_warps": block_n // 16, "wgmma": True}
    if clusters:
        # One cluster per batch block of 16 rows; its programs share the columns. On the
        # H200 (fp16, CUDA-graph time): 8 programs of 32 columns at H=256 (0.0653 ms at
        # B=64 T=50 against 0.0720 with 4 of 64), 4 programs of 128 columns at H=512
        # (0.1145 ms at B=256 T=50 against 0.1298 with 8 of 64 and 0.1524 with 16 of 32).
        # At H=512 the dot runs as two half-K dots (k_split 2): 0.112 against 0.116 ms at
        # B=256 T=50; at H=256 one dot stayed faster (0.066 against 0.069 ms at B=64 T=50).
        wide = dtype != torch.float32 and block_h >= 512
        block_n = max(16, block_h // (4 if wide else MAX_CLUSTER))
        return {"method": "split", "block_b": 16, "block_k": min(32, block_h),
                "block_n": block_n, "cluster": True, "k_split": 2 if wide else 1,
                "wgmma": False, **split_tile_defaults(16, block_n, H, dtype)}
    # w slice [block_h, block_n] on chip: 64 KiB at H=512 in fp16 (block_n 64) and in fp32
    # (block_n 32); narrower slices at H <= 256, where more programs share the short step
    block_n = min(32 if dtype == torch.float32 or block_h < 512 else 64, block_h)
    n_nb = triton.cdiv(H, block_n)
    # 16 rows per block (the smallest dot tile, the most programs) unless the grid would
    # outgrow the GPU; 64 rows is the largest block tried
    block_b = 16
    while sms is not None and block_b < 64 and triton.cdiv(B, block_b) * n_nb > sms:
        block_b *= 2
    return {"method": "split", "block_b": block_b, "block_k": min(32, block_h),
            "block_n": block_n, "cluster": False, "k_split": 1, "wgmma": False,
            **split_tile_defaults(block_b, block_n, H, dtype)}


def split_grid(B: int, H: int, block_b: int, block_n: int) -> tuple[int, int]:
    """(batch blocks, column blocks) of the split kernel."""
    return triton.cdiv(B, block_b), triton.cdiv(H, block_n)


def launch_config(B: int, H: int, dtype: torch.dtype, device=None, method: str | None = None,
                  T: int | None = None, wgmma: bool | None = None) -> dict:
    """Default launch for ``[B, T, H]`` inputs of ``dtype`` on ``device``: ``method``,
    ``block_b``, ``block_n`` (columns per program: all of ``block_h`` for rows), ``num_warps``,
    ``w_resident``, ``block_k`` and, for ``split``, ``cluster``, ``k_split`` and ``wgmma``
    (benchmarks/cfc_scan.py --sweep measures the alternatives).

    ``split`` runs as thread-block clusters (one per batch block, see ``_cfc_split_kernel``)
    where ``clusters_available``: Hopper on, with a launcher that can ask for clusters. It is
    chosen there for H >= 256 over several steps: on the H200 (fp16, CUDA-graph time, hardware
    tanh) it beat rows at every seed point (0.0170 against 0.0203 ms at B=32 T=10 H=256,
    0.0653 against 0.0716 at B=64 T=50, 0.1266 against 0.1370 at B=128 T=100) and beat
    cluster-less split at H=512 (0.1145 against 0.1388 ms at B=256 T=50). A cluster's
    programs are scheduled together, so any number of clusters may run. ``wgmma=True`` asks
    for the clusters' wgmma form (``wgmma.py``; also for a single step, and at any H, where
    the plan then refuses what it cannot run: fp32, H rounded up outside 64..512). With
    ``WGMMA_BY_DEFAULT``, where it runs (``wgmma_runs``), it is also the default in fp16/bf16
    at ``block_h`` 256 or 512 over several steps; ``wgmma=False`` asks for the Triton
    cluster kernel's defaults.

    Without clusters, ``split`` is chosen on a CUDA device when its grid fits on the SMs (its
    programs wait on each other, so all must be resident), H spans at least two column
    blocks, and either ``rows`` could not keep ``w_rec`` on chip (it would re-read all of it
    from L2 every step, in every program) or there is a single step (``T == 1``, a streaming
    step: no program waits on another, each loads only its slice of ``w_rec``, and ``y``
    needs no "not arrived" fill; a single step keeps this tiling with clusters too). There,
    rows beat split at H=256 over many steps (0.0715 against 0.0784 ms at B=64 T=50); split
    won 6x at H=512 (0.135 against 0.82 ms at B=256 T=50) and at T=1 (3.4 against 5.1 us at
    H=256 and B=1..32, 4.3 against 13.0 us at H=512). Otherwise ``rows``, which has no
    exchange between programs. ``method`` forces one design (its defaults are returned). The
    result is a fresh dict the caller may change."""
    if method not in (None, *METHODS):
        raise ValueError(f"method must be None, 'rows' or 'split', not {method!r}")
    sms = sm_count(device) if device is not None else None
    clusters = device is not None and clusters_available(device)
    if wgmma is None and not (device is not None and wgmma_runs(device)):
        wgmma = False   # no wgmma form by default where it cannot run
    return dict(_launch_config(B, H, dtype, sms, method, T == 1, clusters, wgmma))


@functools.lru_cache(maxsize=4096)
def _launch_config(B: int, H: int, dtype: torch.dtype, sms: int | None, method: str | None,
                   single_step: bool = False, clusters: bool = False,
                   wgmma: bool | None = None) -> dict:
    rows = _rows_config(B, H, dtype)
    if method == "rows":
        return rows
    if clusters and (not single_step or wgmma):
        split = _split_config(B, H, dtype, sms, clusters=True, wgmma=wgmma)
        if method == "split" or wgmma:
            return split
        # (from H >= 256 on, the cluster tilings always have 3 to 8 column blocks)
        return split if _block_h(H) >= 256 else rows
    split = _split_config(B, H, dtype, sms)
    if method == "split":
        return split
    n_bb, n_nb = split_grid(B, H, split["block_b"], split["block_n"])
    wins = single_step or not rows["w_resident"]
    if sms is not None and n_bb * n_nb <= sms and n_nb >= 2 and wins:
        return split
    return rows


_rows_launcher = Launcher(_cfc_scan_kernel, tensors=5)
_split_launcher = Launcher(_cfc_split_kernel, tensors=6)


@functools.lru_cache(maxsize=None)
def _wgmma_launcher() -> Launcher:
    """The launcher of the wgmma form (imported on first use: Gluon loads only where it
    runs)."""
    from seqdeploy_cfc.wgmma import _cfc_wgmma_kernel

    return Launcher(_cfc_wgmma_kernel, tensors=5)


def _make_plan(B: int, H: int, dtype: torch.dtype, compiled_cuda: bool, device: int,
               cfg: dict) -> tuple:
    """Everything about a launch that follows from the config and the inputs' shape, dtype
    and device: ``(method, grid, constexpr values, num_warps, batch blocks, column
    blocks)``. ``compiled_cuda``: CUDA tensors and compiled Triton (not the interpreter)."""
    block_h = _block_h(H)
    # The interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.9), so there a
    # bf16 dot runs on fp32 copies of the bf16 values: the same products, exactly.
    dot_f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and not compiled_cuda)
    # the approximate hardware tanh (``_tanh``): fp16/bf16 on a GPU that has it (sm_75 on),
    # unless the config says otherwise
    fast_tanh = (dtype != torch.float32 and compiled_cuda and cfg.get("fast_tanh", True)
                 and _capability(device) >= (7, 5))
    block_k = min(cfg["block_k"], block_h)
    if cfg["method"] == "split":
        block_b, block_n = cfg["block_b"], min(cfg["block_n"], block_h)
        if cfg.get("wgmma"):
            return _wgmma_plan(B, H, dtype, block_h, block_b, block_n, cfg, fast_tanh)
        if block_b < 16 or block_n < 16:
            raise ValueError(f"split needs block_b and block_n >= 16 (tl.dot), got {block_b}, "
                             f"{block_n}")
        n_bb, n_nb = split_grid(B, H, block_b, block_n)
        if cfg["cluster"] and n_nb > MAX_CLUSTER:
            raise RuntimeError(
                f"cfc_scan method='split': {n_nb} column blocks exceed the largest cluster "
                f"({MAX_CLUSTER} programs); raise block_n or pass cluster=False")
        k_split = cfg.get("k_split", 1)
        if k_split not in (1, 2) or (k_split == 2 and not (cfg["w_resident"] and block_h >= 32)):
            raise ValueError(f"split k_split must be 1, or 2 with w_rec resident and H > 16 "
                             f"(each half >= 16 for tl.dot), got {k_split}")
        values = (block_b, block_h, block_n, block_k, cfg["w_resident"], dot_f32, SERIES_BELOW,
                  fast_tanh, k_split, cfg["cluster"])
        return "split", (n_bb * n_nb,), values, cfg["num_warps"], n_bb, n_nb
    values = (cfg["block_b"], block_h, block_k, cfg["w_resident"], dot_f32, SERIES_BELOW,
              fast_tanh)
    return "rows", (triton.cdiv(B, cfg["block_b"]),), values, cfg["num_warps"], None, None


def _wgmma_plan(B, H, dtype, block_h, block_b, block_n, cfg, fast_tanh) -> tuple:
    """:func:`_make_plan` for the wgmma form, refusing tilings it cannot run (see
    ``wgmma.py``; its column blocks, at most 512 / 64, always form one cluster)."""
    if dtype == torch.float32:   # (without cluster launches triton_cfc_scan refuses first)
        raise ValueError(f"cfc_scan wgmma=True needs fp16 or bf16 inputs, got {dtype}")
    if block_b != 16 or block_n not in (64, 128) or cfg["num_warps"] != block_n // 16 or \
            not 64 <= block_h <= 512 or not cfg["w_resident"] or cfg.get("k_split", 1) != 1:
        raise ValueError(
            "cfc_scan wgmma=True runs 16 rows per program, block_n 64 or 128 columns with "
            "block_n / 16 warps, w_rec resident, one dot (k_split 1), and 64 <= H (rounded up "
            f"to a power of two) <= 512; got block_b={block_b}, block_n={block_n}, "
            f"num_warps={cfg['num_warps']}, w_resident={cfg['w_resident']}, "
            f"k_split={cfg.get('k_split', 1)}, H={H}")
    n_bb, n_nb = split_grid(B, H, block_b, block_n)
    values = (block_b, block_h, block_n, n_nb, SERIES_BELOW, fast_tanh, cfg["num_warps"])
    return "wgmma", (n_bb * n_nb,), values, cfg["num_warps"], n_bb, n_nb


@functools.lru_cache(maxsize=4096)
def _default_plan(B: int, H: int, dtype: torch.dtype, compiled_cuda: bool, device: int,
                  method: str | None, single_step: bool, clusters: bool,
                  wgmma: bool | None = None) -> tuple:
    """:func:`_make_plan` of :func:`launch_config`'s choice, memoised: it runs per call."""
    sms = _sm_count(device) if compiled_cuda else None
    return _make_plan(B, H, dtype, compiled_cuda, device,
                      _launch_config(B, H, dtype, sms, method, single_step, clusters, wgmma))


def _scalars(xw, h0, w_rec, y, dt) -> tuple:
    """The scalar arguments every cfc kernel takes after its tensors, in signature order:
    ``dt, B, T, H, sx_b, sx_t, sh_b, sw_k, sy_b, sy_t``."""
    sx, sy = xw.stride(), y.stride()
    return (float(dt), *xw.shape, sx[0], sx[1], h0.stride(0), w_rec.stride(0), sy[0], sy[1])


#: ``(h_off, bar_off)`` of the wgmma form's binaries, by constexpr values and dtype
_WGMMA_OFFSETS: dict[tuple, tuple[int, int]] = {}


def _wgmma_offsets(plan: tuple, args: tuple) -> tuple[int, int]:
    """The byte offsets in shared memory of the wgmma form's ``h`` buffers and mbarriers
    (its ``h_off`` and ``bar_off``, see ``wgmma.py``) in the binary that ``plan`` launches
    (:func:`wgmma_shared_offsets` of its PTX). Compiled here (``Launcher.compile``, which
    Triton caches for the launch; the offsets are never specialized on) on first use of a
    plan and dtype."""
    key = (plan[2], args[0].dtype)
    offsets = _WGMMA_OFFSETS.get(key)
    if offsets is None:
        binary = _wgmma_launcher().compile(plan[1], (*args, 0, 16), plan[2],
                                           num_warps=plan[3])
        offsets = wgmma_shared_offsets(binary.asm["ptx"], plan[2][0] * plan[2][1] * 2)
        if offsets is None:
            raise RuntimeError(f"cfc_scan: cannot locate the wgmma kernel's shared buffers "
                               f"in its PTX (triton {triton.__version__}); pass wgmma=False")
        _WGMMA_OFFSETS[key] = offsets
    return offsets


def wgmma_shared_offsets(ptx: str, buffer_bytes: int) -> tuple[int, int] | None:
    """``(h_off, bar_off)`` in the wgmma form's PTX: the mbarriers are the first words of the
    third ``h`` buffer (of ``buffer_bytes``) in the same allocation, so the offset from
    ``global_smem`` that the first ``mbarrier.init`` addresses gives both. None where that
    is not found, or gives buffers off the 1024-byte alignment their swizzle needs."""
    init = re.search(r"mbarrier\.init\.shared::cta\.b64 \[(%r\d+)\], 1;", ptx)
    add = init and re.search(r"add\.s32\s+" + re.escape(init.group(1)) + r", %r\d+, (\d+);",
                             ptx)
    if not add:
        return None
    h_off = int(add.group(1)) - 2 * buffer_bytes
    return (h_off, h_off + 2 * buffer_bytes) if h_off >= 0 and h_off % 1024 == 0 else None


def _launch_wgmma(xw, h0, w_rec, tau, y, dt, plan, signature=None):
    """Launch the wgmma form as clusters of a batch block's programs; with ``signature``,
    also keep the launch ready for repeat calls (see ``_READY``)."""
    args = (xw, h0, w_rec, tau, y, *_scalars(xw, h0, w_rec, y, dt))
    args = (*args, *_wgmma_offsets(plan, args))
    launcher = _wgmma_launcher()
    launcher.clustered(plan[1], plan[5], args, plan[2], num_warps=plan[3])
    if signature is not None:
        _ready(signature, launcher.bind(plan[1], args, plan[2], plan[5], num_warps=plan[3]),
               False)


def _launch_rows(xw, h0, w_rec, tau, y, dt, plan, signature=None):
    """Launch the rows kernel; with ``signature``, also keep the launch ready for repeat
    calls (see ``_READY``)."""
    args = (xw, h0, w_rec, tau, y, *_scalars(xw, h0, w_rec, y, dt))
    _rows_launcher(plan[1], args, plan[2], num_warps=plan[3])
    if signature is not None:
        _ready(signature, _rows_launcher.bind(plan[1], args, plan[2], num_warps=plan[3]), False)


#: integer views of y for each width: the split kernel's exchange words
_BITS = {2: torch.int16, 4: torch.int32}


def _launch_split(xw, h0, w_rec, tau, y, dt, plan, signature=None):
    """Launch the split kernel, refusing the launches that could hang: more programs than
    SMs, or (in the interpreter, which runs programs one by one) any launch where a program
    waits on a sibling: more than one column block per batch block and more than one step.
    Inputs as prepared by ``triton_cfc_scan``; ``plan`` checked by ``_make_plan``. With
    ``signature``, also keep the launch ready for repeat calls (see ``_READY``) where it
    needs nothing else: as clusters, or a single step (no fill of ``y``)."""
    T = xw.shape[1]
    n_bb, n_nb = plan[4], plan[5]
    scalars = _scalars(xw, h0, w_rec, y, dt)
    if plan[2][-1]:
        # CLUSTER: a batch block's programs meet at the cluster barrier; the kernel never
        # touches the integer view, so y stands in for it
        args = (xw, h0, w_rec, tau, y, y, *scalars)
        _split_launcher.clustered(plan[1], n_nb, args, plan[2], num_warps=plan[3])
        if signature is not None:
            _ready(signature, _split_launcher.bind(plan[1], args, plan[2], n_nb,
                                                   num_warps=plan[3]), True)
        return
    if _INTERPRETED or not xw.is_cuda:
        if n_nb > 1 and T > 1:   # with one column block or one step, nobody waits on another
            raise RuntimeError(
                "cfc_scan method='split' cannot run in the Triton interpreter: it runs programs "
                "one after another, and a program would wait forever for the previous step of "
                f"a sibling that has not started ({n_nb} column blocks per batch block); use "
                "method='rows' (the default on CPU)")
    else:
        sms = _sm_count(xw.get_device())
        if n_bb * n_nb > sms:
            raise RuntimeError(
                f"cfc_scan method='split': {n_bb} x {n_nb} = {n_bb * n_nb} programs exceed the "
                f"{sms} SMs, so not all would be resident and a program could wait forever on "
                "a sibling that never starts; raise block_b / block_n or use method='rows'")
    ybits = y.view(_BITS[y.element_size()])
    if T > 1:   # (with one step nobody waits: step 0 reads h0)
        ybits.fill_(-1)   # every word "not arrived" (see _await_state); a memset under graphs
    args = (xw, h0, w_rec, tau, y, ybits, *scalars)
    _split_launcher(plan[1], args, plan[2], num_warps=plan[3])
    if signature is not None and T == 1:   # (ybits is y's memory: y stands in for it)
        _ready(signature, _split_launcher.bind(plan[1], args, plan[2], num_warps=plan[3]), True)


#: launches of :func:`triton_cfc_scan`'s default plan kept ready by call signature
#: (``_signature``): ``(run, split)``, where ``run`` is a bound launch
#: (``seqdeploy.launch.Launcher.bind``) of ``(xw, h0, w_rec, tau, y)`` plus ``y`` once more
#: where ``split``. A repeat eager call then reads its inputs' layout once and launches,
#: without ``_prepare``'s conversions, the plan and the launcher's own key.
_READY: dict[tuple, tuple] = {}


def _signature(xw, h0, w_rec, tau, dt) -> tuple:
    """Everything a default launch depends on but the tensors' addresses: the device, each
    input's dtype and layout (which decide ``_prepare``'s conversions, the plan, the
    strides passed and ``y``'s layout) and ``dt``."""
    return (xw.get_device(), xw.shape, xw.stride(), xw.dtype, h0.stride(), h0.dtype,
            w_rec.stride(0), w_rec.is_contiguous(), w_rec.dtype, tau.is_contiguous(),
            tau.dtype, dt)


def _ready(signature: tuple, run, split: bool) -> None:
    if run is not None:
        if len(_READY) >= 4096:
            _READY.clear()
        _READY[signature] = (run, split)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _prepare(xw, h0, w_rec, tau, out):
    # Each check is a Python attribute test, so the common case (everything already in
    # place) costs no tensor op: this runs on every eager call.
    if xw.stride(2) != 1:
        xw = xw.contiguous()
    # the op's contract (ONNX type T) gives xw, h0 and w_rec one dtype; the kernels rely on
    # it, since the dot's operands are h0 or y and w_rec as stored
    if h0.dtype != xw.dtype:
        h0 = h0.to(xw.dtype)
    if h0.stride(1) != 1:
        h0 = h0.contiguous()
    if w_rec.dtype != xw.dtype:
        w_rec = w_rec.to(xw.dtype)
    if not w_rec.is_contiguous():
        w_rec = w_rec.contiguous()
    if tau.dtype != torch.float32:
        tau = tau.float()
    if not tau.is_contiguous():
        tau = tau.contiguous()
    if out is None:
        return xw, h0, w_rec, tau, torch.empty_like(xw, memory_format=torch.contiguous_format)
    if out.shape != xw.shape or out.dtype != xw.dtype or out.device != xw.device or \
            (out.numel() and out.stride(2) != 1):
        raise ValueError(f"cfc_scan out must be {tuple(xw.shape)} {xw.dtype} on {xw.device} "
                         f"with unit stride over H, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device} with strides {out.stride()}")
    if any(_shares_memory(out, t) for t in (xw, h0, w_rec, tau)):
        # the kernels read inputs after writing y (and split fills y first)
        raise ValueError("cfc_scan out shares memory with an input")
    return xw, h0, w_rec, tau, out


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors use one storage (conservatively: any overlap of storages)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def triton_cfc_scan(xw, h0, w_rec, tau, dt: float, out=None, block_b=None, num_warps=None,
                    w_resident=None, block_k=None, method=None, block_n=None, fast_tanh=None,
                    cluster=None, k_split=None, wgmma=None) -> torch.Tensor:
    """Launch one of the kernels. ``xw [B, T, H]`` and ``h0 [B, H]`` may be strided views with
    unit stride over H (``h0`` is typically ``h[:, layer]`` of a ``[B, L, H]`` state); ``h0``
    and ``w_rec [H, H]`` share the dtype of ``xw`` (fp32, fp16 or bf16), ``tau [H]`` is fp32.
    ``out``: an optional preallocated ``y [B, T, H]`` in the dtype of ``xw``, unit stride over
    H. ``method``: ``None`` (``launch_config`` picks), ``"rows"`` or ``"split"`` (CUDA only;
    raises where it could deadlock). The other keywords override :func:`launch_config`'s
    defaults for the method that runs (``block_n`` only matters to ``split``;
    ``fast_tanh=False`` keeps the exp-based tanh on fp16/bf16 GPU inputs). ``cluster``:
    whether ``split`` runs as thread-block clusters; ``None`` where ``clusters_available``,
    ``False`` for the cluster-less exchange (and its defaults); ``True`` raises where
    clusters are not available. ``k_split``: ``split``'s dot as 1 or 2 independent dots
    over the contraction axis (2 needs ``w_rec`` resident). ``wgmma``: whether the cluster
    split runs its wgmma form (``wgmma.py``); ``None`` takes it where ``launch_config`` does
    unless another keyword above is given (those tune the Triton kernel), ``False`` never,
    ``True`` always (with ``block_n``, ``fast_tanh`` and a ``num_warps`` of ``block_n / 16``
    as its only knobs; raises where it cannot run: no clusters, not compute capability 9.x,
    no Gluon, fp32, H rounded up outside 64..512)."""
    tuned = (block_b or num_warps or w_resident is not None or block_k or block_n
             or fast_tanh is not None or k_split)
    signature = None
    if out is None and method is None and cluster is None and wgmma is None and not tuned:
        # a repeat eager call: launch what the first one prepared (see _READY)
        signature = _signature(xw, h0, w_rec, tau, dt)
        ready = _READY.get(signature)
        if ready is not None:
            y = torch.empty_like(xw, memory_format=torch.contiguous_format)
            run, split = ready
            if run(xw, h0, w_rec, tau, y, y) if split else run(xw, h0, w_rec, tau, y):
                return y
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"method must be None, 'rows' or 'split', not {method!r}")
        if method == "split" and (not xw.is_cuda or _INTERPRETED):
            raise RuntimeError(
                "cfc_scan method='split' needs a CUDA device and compiled Triton: in the "
                "interpreter (CPU tensors, TRITON_INTERPRET=1) programs run one after another, "
                "so one would wait forever for the previous step of a sibling that has not "
                "started; use method='rows' (the default there)")
    B, T, H = xw.shape
    given = (xw, h0, w_rec, tau)
    xw, h0, w_rec, tau, y = _prepare(xw, h0, w_rec, tau, out)
    if B == 0 or T == 0:
        return y
    compiled_cuda = xw.is_cuda and not _INTERPRETED
    if not compiled_cuda or any(a is not b for a, b in zip(given, (xw, h0, w_rec, tau))):
        signature = None   # kept ready only where the inputs were used as given
    device = xw.get_device() if compiled_cuda else -1
    clusters = compiled_cuda and _clusters(device)
    if cluster and not clusters:
        raise RuntimeError("cfc_scan cluster=True needs thread-block clusters: a CUDA GPU of "
                           "compute capability 9.0 or later and compiled Triton "
                           "(seqdeploy.launch.cluster_launch_available)")
    if cluster is not None:
        clusters = cluster
    runs = clusters and _wgmma_device(device)   # (clusters: compiled CUDA, so a device index)
    if wgmma:
        if method == "rows" or not runs:
            raise RuntimeError(
                "cfc_scan wgmma=True needs the cluster split kernel (method None or 'split', "
                "cluster launches, compiled Triton), a GPU of compute capability 9.x and "
                "Gluon (seqdeploy_cfc.kernels.wgmma_runs)")
    elif wgmma is None and (tuned or not runs):
        wgmma = False   # tuning keywords tune the Triton kernel; nor where it cannot run
    if tuned:
        sms = _sm_count(device) if compiled_cuda else None
        cfg = dict(_launch_config(B, H, xw.dtype, sms, method, T == 1, clusters, wgmma))
        overrides = {"block_b": block_b, "num_warps": num_warps, "w_resident": w_resident,
                     "block_k": block_k, "block_n": block_n, "fast_tanh": fast_tanh,
                     "k_split": k_split}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        if cfg.get("wgmma"):
            if block_k:
                raise ValueError("cfc_scan block_k sizes the Triton kernel's slices of a "
                                 "streamed w_rec; the wgmma form keeps w_rec in registers "
                                 "(drop block_k, or pass wgmma=False)")
            if num_warps is None:   # the wgmma form's warps follow its columns
                cfg["num_warps"] = min(cfg["block_n"], _block_h(H)) // 16
        plan = _make_plan(B, H, xw.dtype, compiled_cuda, device, cfg)
    else:
        plan = _default_plan(B, H, xw.dtype, compiled_cuda, device, method, T == 1, clusters,
                             wgmma)
    _LAUNCH[plan[0]](xw, h0, w_rec, tau, y, dt, plan, signature)
    return y


_LAUNCH = {"rows": _launch_rows, "split": _launch_split, "wgmma": _launch_wgmma}
