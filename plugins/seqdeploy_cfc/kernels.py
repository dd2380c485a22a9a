"""Triton kernel for ``cfc_scan``: all T steps in one launch.

The recurrence is nonlinear, so there is no scan to parallelise over T. Instead the grid runs
over blocks of ``BLOCK_B`` batch rows; each program owns all H columns of its rows and walks
the T steps itself:

- the state ``h [BLOCK_B, BLOCK_H]`` stays in fp32 registers for the whole sequence;
- each step is one ``h @ w_rec`` on the tensor cores (``tl.dot``, fp32 accumulation), then
  ``tanh`` and the blend with ``alpha``;
- ``xw`` is read once (the next step's rows are prefetched while this step computes) and
  ``y`` is written once.

Where ``w_rec`` lives depends on its size (``W_RESIDENT``):

- small enough (``launch_config``: <= 128 KiB, i.e. H <= 256 in fp16/bf16): loaded once before
  the loop and kept on chip;
- larger (H = 512 in fp16 is 512 KiB, more than one SM holds): re-read from global memory
  each step in ``[BLOCK_K, BLOCK_H]`` slices, where it stays in L2. The dot's left operand
  ``h_{t-1}`` is then read back in the same slices from ``y[:, t-1]``, which this program just
  wrote: ``y`` holds ``h`` rounded to the input dtype, exactly the operand the resident path
  feeds to ``tl.dot``, so both paths compute the same thing.

``tl.dot`` needs every dimension >= 16, so ``BLOCK_B >= 16`` and ``BLOCK_H`` is H rounded up
to a power of two >= 16; padded rows and columns are masked (padded columns stay exactly 0).
The kernel also runs under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: largest ``w_rec`` tile (bytes, in the dot's operand dtype) kept on chip for the whole loop
W_RESIDENT_BYTES = 128 * 1024
#: below this ``dt / tau`` the series form of ``1 - exp(-r)`` is used (see ``_one_minus_exp_neg``)
SERIES_BELOW = 0.5


@triton.jit
def _tanh(z):
    # No libdevice in the interpreter, so tanh from exp; exp(-2|z|) lies in (0, 1] and
    # cannot overflow for any z.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
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
def _streamed_matmul(a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_h, H,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """``a [BLOCK_B, H] @ w [H, BLOCK_H]`` with both operands read in ``BLOCK_K`` slices of
    the contraction axis. ``a`` was written earlier in this launch, so it is read past L1
    (``.cg``); ``w`` is re-read every step and served from L2."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in tl.static_range(0, BLOCK_H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < H
        a = tl.load(a_ptr + rows[:, None] * sa_b + ks[None, :],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :],
                    mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    return acc


