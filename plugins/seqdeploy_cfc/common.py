"""The step every ``cfc_scan`` kernel design shares (Triton ``@jit`` helpers), for a tile of
rows x columns: ``h_t = alpha * h_{t-1} + (1 - alpha) * tanh(xw_t + h_{t-1} @ w_rec)``,
``alpha = exp(-dt / tau)``. ``h`` stays in fp32 registers; the dot takes ``h_{t-1}`` rounded
to the input dtype and ``w_rec`` as stored, accumulating in fp32 (``DOT_F32``: fp32 operands,
``input_precision="ieee"``). ``tl.dot`` needs every dimension >= 16, so tiles are powers of
two >= 16, padded rows and columns masked (padded columns of ``h`` stay exactly 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: below this ``dt / tau`` the series form of ``1 - exp(-r)`` is used (``_one_minus_exp_neg``)
SERIES_BELOW = 0.5


@triton.jit
def _tanh(z, FAST_TANH: tl.constexpr):
    """``tanh`` of an fp32 tile. ``FAST_TANH`` (fp16/bf16 on a GPU): ``tanh.approx.f32``, one
    instruction, relative error 2^-10.987 (fp16's rounding of ``y`` is 2^-11). Else from
    ``exp(-2|z|)`` in (0, 1], which cannot overflow (the interpreter has no inline PTX)."""
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z],
                                         dtype=tl.float32, is_pure=True, pack=1)
    e = tl.exp(-2.0 * tl.abs(z))
    t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _one_minus_exp_neg(r, SERIES_BELOW: tl.constexpr):
    """``1 - exp(-r)`` for ``r >= 0`` (Triton has no expm1): the series to r^8 below
    ``SERIES_BELOW``, where ``1 - exp`` would lose the digits of a tiny gain (tau >> dt)."""
    s = r * (1.0 - r / 2.0 * (1.0 - r / 3.0 * (1.0 - r / 4.0 * (1.0 - r / 5.0 * (
        1.0 - r / 6.0 * (1.0 - r / 7.0 * (1.0 - r / 8.0)))))))
    return tl.where(r < SERIES_BELOW, s, 1.0 - tl.exp(-r))


@triton.jit
def _start(h0_ptr, tau_ptr, rows, cols, mask, mask_n, dt, sh_b, SERIES_BELOW: tl.constexpr):
    """``alpha`` and ``1 - alpha`` as fp32 ``[1, cols]`` (padded columns: tau = 1, unused),
    and the fp32 state ``h0[rows, cols]``."""
    r = dt / tl.load(tau_ptr + cols, mask=mask_n, other=1.0).to(tl.float32)
    alpha, gain = tl.exp(-r)[None, :], _one_minus_exp_neg(r, SERIES_BELOW)[None, :]
    h = tl.load(h0_ptr + rows[:, None] * sh_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return alpha, gain, h


@triton.jit
def _load_w(w_ptr, sw_k, ks, mask_k, cols, mask_n, DOT_F32: tl.constexpr, out_ty: tl.constexpr):
    """``w_rec[ks, cols]`` in the dot's operand dtype (loaded once, kept on chip)."""
    w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :], mask=mask_k[:, None] & mask_n[None, :],
                other=0.0)
    if DOT_F32:
        return w.to(tl.float32)
    return w.to(out_ty)


@triton.jit
def _first_x(xw_ptr, rows, cols, mask, T, sx_b):
    """The tile's pointers into ``xw``, a per-row time index ``step`` (zeros: masks stay
    vectors) and the step-0 tile."""
    x_ptrs = xw_ptr + rows[:, None] * sx_b + cols[None, :]
    step = rows * 0
    x_next = tl.load(x_ptrs, mask=mask & (step < T)[:, None], other=0.0)
    return x_ptrs, step, x_next


@triton.jit
def _prefetch(x_ptrs, x_next, mask, step, t, T, sx_t):
    """Step t's ``xw`` tile in fp32, and step t+1's load, issued now to hide behind the step."""
    x = x_next.to(tl.float32)
    x_next = tl.load(x_ptrs + (t + 1) * sx_t, mask=mask & (step + t + 1 < T)[:, None],
                     other=0.0)
    return x, x_next


@triton.jit
def _streamed_matmul(a_ptr, sa_b, w_ptr, sw_k, rows, mask_b, cols, mask_n, H,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """``a [BLOCK_B, H] @ w [H, cols]`` in ``BLOCK_K`` slices (``w_rec`` re-read from L2 each
    step); ``a`` (``h0``, or ``y`` of the last step) is read past L1 (``.cg``)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in tl.static_range(0, BLOCK_H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < H
        mask_a = mask_b[:, None] & mask_k[None, :]
        offs = rows[:, None] * sa_b + ks[None, :]
        a = tl.load(a_ptr + offs, mask=mask_a, other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc = acc + tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc = acc + tl.dot(a, w)
    return acc
