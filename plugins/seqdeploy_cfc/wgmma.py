"""The Hopper form of the cluster ``split`` kernel: ``w_rec`` held in registers as the
left operand of warpgroup MMA (wgmma), and ``h`` exchanged between a cluster's programs
through their shared memory, written in Gluon, Triton's layout-explicit dialect.

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

The exchange. The Triton kernel hands ``h_t`` over through global memory: each program
stores its columns of ``y_t``, the cluster meets at its barrier (arrive with release: the
stores must be performed first), and every program reads the whole row block back from L2.
Measured on the H200, that release and the L2 round trip were about half of each step. Here
``h`` never leaves the cluster: each program keeps two buffers of the block's whole
``h [16, BLOCK_H]`` in shared memory (``bufs[t % 2]`` holds ``h_{t-1}``). A step stores its
own columns of ``h_t`` into its other buffer, then one thread bulk-copies that slot
(``cp.async.bulk.shared::cluster``, 4 KiB at H=512) into the same place of every sibling's
buffer, completing on the sibling's mbarrier of that buffer. The next step waits only on its
own mbarrier (the expected bytes of every sibling: no cluster barrier, no fence on global
memory) and runs wgmma on the buffer. Why it is safe:
- a slot's bytes are contiguous: the swizzled shared layout of ``[16, BLOCK_H]`` keeps each
  64 columns together (16 rows x 128 bytes), so the buffer is also ``BLOCK_H / BLOCK_N``
  slots of ``[16, BLOCK_N]`` in the same layout (``slots``);
- a sibling writes ``h_{t+1}`` into a buffer of ours only after it has received our
  ``h_t``, which we send only after our wgmma of step t (which read that buffer) has
  finished; the same order keeps each source slot unchanged until its copies are done;
- each mbarrier is armed (``expect``, the bytes of every sibling) for its next phase right
  after its wait, before the copy that lets a sibling produce that phase's data;
- an mbarrier's initialisation is fenced and the cluster meets once before the first step;
  it meets again after the last, so no program leaves while a copy may still touch its
  shared memory.
The copies address shared memory through Triton's ``global_smem`` symbol: ``h_off`` and
``bar_off`` are the byte offsets of ``bufs`` and of the mbarriers there, which
``kernels._wgmma_offsets`` reads from the compiled kernel. ``y`` is still written once,
with plain stores off the step's critical path, through a layout with 8 contiguous
columns per thread; ``xw`` is read once (the next step's tile is loaded before this step's
product). The arithmetic is the split kernel's, helpers included (``_tanh``,
``_one_minus_exp_neg``): the same fp32 accumulation of fp16/bf16 products, the same blend.
On the H200 its outputs were bit for bit equal to those of the earlier form of this kernel
(the exchange through ``y``) at every shape tried, in fp16 and bf16.

Limits (``kernels._wgmma_plan`` checks them): fp16 or bf16 (fp32 would need tf32, another
precision); 16 batch rows per program; ``BLOCK_N`` of 64 or 128 columns with
``BLOCK_N / 16`` warps (16 rows of M per warp); ``BLOCK_H`` from 64 to 512 (512: the
register budget of ``w^T``); launched as clusters of ``CLUSTER_N`` (the column blocks)
only (``seqdeploy.launch.Launcher.clustered``). Gluon has no interpreter, so this kernel
runs only compiled, and only on compute capability 9.x (``kernels.wgmma_runs``): wgmma is
Hopper's instruction, and compiling it for later GPUs aborts the process.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from seqdeploy_cfc.kernels import _one_minus_exp_neg, _tanh

#: the CTA-wide barrier: ``thread_barrier`` in triton 3.6, ``barrier`` from 3.7 on
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# a shared-memory view as another dtype, shape or layout: ``_reinterpret`` in triton 3.6,
# ``reinterpret`` in later versions; the kernel calls the later name
if not hasattr(gl.shared_memory_descriptor, "reinterpret"):
    gl.shared_memory_descriptor.reinterpret = gl.shared_memory_descriptor._reinterpret


@gluon.jit
def _cluster_sync(dep):
    """Every program of the cluster meets here (arrive with release, wait with acquire),
    after fencing its mbarrier initialisations for the cluster (``dep``: a scalar; every
    thread runs it)."""
    return gl.inline_asm_elementwise(
        "fence.mbarrier_init.release.cluster;\n\t"
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
        "\n\tmov.u32 $0, 0;", "=r,r", [dep], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _send(rank, go, src_off, bar_off, nbytes):
    """Thread 0, where ``go``: bulk-copy ``nbytes`` at byte ``src_off`` of this program's
    shared memory to the same place in program ``rank`` of the cluster, completing the
    transfer on that program's mbarrier at ``bar_off``."""
    return gl.inline_asm_elementwise(
        "{\n\t.reg .pred p, q;\n\t.reg .b32 a, src, dst, bl, rb;\n\t"
        "mov.u32 a, %tid.x;\n\t"
        "setp.ne.u32 q, $2, 0;\n\t"
        "setp.eq.and.u32 p, a, 0, q;\n\t"
        "mov.u32 src, global_smem;\n\t"
        "add.u32 bl, src, $4;\n\t"
        "add.u32 src, src, $3;\n\t"
        "mapa.shared::cluster.u32 dst, src, $1;\n\t"
        "mapa.shared::cluster.u32 rb, bl, $1;\n\t"
        "@p cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes "
        "[dst], [src], $5, [rb];\n\t"
        "mov.u32 $0, 0;\n\t}",
        "=r,r,r,r,r,r", [rank, go, src_off, bar_off, nbytes], dtype=gl.int32, is_pure=False,
        pack=1)


