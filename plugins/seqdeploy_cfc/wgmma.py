"""The Hopper form of the cluster ``split`` kernel: ``w_rec`` held in registers as the
left operand of warpgroup MMA (wgmma), written in Gluon, Triton's layout-explicit dialect.

Why a second kernel. In the Triton split kernel a step computes ``h_{t-1} [16, K] @ w
[K, BLOCK_N]``. Sixteen rows are too few for wgmma (its M is at least 64), so Triton emits
``mma.sync``, and each step re-reads the program's whole ``w_rec`` slice from shared memory
(128 KiB at H=512) and, in every warp, all of ``h_{t-1}``: about 192 KiB of shared-memory
traffic per step, which bounds the step at H=512. Here the product is computed transposed,
``h_t^T [BLOCK_N, 16] = w^T [BLOCK_N, K] @ h_{t-1}^T [K, 16]``: the program's columns are
wgmma's M (64 per warpgroup), the batch rows its N (16). wgmma may take its left operand
from registers, so ``w^T`` is loaded once, before the loop, straight into that operand
layout (``K/4`` registers per thread: 128 at H=512), and a step reads from shared memory only
``h_{t-1}`` (16 KiB at H=512, once per warpgroup). Plain Triton cannot say this: its
compiler puts a loaded operand in shared memory and converts it inside the loop.

Everything else is the cluster exchange of ``_cfc_split_kernel`` (see ``kernels.py``): one
cluster per batch block, ``y_t`` stored with plain stores, the next step first meets the
siblings at the cluster barrier (release / acquire), then reads ``y[rows, t-1, :]`` past L1
into shared memory (``h0`` at step 0), where wgmma reads it. The state stays fp32 in the
accumulator's registers, ``xw`` is read once (the next step's tile is loaded after this
step's ``h_{t-1}``, which measured 2-4% faster than before it) and ``y`` is written once,
through a layout with 8 contiguous columns per thread. The arithmetic is the split
kernel's, helpers included (``_tanh``, ``_one_minus_exp_neg``): the same fp32
accumulation of fp16/bf16 products, the same blend.

Limits (``kernels._wgmma_plan`` checks them): fp16 or bf16 (fp32 would need tf32, another
precision); 16 batch rows per program; ``BLOCK_N`` of 64 or 128 columns with
``BLOCK_N / 16`` warps (16 rows of M per warp); ``BLOCK_H`` from 64 to 512 (512: the
register budget of ``w^T``); launched as clusters only
(``seqdeploy.launch.Launcher.clustered``). Gluon has no interpreter, so this kernel runs only
compiled, and only on compute capability 9.x (``kernels.wgmma_runs``): wgmma is Hopper's
instruction, and compiling it for later GPUs aborts the process.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                              warpgroup_mma, warpgroup_mma_wait)

from seqdeploy_cfc.kernels import _cluster_barrier, _one_minus_exp_neg, _tanh

#: the CTA-wide barrier: ``thread_barrier`` in triton 3.6, ``barrier`` from 3.7 on
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


# T is never specialized: at T == 1 (a constexpr then) Triton 3.6 fails an LLVM assertion
# lowering this kernel for sm_90 (ConvertTritonGPUToLLVM; 3.9 compiles it)
@gluon.jit(do_not_specialize=["T"])
def _cfc_wgmma_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                      sx_b, sx_t, sh_b, sw_k, sy_b, sy_t,
                      BLOCK_B: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                      SERIES_BELOW: gl.constexpr, FAST_TANH: gl.constexpr,
                      NUM_WARPS: gl.constexpr):
    """Program (pb, pn) of a 1-D grid (pn fastest; the ``H / BLOCK_N`` programs of a batch
    block form one cluster): columns ``pn*BLOCK_N ...`` of rows ``pb*BLOCK_B ...``, every
    step. Tiles are [columns, rows] (transposed), in the wgmma accumulator's layout."""
    # wgmma: M = columns (16 per warp), N = the batch rows, K in steps of 16
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                    instr_shape=[16, BLOCK_B, 16])
    w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    # coalesced global layouts: w^T and y tiles run along columns (contiguous in memory),
    # h_{t-1} [rows, K] along K; 8 elements (16 bytes) per thread
    col_l: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, NUM_WARPS], [0, 1])
    k_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0])
    h_smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_B, BLOCK_H], gl.float16)

    pid = gl.program_id(0)
    n_nb = gl.cdiv(H, BLOCK_N)
    pb = pid // n_nb
    pn = pid % n_nb
    out_ty = y_ptr.dtype.element_ty

    # w^T [BLOCK_N, BLOCK_H]: read coalesced once, then kept in wgmma's operand registers
    wc = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, col_l))
    wk = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, col_l))
    w_t = gl.load(w_ptr + wk[None, :] * sw_k + wc[:, None],
                  mask=(wc < H)[:, None] & (wk < H)[None, :], other=0.0)
    w_t = gl.convert_layout(w_t.to(out_ty), w_l)

    # this program's tile [BLOCK_N, BLOCK_B] in the accumulator's layout: decays, state, xw
    cols = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_l))
    rows = pb * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, acc_l))
    mask = (cols < H)[:, None] & (rows < B)[None, :]
    r = dt / gl.load(tau_ptr + cols, mask=cols < H, other=1.0).to(gl.float32)
    alpha = gl.exp(-r)[:, None]
    gain = _one_minus_exp_neg(r, SERIES_BELOW)[:, None]
    h = gl.load(h0_ptr + rows.to(gl.int64)[None, :] * sh_b + cols[:, None], mask=mask,
                other=0.0).to(gl.float32)
    x_offs = rows.to(gl.int64)[None, :] * sx_b + cols[:, None]
    x_next = gl.load(xw_ptr + x_offs, mask=mask, other=0.0)
    # y_t is stored from the coalesced layout
    yc = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, col_l))
    yr = pb * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, col_l))
    y_mask = (yc < H)[:, None] & (yr < B)[None, :]
    y_offs = yr.to(gl.int64)[None, :] * sy_b + yc[:, None]
    # h_{t-1} of the block's rows, [BLOCK_B, BLOCK_H], staged in shared memory for wgmma
    hr = pb * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, k_l))
    hk = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, k_l))
    h_mask = (hr < B)[:, None] & (hk < H)[None, :]
    h_offs = hr.to(gl.int64)[:, None] * sy_b + hk[None, :]
    h_smem = gl.allocate_shared_memory(out_ty, [BLOCK_B, BLOCK_H], h_smem_l)
    for t in range(0, T):
        if t == 0:
            hp = gl.load(h0_ptr + hr.to(gl.int64)[:, None] * sh_b + hk[None, :], mask=h_mask,
                         other=0.0)
        else:
            # every sibling's y_{t-1} is stored and visible; it is read past L1. The barrier
            # also orders this step's store to h_smem after every warp's previous wgmma.
            _cluster_barrier(t)
            hp = gl.load(y_ptr + (t - 1) * sy_t + h_offs, mask=h_mask, other=0.0,
                         cache_modifier=".cg")
        x = x_next.to(gl.float32)
        x_next = gl.load(xw_ptr + (t + 1) * sx_t + x_offs, mask=mask & (t + 1 < T), other=0.0)
        h_smem.store(hp)
        fence_async_shared()   # the generic-proxy store, before wgmma reads it (async proxy)
        _cta_barrier()         # every warp's part of h_{t-1} is in shared memory
        z = warpgroup_mma(w_t, h_smem.permute((1, 0)), x, is_async=True)
        z = warpgroup_mma_wait(num_outstanding=0, deps=(z,))
        h = alpha * h + gain * _tanh(z, FAST_TANH)
        gl.store(y_ptr + t * sy_t + y_offs, gl.convert_layout(h.to(out_ty), col_l), mask=y_mask)
