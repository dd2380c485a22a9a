"""The ``wgmma`` design of ``cfc_scan``: the cluster ``split`` for Hopper in Gluon (Triton's
layout-explicit dialect), fp16/bf16; the default at H of 129 to 512 on sm_9x. In ``split``
a step is ``h_{t-1} [16, K] @ w [K, BLOCK_N]``: 16 rows are too few for warpgroup MMA
(M >= 64), so Triton emits ``mma.sync`` and re-reads ``w`` from shared memory every step.
Here it is transposed, ``h_t^T [BLOCK_N, 16] = w^T [BLOCK_N, K] @ h_{t-1}^T [K, 16]``, so
``w^T`` sits in wgmma's operand registers (loaded once) and a step reads only ``h_{t-1}``
from shared memory; the arithmetic is ``split``'s (``common.py``, fp32 accumulation).

``h`` is exchanged in shared memory. Each program keeps two buffers of the block's whole
``h [16, BLOCK_H]`` (``bufs[t % 2]`` holds ``h_{t-1}``). A step stores its columns of
``h_t`` into its other buffer, and one thread bulk-copies that slot
(``cp.async.bulk.shared::cluster``) to the same place in every sibling, completing on the
sibling's mbarrier of that buffer; the next step waits on its own mbarrier. Why it is safe:
- a slot is contiguous: the swizzled layout of ``[16, BLOCK_H]`` keeps each 64 columns
  together, so a buffer is also ``BLOCK_H / BLOCK_N`` slots of ``[16, BLOCK_N]``;
- a sibling writes ``h_{t+1}`` into our buffer only after receiving our ``h_t``, sent after
  our wgmma of step t read that buffer; the same order keeps a source slot unchanged until
  its copies are done;
- an mbarrier is armed for its next phase right after its wait, before the copy that lets
  a sibling produce that phase's data;
- mbarrier initialisation is fenced, and the cluster meets before the first step and after
  the last, so no program leaves while a copy may still touch its memory.
The copies address shared memory through Triton's ``global_smem`` symbol at ``h_off`` and
``bar_off``, byte offsets :func:`shared_offsets` reads from the compiled kernel.

Limits (the dispatch keeps to them): 16 rows per program, ``BLOCK_N`` 64 or 128 with
``BLOCK_N / 16`` warps, ``BLOCK_H`` 64 to 512 (the registers of ``w^T``), clusters of
``CLUSTER_N = cdiv(H, BLOCK_N)``. No interpreter (Gluon), and sm_9x only (wgmma).
"""
from __future__ import annotations

import re

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from seqdeploy_cfc.common import _one_minus_exp_neg, _tanh

#: the CTA-wide barrier: ``thread_barrier`` in triton 3.6, ``barrier`` from 3.7 on
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# a shared-memory view as another dtype, shape or layout: ``_reinterpret`` in triton 3.6,
# ``reinterpret`` in later versions; the kernel calls the later name
if not hasattr(gl.shared_memory_descriptor, "reinterpret"):
    gl.shared_memory_descriptor.reinterpret = gl.shared_memory_descriptor._reinterpret


@gluon.jit
def _cluster_sync(dep):
    """The cluster meets here (arrive: release, wait: acquire), after fencing the mbarrier
    initialisations for the cluster (``dep``: a scalar; every thread runs it)."""
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
        "{\n\t.reg .pred p, q;\n\t.reg .b32 a, src, dst, bl, rb;\n\tmov.u32 a, %tid.x;\n\t"
        "setp.ne.u32 q, $2, 0;\n\tsetp.eq.and.u32 p, a, 0, q;\n\tmov.u32 src, global_smem;\n\t"
        "add.u32 bl, src, $4;\n\tadd.u32 src, src, $3;\n\tmapa.shared::cluster.u32 dst, src, $1;"
        "\n\tmapa.shared::cluster.u32 rb, bl, $1;\n\t"
        "@p cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes "
        "[dst], [src], $5, [rb];\n\tmov.u32 $0, 0;\n\t}",
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
    # zero: w^T is zero there, and 0 * garbage could be NaN); one mbarrier per buffer, the
    # first 16 bytes of a third buffer of the same allocation, so that the mbarriers' offset
    # (which the host reads from the compiled code) also gives the buffers'
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


_OFFSETS: dict[tuple, tuple[int, int]] = {}   # by constexpr values and dtype


def shared_offsets(launcher, grid: tuple, args: tuple, values: tuple,
                   num_warps: int) -> tuple[int, int]:
    """``(h_off, bar_off)`` of the binary ``launcher`` (a ``seqdeploy.launch.Launcher`` of
    ``_cfc_wgmma_kernel``) runs for ``args`` (but the offsets, never specialized on) and
    ``values``: compiled on first use without a launch (Triton caches it for the launch)."""
    key = (values, args[0].dtype)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        binary = launcher.compile(grid, (*args, 0, 16), values, num_warps=num_warps)
        offsets = offsets_in_ptx(binary.asm["ptx"], values[0] * values[1] * 2)
        if offsets is None:
            raise RuntimeError("cfc_scan: cannot locate the wgmma kernel's shared buffers in "
                               f"its PTX (triton {triton.__version__})")
        _OFFSETS[key] = offsets
    return offsets


def offsets_in_ptx(ptx: str, buffer_bytes: int) -> tuple[int, int] | None:
    """``(h_off, bar_off)`` in the kernel's PTX: the mbarriers are the first words of the third
    ``h`` buffer (``buffer_bytes`` each) of one allocation, so the first ``mbarrier.init``'s
    offset from ``global_smem`` gives both. None where not found or off the 1024-byte
    alignment the buffers' swizzle needs."""
    init = re.search(r"mbarrier\.init\.shared::cta\.b64 \[(%r\d+)\], 1;", ptx)
    add = init and re.search(r"add\.s32\s+" + re.escape(init.group(1)) + r", %r\d+, (\d+);",
                             ptx)
    if not add:
        return None
    h_off = int(add.group(1)) - 2 * buffer_bytes
    return (h_off, h_off + 2 * buffer_bytes) if h_off >= 0 and h_off % 1024 == 0 else None