# T is never specialized: at T == 1 (a constexpr then) Triton 3.6 fails an LLVM assertion
# lowering this kernel for sm_90 (ConvertTritonGPUToLLVM; 3.9 compiles it)
@gluon.jit(do_not_specialize=["T", "h_off", "bar_off"])
def _cfc_wgmma_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H,
                      sx_b, sx_t, sh_b, sw_k, sy_b, sy_t, h_off, bar_off,
                      BLOCK_B: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                      CLUSTER_N: gl.constexpr, SERIES_BELOW: gl.constexpr,
                      FAST_TANH: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Program (pb, pn) of a 1-D grid (pn fastest; the ``CLUSTER_N = cdiv(H, BLOCK_N)``
    programs of a batch block form one cluster): columns ``pn*BLOCK_N ...`` of rows
    ``pb*BLOCK_B ...``, every step. Tiles are [columns, rows] (transposed), in the wgmma
    accumulator's layout. ``h_off`` / ``bar_off``: see the module's docstring."""
    # wgmma: M = columns (16 per warp), N = the batch rows, K in steps of 16
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                    instr_shape=[16, BLOCK_B, 16])
    w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    # coalesced global layouts: w^T and y tiles run along columns (contiguous in memory),
    # h0 [rows, K] along K; 8 elements (16 bytes) per thread
    col_l: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, NUM_WARPS], [0, 1])
    k_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0])
    h_smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_B, BLOCK_H], gl.float16)
    slot_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_B, BLOCK_N], gl.float16)
    SLOTS: gl.constexpr = BLOCK_H // BLOCK_N
    SLOT_BYTES: gl.constexpr = BLOCK_B * BLOCK_N * 2
    RECV_BYTES: gl.constexpr = (CLUSTER_N - 1) * SLOT_BYTES   # from every sibling, per step

    pid = gl.program_id(0)
    pb = pid // CLUSTER_N
    pn = pid % CLUSTER_N
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

    # the block's h in two buffers: h0 in bufs[0], zeros in bufs[1] (columns past H stay
    # zero: w^T is zero there, and 0 * garbage could be NaN); one mbarrier per buffer
    # (the mbarriers are the first 16 bytes of a third buffer, in one allocation of four
    # (shapes are powers of two): so the mbarriers' offset, which the host reads from the
    # compiled code, also gives the buffers')
    bufs = gl.allocate_shared_memory(out_ty, [4, BLOCK_B, BLOCK_H], h_smem_l)
    slots = bufs.reinterpret(out_ty, [4 * SLOTS, BLOCK_B, BLOCK_N], slot_l)
    words = bufs.reinterpret(gl.int64, [BLOCK_B * BLOCK_H, 1], mbarrier.MBarrierLayout())
    BAR0: gl.constexpr = BLOCK_B * BLOCK_H // 2   # the third buffer's first 8-byte word
    hr = pb * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, k_l))
    hk = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, k_l))
    bufs.index(0).store(gl.load(h0_ptr + hr.to(gl.int64)[:, None] * sh_b + hk[None, :],
                                mask=(hr < B)[:, None] & (hk < H)[None, :], other=0.0))
    bufs.index(1).store(gl.zeros([BLOCK_B, BLOCK_H], out_ty, k_l))
    mbarrier.init(words.index(BAR0 + 0), count=1)
    mbarrier.init(words.index(BAR0 + 1), count=1)
    if CLUSTER_N > 1:   # armed for h_0 (into bufs[1]) and h_1 (into bufs[0])
        mbarrier.expect(words.index(BAR0 + 0), RECV_BYTES)
        mbarrier.expect(words.index(BAR0 + 1), RECV_BYTES)
    fence_async_shared()   # the generic-proxy stores, before wgmma and the copies see them
    _cta_barrier()
    _cluster_sync(pid)     # every sibling's mbarriers are ready before any copy lands
    for t in range(0, T):
        s = t % 2
        if CLUSTER_N > 1:
            if t > 0:
                # every sibling's columns of h_{t-1} are in bufs[s]; armed again for h_{t+1}
                mbarrier.wait(words.index(BAR0 + s), ((t - 1) // 2) & 1)
                mbarrier.expect(words.index(BAR0 + s), RECV_BYTES)
        x = x_next.to(gl.float32)
        x_next = gl.load(xw_ptr + (t + 1) * sx_t + x_offs, mask=mask & (t + 1 < T), other=0.0)
        z = warpgroup_mma(w_t, bufs.index(s).permute((1, 0)), x, is_async=True)
        z = warpgroup_mma_wait(num_outstanding=0, deps=(z,))
        h = alpha * h + gain * _tanh(z, FAST_TANH)
        hq = h.to(out_ty)
        if t + 1 < T:
            # this program's columns of h_t into its slot of bufs[1 - s], then to the siblings
            slot = (1 - s) * SLOTS + pn
            slots.index(slot).permute((1, 0)).store(hq)
            fence_async_shared()
            _cta_barrier()
            if CLUSTER_N > 1:
                for rank in gl.static_range(CLUSTER_N):
                    _send(rank, (rank != pn).to(gl.int32), h_off + slot * SLOT_BYTES,
                          bar_off + (1 - s) * 8, SLOT_BYTES)
        gl.store(y_ptr + t * sy_t + y_offs, gl.convert_layout(hq, col_l), mask=y_mask)
    _cluster_sync(pid)     # no program leaves while a copy may still touch its memory