@triton.jit
def _cfc_scan_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                     sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                     SERIES_BELOW: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask_b = rows < B
    mask_h = cols < H
    mask = mask_b[:, None] & mask_h[None, :]
    out_ty = y_ptr.dtype.element_ty

    # decays in fp32, once per program; padded columns get tau = 1 (finite, unused)
    r = dt / tl.load(tau_ptr + cols, mask=mask_h, other=1.0).to(tl.float32)
    alpha = tl.exp(-r)[None, :]
    gain = _one_minus_exp_neg(r, SERIES_BELOW)[None, :]

    h = tl.load(h0_ptr + rows[:, None] * sh_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if W_RESIDENT:
        w = tl.load(w_ptr + cols[:, None] * sw_k + cols[None, :],
                    mask=mask_h[:, None] & mask_h[None, :], other=0.0)
        if DOT_F32:
            w = w.to(tl.float32)
        else:
            w = w.to(out_ty)

    x_ptrs = xw_ptr + rows[:, None] * sx_b + cols[None, :]
    y_ptrs = y_ptr + rows[:, None] * sy_b + cols[None, :]
    step = rows * 0                       # per-row time index: masks stay vectors
    x_next = tl.load(x_ptrs, mask=mask & (step < T)[:, None], other=0.0)
    # num_stages=1: no software pipelining across steps. The streamed path reads y[:, t-1]
    # back from memory, which a pipelined loop could load before it is stored; the one step
    # of prefetch below hides the latency of xw instead.
    for t in tl.range(0, T, num_stages=1):
        x = x_next.to(tl.float32)
        x_next = tl.load(x_ptrs + (t + 1) * sx_t, mask=mask & (step + t + 1 < T)[:, None],
                         other=0.0)
        if W_RESIDENT:
            if DOT_F32:
                acc = tl.dot(h, w, input_precision="ieee")
            else:
                acc = tl.dot(h.to(out_ty), w)
        else:
            if t == 0:
                acc = _streamed_matmul(h0_ptr, sh_b, w_ptr, sw_k, rows, mask_b, cols, mask_h, H,
                                       BLOCK_B, BLOCK_H, BLOCK_K, DOT_F32)
            else:
                acc = _streamed_matmul(y_ptr + (t - 1) * sy_t, sy_b, w_ptr, sw_k, rows, mask_b,
                                       cols, mask_h, H, BLOCK_B, BLOCK_H, BLOCK_K, DOT_F32)
        h = alpha * h + gain * _tanh(x + acc)
        tl.store(y_ptrs + t * sy_t, h.to(out_ty), mask=mask)
        if not W_RESIDENT:
            tl.debug_barrier()   # every thread's y_t is stored before any thread reads it back


def launch_config(B: int, H: int, dtype: torch.dtype) -> dict[str, int | bool]:
    """Default ``block_b``, ``num_warps``, ``w_resident`` and ``block_k`` (benchmarks/cfc_scan.py
    --sweep measures the alternatives). Blocks of 16 rows (the smallest ``tl.dot`` tile) spread
    the batch over the most SMs, since each step's latency, not bandwidth, bounds the kernel."""
    block_h = max(16, triton.next_power_of_2(H))
    dot_bytes = 4 if dtype == torch.float32 else 2
    return {"block_b": 16,
            "num_warps": 4 if block_h <= 128 else 8,
            "w_resident": block_h * block_h * dot_bytes <= W_RESIDENT_BYTES,
            "block_k": min(32, block_h)}


def triton_cfc_scan(xw, h0, w_rec, tau, dt: float, out=None, block_b=None, num_warps=None,
                    w_resident=None, block_k=None) -> torch.Tensor:
    """Launch the kernel. ``xw [B, T, H]`` and ``h0 [B, H]`` may be strided views with unit
    stride over H (``h0`` is typically ``h[:, layer]`` of a ``[B, L, H]`` state); ``h0`` and
    ``w_rec [H, H]`` share the dtype of ``xw`` (fp32, fp16 or bf16), ``tau [H]`` is fp32.
    ``out``: an optional preallocated ``y [B, T, H]`` in the dtype of ``xw``, unit stride over
    H. The other keywords override :func:`launch_config`."""
    B, T, H = xw.shape
    if xw.stride(2) != 1:
        xw = xw.contiguous()
    # the op's contract (ONNX type T) gives xw, h0 and w_rec one dtype; the kernel relies on
    # it, since the dot's operands are h0 or y (streamed path) and w_rec as stored
    h0, w_rec = h0.to(xw.dtype), w_rec.to(xw.dtype)
    if h0.stride(1) != 1:
        h0 = h0.contiguous()
    w_rec, tau = w_rec.contiguous(), tau.float().contiguous()
    y = torch.empty(B, T, H, dtype=xw.dtype, device=xw.device) if out is None else out
    cfg = launch_config(B, H, xw.dtype)
    block_b = block_b or cfg["block_b"]
    num_warps = num_warps or cfg["num_warps"]
    w_resident = cfg["w_resident"] if w_resident is None else w_resident
    block_h = max(16, triton.next_power_of_2(H))
    block_k = min(block_k or cfg["block_k"], block_h)
    # The interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.9), so on CPU
    # tensors a bf16 dot runs on fp32 copies of the bf16 values: the same products, exactly.
    dot_f32 = xw.dtype == torch.float32 or (xw.dtype == torch.bfloat16 and not xw.is_cuda)
    if B == 0 or T == 0:
        return y
    _cfc_scan_kernel[(triton.cdiv(B, block_b),)](
        xw, h0, w_rec, tau, y, float(dt), B, T, H,
        xw.stride(0), xw.stride(1), h0.stride(0), w_rec.stride(0), y.stride(0), y.stride(1),
        BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, W_RESIDENT=w_resident,
        DOT_F32=dot_f32, SERIES_BELOW=SERIES_BELOW, num_warps=num_warps)
    return y
