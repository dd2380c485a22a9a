"""Triton kernels of the ``moe`` ops: the fused top-1 router and the grouped-GEMM experts.

**Router** (``_top1_router_kernel``): a ``[BLOCK_T, BLOCK_E]`` tile of fp32 logits per step:
row max, the lowest index attaining it, ``gate = 1 / sum exp(l - max)`` (= ``p[argmax]``),
and with capacity on, the per-row first-come rank of each token in its expert: the cumsum of
the tile's one-hot choices along T plus a running per-expert count carried across tiles.
Without capacity (the inference default) tokens are independent: the grid is
(row, block of T). With capacity the rank depends on every earlier token of the row, so one
program walks its row's T blocks in order: grid (row,).

**Experts** (``triton_moe_experts``): four kernels (after a memset of the E counters), none
of which waits on the host:

1. ``_rank_kernel``: per block of tokens, the one-hot cumsum gives each token's rank among
   the block's tokens of its expert; one atomic add per (block, expert) on the expert's
   count returns the block's base. So ``rank`` is a token's slot in its expert's group
   (the order of tokens inside a group is arbitrary and does not change any result: each
   token's row is computed alone) and ``counts`` ends as the histogram.
2. ``_layout_kernel``: each expert's group starts on a ``BLOCK_M`` boundary of a padded
   row space (``tile_start = cumsum(ceil(count / BLOCK_M))``), so every row tile of the GEMMs
   belongs to one expert. It scatters ``row_token[padded row] = token``, marks padding rows
   -1, and program 0 writes ``tile_expert`` (E for unused tiles: the grid is sized by the
   bound ``cdiv(N, BLOCK_M) + E`` so the host never reads the counts).
3. ``_grouped_ffn_kernel`` (layer 1): tile (row tile, N block): gathers the tile's token rows
   of ``x``, multiplies by ``w1[e]``, adds ``b1[e]``, applies the exact GELU, writes ``h`` in
   the padded row order.
4. ``_grouped_ffn_kernel`` (layer 2): reads ``h`` rows in order, multiplies by ``w2[e]``,
   adds ``b2[e]``, scales by the gate (0 stays exactly 0) and scatters each row to its token.

Accumulation is fp32; ``h`` is stored in the activation dtype between the layers (as a dense
FFN in that dtype would). The work is one FFN per token plus the padding of each group to
``BLOCK_M`` rows. Expert ids must lie in ``[0, E)`` (the router makes them so, NaN logits
included; the CPU form checks them): a token with an id out of range joins no group, nothing
is written out of bounds, and its row of ``y`` is left unwritten.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher
from seqdeploy_moe.experts import check_experts_args
from seqdeploy_moe.router import capacity, check_logits


# -- router ----------------------------------------------------------------------------------
@triton.jit
def _top1_router_kernel(logits_ptr, expert_ptr, gate_ptr, T, E, cap, s_b, s_t,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, CAPACITY: tl.constexpr):
    b = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    taken = tl.zeros((BLOCK_E,), dtype=tl.int32)     # tokens of this row per expert so far
    if CAPACITY:
        start = 0
        stop = T
    else:
        start = tl.program_id(1) * BLOCK_T
        stop = start + BLOCK_T
    for t0 in tl.range(start, stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        ptr = logits_ptr + b.to(tl.int64) * s_b + offs_t[:, None].to(tl.int64) * s_t + offs_e[None, :]
        lg = tl.load(ptr, mask=mask_t[:, None] & mask_e[None, :], other=0.0)
        lg = tl.where(mask_e[None, :], lg, float("-inf"))
        m = tl.max(lg, axis=1)
        choice = tl.min(tl.where(lg == m[:, None], offs_e[None, :], BLOCK_E), axis=1)
        choice = tl.minimum(choice, E - 1)    # a NaN row matches nothing: keep the id valid
        gate = 1.0 / tl.sum(tl.exp(lg - m[:, None]), axis=1)
        if CAPACITY:
            one_hot = ((offs_e[None, :] == choice[:, None]) & mask_t[:, None]).to(tl.int32)
            rank = tl.cumsum(one_hot, axis=0) + taken[None, :]
            position = tl.sum(one_hot * rank, axis=1)          # 1-based, within the row
            gate = tl.where(position <= cap, gate, 0.0)
            taken += tl.sum(one_hot, axis=0)
        out = b.to(tl.int64) * T + offs_t
        tl.store(expert_ptr + out, choice.to(tl.int64), mask=mask_t)
        tl.store(gate_ptr + out, gate, mask=mask_t)


_router_launcher = Launcher(_top1_router_kernel, tensors=3)
#: the widths of E the ORT library's ahead-of-time router, rank and layout kernels are compiled
#: for (a narrower E masks the rest; ``ort_top1_router.cc`` and ``ort_moe_experts.cc`` choose
#: among them, so E <= 128 there): three tiers instead of every power of two keep the build short
ORT_BLOCK_E = (8, 32, 128)


def router_config(T: int, E: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): a tile of about 4096 logits, at least 2 rows."""
    block_e = max(2, triton.next_power_of_2(E))
    block_t = max(2, min(triton.next_power_of_2(T), 4096 // block_e))
    return block_t, block_e, 4


def triton_top1_router(logits: torch.Tensor, capacity_factor: float, out=None):
    """Launch the fused router. ``logits [B, T, E]`` fp32 with unit stride over E.
    ``out``: optional preallocated ``(expert, gate)``."""
    check_logits(logits)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    B, T, E = logits.shape
    if out is None:
        out = (torch.empty(B, T, dtype=torch.int64, device=logits.device),
               torch.empty(B, T, dtype=torch.float32, device=logits.device))
    expert, gate = out
    cap = capacity(capacity_factor, T, E)
    dropping = cap < T
    block_t, block_e, warps = router_config(T, E)
    grid = (B, 1) if dropping else (B, triton.cdiv(T, block_t))
    _router_launcher(grid, (logits, expert, gate, T, E, cap, logits.stride(0), logits.stride(1)),
                     (block_t, block_e, dropping), num_warps=warps)
    return expert, gate


# -- experts ---------------------------------------------------------------------------------
@triton.jit
def _rank_kernel(expert_ptr, counts_ptr, rank_ptr, N, E,
                 BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    e = tl.load(expert_ptr + offs, mask=mask, other=0).to(tl.int32)
    offs_e = tl.arange(0, BLOCK_E)
    one_hot = ((offs_e[None, :] == e[:, None]) & mask[:, None]).to(tl.int32)
    local = tl.sum(one_hot * tl.cumsum(one_hot, axis=0), axis=1) - 1      # 0-based in block
    here = tl.sum(one_hot, axis=0)
    base = tl.atomic_add(counts_ptr + offs_e, here, mask=(offs_e < E) & (here > 0))
    base = tl.where(here > 0, base, 0)
    rank = local + tl.sum(one_hot * base[None, :], axis=1)
    tl.store(rank_ptr + offs, rank, mask=mask)


@triton.jit
def _layout_kernel(expert_ptr, rank_ptr, counts_ptr, row_token_ptr, tile_expert_ptr, N, E,
                   max_tiles, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_TILES: tl.constexpr):
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_start = tl.cumsum(tiles, axis=0) - tiles
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    e = tl.load(expert_ptr + offs, mask=mask, other=0).to(tl.int32)
    mask = mask & (e >= 0) & (e < E)          # an id out of range is in no group
    rank = tl.load(rank_ptr + offs, mask=mask, other=0)
    one_hot = (offs_e[None, :] == e[:, None]).to(tl.int32)
    start = tl.sum(one_hot * tile_start[None, :], axis=1)
    row = start.to(tl.int64) * BLOCK_M + rank
    tl.store(row_token_ptr + row, offs.to(tl.int32), mask=mask)
    if pid == 0:
        # per expert: its tiles in tile_expert, -1 in the padding rows of its last tile
        first = 0
        for x in tl.range(0, E):
            n = tl.load(counts_ptr + x)
            n_tiles = (n + BLOCK_M - 1) // BLOCK_M
            pad = first * BLOCK_M + n + tl.arange(0, BLOCK_M)
            tl.store(row_token_ptr + pad, tl.full((BLOCK_M,), -1, tl.int32),
                     mask=pad < (first + n_tiles) * BLOCK_M)
            for j0 in tl.range(0, n_tiles, BLOCK_TILES):
                j = first + j0 + tl.arange(0, BLOCK_TILES)
                tl.store(tile_expert_ptr + j, tl.full((BLOCK_TILES,), 0, tl.int32) + x,
                         mask=j < first + n_tiles)
            first += n_tiles
        for j0 in tl.range(first, max_tiles, BLOCK_TILES):
            j = j0 + tl.arange(0, BLOCK_TILES)
            tl.store(tile_expert_ptr + j, tl.full((BLOCK_TILES,), 0, tl.int32) + E,
                     mask=j < max_tiles)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _grouped_ffn_kernel(a_ptr, row_token_ptr, tile_expert_ptr, w_ptr, bias_ptr, gate_ptr,
                        out_ptr, K, N, E, s_a, s_we, s_wk, s_be, s_o,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FIRST: tl.constexpr, DOT_F32: tl.constexpr, WIDEN: tl.constexpr,
                        EVEN_K: tl.constexpr):
    """FIRST: ``out[row] = GELU(a[token(row)] @ w[e] + b[e])``;
    else: ``out[token(row)] = gate[token] * (a[row] @ w[e] + b[e])`` (0 where the gate is 0).
    EVEN_K: ``K % BLOCK_K == 0``, so the loads of the K loop need no K mask."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks
    e = tl.load(tile_expert_ptr + pid_m)
    if e < E:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        token = tl.load(row_token_ptr + rows)
        valid = token >= 0
        if FIRST:
            a_rows = token.to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_base = w_ptr + e.to(tl.int64) * s_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + a_rows[:, None] * s_a + offs_k[None, :]
            w_ptrs = w_base + offs_k[:, None].to(tl.int64) * s_wk + offs_n[None, :]
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < K
                a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if WIDEN:      # the interpreter's bf16 dot (see _widen_in_interpreter)
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            elif DOT_F32:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        bias = tl.load(bias_ptr + e * s_be + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
        if FIRST:
            acc = _gelu(acc)
            dst = rows.to(tl.int64)
        else:
            g = tl.load(gate_ptr + token, mask=valid, other=0.0)
            acc = tl.where(g[:, None] != 0.0, acc * g[:, None], 0.0)
            dst = token.to(tl.int64)
        tl.store(out_ptr + dst[:, None] * s_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_n[None, :])


_rank_launcher = Launcher(_rank_kernel, tensors=3)
_layout_launcher = Launcher(_layout_kernel, tensors=5)
_ffn_launcher = Launcher(_grouped_ffn_kernel, tensors=7)
LAYOUT_BLOCK = 128   # tokens per program of the rank and layout kernels


def _widen_in_interpreter(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bf16 tiles in ``tl.dot`` as their uint16 bit
    patterns (it stores bf16 as uint16 and calls ``np.matmul`` on them), so under
    ``TRITON_INTERPRET=1`` bf16 tiles are widened to fp32 before the dot. Compiled kernels
    never take this branch (the sm_90 compile test and the GPU tests cover the bf16 dot)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def experts_config(N: int, E: int, d: int, f: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the grouped GEMMs. BLOCK_M follows the mean group size: each group is padded
    to BLOCK_M rows, so at E=64 over 8192 tokens (128 per expert) 128-row tiles would waste
    about a third of the work and 64-row tiles a fifth. Compiled for sm_90 (triton 3.6 and
    3.9, 16-byte aligned operands), both layers at these tiles lower to wgmma fed by a
    4-stage cp.async pipeline (128 KB / 96 KB of shared memory at BLOCK_M 128 / 64, bf16).
    Not yet timed on hardware: the benchmark (``benchmarks/moe_layer.py``) reports both
    BLOCK_M at each E."""
    mean = N / max(E, 1)
    block_m = 128 if mean >= 512 else 64 if mean >= 64 else 32 if mean >= 24 else 16
    f32 = dtype == torch.float32
    block_k = 32 if f32 else 64
    return {"block_m": block_m, "block_n": 128 if block_m >= 64 else 64, "block_k": block_k,
            "num_warps": 8 if block_m >= 128 else 4, "num_stages": 3 if f32 else 4}


def _fit(block: int, size: int) -> int:
    """A power-of-two tile no larger than needed, and at least 16 (``tl.dot``'s minimum)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def group_tokens(expert: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped row layout of ``expert [N]`` (int64, on the GPU), with no host sync:
    ``row_token [max_tiles * block_m]`` int32 (the token of each padded row, -1 for padding;
    rows of unused tiles are unset) and ``tile_expert [max_tiles]`` int32 (E: unused tile),
    where ``max_tiles = cdiv(N, block_m) + min(E, N)`` bounds the tiles any routing needs."""
    N = expert.numel()
    device = expert.device
    max_tiles = triton.cdiv(N, block_m) + min(E, N)
    counts = torch.zeros(E, dtype=torch.int32, device=device)
    rank = torch.empty(N, dtype=torch.int32, device=device)
    row_token = torch.empty(max_tiles * block_m, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    block_e = max(2, triton.next_power_of_2(E))
    grid = (triton.cdiv(N, LAYOUT_BLOCK),)
    _rank_launcher(grid, (expert, counts, rank, N, E), (LAYOUT_BLOCK, block_e), num_warps=4)
    _layout_launcher(grid, (expert, rank, counts, row_token, tile_expert, N, E, max_tiles),
                     (LAYOUT_BLOCK, block_e, block_m, 64), num_warps=4)
    return row_token, tile_expert


def triton_moe_experts(x, expert, gate, w1, b1, w2, b2, out=None, block_m=None, block_n=None,
                       block_k=None, num_warps=None, num_stages=None):
    """Launch the grouping kernels and the two grouped GEMMs (see the module docstring).
    ``x [B, T, d]``; weights ``[E, ...]`` contiguous in their last dim. ``out``: optional
    preallocated ``y [B, T, d]`` (contiguous)."""
    check_experts_args(x, expert, gate, w1, b1, w2, b2)
    B, T, d = x.shape
    E, _, f = w1.shape
    N = B * T
    device = x.device
    xf = x.reshape(N, d)
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    w1, b1, w2, b2 = (w if w.stride(-1) == 1 else w.contiguous() for w in (w1, b1, w2, b2))
    ef = expert.reshape(N)
    gf = gate.reshape(N)
    if gf.dtype != torch.float32:
        gf = gf.float()
    ef, gf = ef.contiguous(), gf.contiguous()
    cfg = experts_config(N, E, d, f, x.dtype)
    bm = block_m or cfg["block_m"]
    warps, stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    row_token, tile_expert = group_tokens(ef, E, bm)
    max_tiles = tile_expert.numel()
    h = torch.empty(max_tiles * bm, f, dtype=x.dtype, device=device)
    y = out if out is not None else torch.empty(B, T, d, dtype=x.dtype, device=device)
    yf = y.view(N, d)
    f32 = x.dtype == torch.float32
    widen = _widen_in_interpreter(x.dtype)
    for a, w, bias, dst, K, Nn, first in ((xf, w1, b1, h, d, f, True), (h, w2, b2, yf, f, d, False)):
        bn = _fit(block_n or cfg["block_n"], Nn)
        bk = _fit(block_k or cfg["block_k"], K)
        _ffn_launcher((max_tiles * triton.cdiv(Nn, bn),),
                      (a, row_token, tile_expert, w, bias, gf, dst, K, Nn, E, a.stride(0),
                       w.stride(0), w.stride(1), bias.stride(0), dst.stride(0)),
                      (bm, bn, bk, first, f32, widen, K % bk == 0), num_warps=warps, num_stages=stages)
    return y


def padded_rows(counts: list[int], block_m: int) -> int:
    """Rows the grouped GEMMs compute for these group sizes (for the benchmark's report)."""
    return sum(math.ceil(c / block_m) * block_m for c in counts)
