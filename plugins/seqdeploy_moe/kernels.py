"""Triton kernels of the ``moe`` ops: the fused top-1 router and the grouped-GEMM experts.

**Router** (``_top1_router_kernel``): a ``[BLOCK_T, BLOCK_E]`` tile of fp32 logits per step:
row max, the lowest index attaining it, ``gate = 1 / sum exp(l - max)`` (= ``p[argmax]``),
and with capacity on, the per-row first-come rank of each token in its expert: the cumsum of
the tile's one-hot choices along T plus a running per-expert count carried across tiles.
Without capacity (the inference default) tokens are independent: the grid is
(row, block of T). With capacity the rank depends on every earlier token of the row: in the
ahead-of-time forms (ONNX Runtime, TensorRT) and for a row of one tile, one program walks
its row's T blocks in order, grid (row,); the torch engine splits a longer row over its
tiles (``_capacity_kernel``, see :func:`triton_top1_router`).

**Experts** (``triton_moe_experts``): two designs, chosen by an :class:`ExpertsPlan`
(:func:`experts_plan` names them; the default ``"auto"`` is ``"padded"``, with tensor-descriptor
loads for fp16 / bf16 where a CUDA graph records the launches: the fastest on an H100).
Neither waits on the host, and both gather the token rows of ``x`` in the first GEMM's A
load and apply the gate and the scatter back to each token's row in the second GEMM's
epilogue.

``"padded"`` (the first design; the ONNX Runtime library runs it): four kernels after a
memset of the E counters:

1. ``_rank_kernel``: per block of tokens, the one-hot cumsum gives each token's rank among
   the block's tokens of its expert; one atomic add per (block, expert) on the expert's
   count returns the block's base. So ``rank`` is a token's slot in its expert's group
   (the order of tokens inside a group is arbitrary and does not change any result: each
   token's row is computed alone) and ``counts`` ends as the histogram.
2. ``_layout_kernel``: each expert's group starts on a ``BLOCK_M`` boundary of a padded
   row space (``tile_start = cumsum(ceil(count / BLOCK_M))``), so every row tile of the GEMMs
   belongs to one expert. It scatters ``row_token[padded row] = token``; blocks of tiles,
   strided over its programs, write ``tile_expert`` (each tile's owner found by comparing
   it with every expert's tile range; E for unused tiles: the grid is sized by the bound
   ``cdiv(N, BLOCK_M) + E`` so the host never reads the counts) and mark the padding rows
   -1. Nothing walks the experts in series.
3. ``_grouped_ffn_kernel`` (layer 1): tile (row tile, N block): gathers the tile's token rows
   of ``x``, multiplies by ``w1[e]``, adds ``b1[e]``, applies the exact GELU, writes ``h`` in
   the padded row order.
4. ``_grouped_ffn_kernel`` (layer 2): reads ``h`` rows in order, multiplies by ``w2[e]``,
   adds ``b2[e]``, scales by the gate (0 stays exactly 0) and scatters each row to its token.

``"buckets"``: three kernels after the memset:

1. ``_bucket_kernel``: the rank kernel's atomics, writing each token straight into its
   expert's bucket, ``slot_token[e, rank] = token`` (``[E, N]`` int32: a bucket can hold
   every token, so no offsets over experts are needed and there is no layout kernel).
2. ``_bucket_ffn_kernel`` (layer 1, then layer 2, same roles as above): every program reads
   the E counts and finds its work item's expert and row tile with a cumsum and a compare
   over them (a few vector reductions), so there is no tile table. Options: the order of
   the work items (``order``), half- and quarter-height last tiles (``tail``: the padding
   of a large row tile without its extra weight reads) and a persistent grid.

Why these options (E=64 over 8192 tokens, ~128 per expert): each row tile reads its
expert's whole weight column block, so weight traffic into the SMs is (row tiles per
expert) x (expert weights): ~2.5x at 64-row tiles, ~1.5x at 128-row tiles. 128-row tiles
alone pad each expert to 128 or 256 rows (~1.45x the work); with half-height last tiles the
padding is that of 64-row tiles (~1.2x) and the weight reads those of 128-row tiles.

Accumulation is fp32; ``h`` is stored in the activation dtype between the layers (as a dense
FFN in that dtype would). The work is one FFN per token plus the padding of each group to
``BLOCK_M`` rows. Expert ids must lie in ``[0, E)`` (the router makes them so, NaN logits
included; the CPU form checks them): a token with an id out of range joins no group, nothing
is written out of bounds, and its row of ``y`` is left unwritten.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher, interpreter_widens_bf16
from seqdeploy_moe.experts import check_experts_args
from seqdeploy_moe.router import LOGITS_MAX_E, capacity, check_logits


# -- router ----------------------------------------------------------------------------------
@triton.jit
def _one_hot(e, offs_e, mask):
    """``[rows, BLOCK_E]`` int32: a 1 at column ``e_i`` of each row where ``mask_i``."""
    return ((offs_e[None, :] == e[:, None]) & mask[:, None]).to(tl.int32)


@triton.jit
def _first_come(one_hot, before):
    """Each row's 1-based first-come rank among the tokens of its expert: its place among the
    block's tokens of that expert (a cumsum down the block) plus ``before[e]``, the expert's
    tokens ahead of the block."""
    return tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) + before[None, :]), axis=1)


@triton.jit
def _route_rows(lg, offs_e, E, BLOCK_E: tl.constexpr):
    """Each row's top-1 route from an fp32 tile of logits ``[rows, BLOCK_E]`` (columns from
    E on are ignored): the lowest index attaining the row max, and its softmax probability
    ``1 / sum exp(l - max)``. A NaN row matches nothing and keeps a valid id (E - 1)."""
    lg = tl.where(offs_e[None, :] < E, lg, float("-inf"))
    m = tl.max(lg, axis=1)
    choice = tl.min(tl.where(lg == m[:, None], offs_e[None, :], BLOCK_E), axis=1)
    choice = tl.minimum(choice, E - 1)
    gate = 1.0 / tl.sum(tl.exp(lg - m[:, None]), axis=1)
    return choice, gate


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
        choice, gate = _route_rows(lg, offs_e, E, BLOCK_E)
        if CAPACITY:
            one_hot = _one_hot(choice, offs_e, mask_t)
            position = _first_come(one_hot, taken)              # 1-based, within the row
            gate = tl.where(position <= cap, gate, 0.0)
            taken += tl.sum(one_hot, axis=0)
        out = b.to(tl.int64) * T + offs_t
        tl.store(expert_ptr + out, choice.to(tl.int64), mask=mask_t)
        tl.store(gate_ptr + out, gate, mask=mask_t)


@triton.jit
def _top1_router_aot_kernel(logits_ptr, cf_bits, T, E, expert_ptr, gate_ptr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                            CAPACITY: tl.constexpr):
    """TensorRT's AOT entry (``seqdeploy.trt.aot``): ``_top1_router_kernel`` with its
    parameters in TensorRT's order (inputs, scalars, outputs) on dense tensors
    (``logits [B, T, E]``). The capacity is computed here from ``cf_bits`` (the
    ``capacity_factor`` attribute's fp32 bit pattern: TensorRT's AOT scalars are integers and
    its expressions have no floats) exactly as ``router.capacity`` does,
    ``ceil(fp32(fp32(cf) * T) / E)`` with IEEE division; ``CAPACITY`` is ``cf > 0``."""
    cap = T
    if CAPACITY:
        cf = cf_bits.to(tl.float32, bitcast=True)
        cap = tl.math.ceil(tl.math.div_rn(cf * T.to(tl.float32), E.to(tl.float32))).to(tl.int32)
    _top1_router_kernel(logits_ptr, expert_ptr, gate_ptr, T, E, cap, T * E, E, BLOCK_T, BLOCK_E,
                        CAPACITY)


@triton.jit
def _capacity_kernel(expert_ptr, gate_ptr, counts_ptr, T, n_tiles, cap,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, DROP: tl.constexpr):
    """Capacity over a row longer than one tile, parallel over its tiles (grid (row, tile);
    :func:`triton_top1_router`), after the router ran without capacity. ``DROP=False``:
    store the tile's token count per expert to ``counts [B, n_tiles, BLOCK_E]`` int32.
    ``DROP=True``: ``counts`` holds the exclusive prefix of those counts over the row's
    tiles (the tokens of each expert in earlier tiles); a token's 1-based first-come rank
    in its expert is that base plus its rank inside the tile, and past ``cap`` its gate
    becomes 0, the same rule as the one-program walk of ``_top1_router_kernel``."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_e = tl.arange(0, BLOCK_E)
    row = b.to(tl.int64) * T + offs_t
    e = tl.load(expert_ptr + row, mask=mask_t, other=-1).to(tl.int32)
    one_hot = _one_hot(e, offs_e, mask_t)
    slot = counts_ptr + (b.to(tl.int64) * n_tiles + tile) * BLOCK_E + offs_e
    if DROP:
        position = _first_come(one_hot, tl.load(slot))
        g = tl.load(gate_ptr + row, mask=mask_t, other=0.0)
        tl.store(gate_ptr + row, tl.where(position <= cap, g, 0.0), mask=mask_t)
    else:
        tl.store(slot, tl.sum(one_hot, axis=0))


_router_launcher = Launcher(_top1_router_kernel, tensors=3)
_capacity_launcher = Launcher(_capacity_kernel, tensors=3)
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
    ``out``: optional preallocated ``(expert, gate)``.

    With capacity on, a row of one tile is one program's walk; a longer row runs the router
    over all its tiles at once, then :func:`_capacity_kernel` twice around a cumsum of the
    tiles' per-expert counts (four launches instead of one program walking the row alone:
    the walk measured 116 us at E=8 and 505 us at E=64 for one row of 8192 tokens on an
    H100, where the router without capacity took 8-17 us)."""
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
    n_tiles = triton.cdiv(T, block_t)
    walk = dropping and n_tiles == 1
    grid = (B, 1) if walk else (B, n_tiles)
    _router_launcher(grid, (logits, expert, gate, T, E, cap, logits.stride(0), logits.stride(1)),
                     (block_t, block_e, walk), num_warps=warps)
    if dropping and not walk:
        counts = torch.empty(B, n_tiles, block_e, dtype=torch.int32, device=logits.device)
        _capacity_launcher(grid, (expert, gate, counts, T, n_tiles, cap),
                           (block_t, block_e, False), num_warps=warps)
        base = counts.cumsum(1, dtype=torch.int32).sub_(counts)     # earlier tiles' tokens
        _capacity_launcher(grid, (expert, gate, base, T, n_tiles, cap),
                           (block_t, block_e, True), num_warps=warps)
    return expert, gate


# -- router projection -----------------------------------------------------------------------
@triton.jit
def _router_logits_kernel(u_ptr, w_ptr, out_ptr, expert_ptr, gate_ptr, N, K, E, s_u, s_wk,
                          s_we, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_E: tl.constexpr, SPLIT: tl.constexpr, ROUTE: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_E]`` tile of fp32 logits: half-precision rows of ``u``, widened
    to fp32 as they load, times the fp32 router weight, through ``tf32x3`` dots, or (SPLIT)
    two tf32 dots: the weight cut into its tf32 head (the low 13 mantissa bits cleared) and
    the remainder rounded to tf32, the rows being exact in tf32 (``tf32x3``'s third
    product, the rows' remainder times the weight's head, is zero here). ROUTE: also each row's top-1 route
    (``_route_rows``, as the router kernel takes it from the stored logits) to ``expert``
    (int64) and ``gate`` (fp32)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = rows < N
    mask_e = offs_e < E
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(u_ptr + rows[:, None].to(tl.int64) * s_u + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_ptr + ks[:, None] * s_wk + offs_e[None, :] * s_we,
                    mask=mask_k[:, None] & mask_e[None, :], other=0.0)
        if SPLIT:
            head = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            # the remainder rounded to tf32 here, to nearest even (the tensor cores would
            # truncate it: a bias that adds up over d)
            bits = (b - head).to(tl.uint32, bitcast=True)
            rest = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
            acc = tl.dot(a, rest.to(tl.float32, bitcast=True), acc, input_precision="tf32")
            acc = tl.dot(a, head, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
    tl.store(out_ptr + rows[:, None].to(tl.int64) * E + offs_e[None, :], acc,
             mask=mask_m[:, None] & mask_e[None, :])
    if ROUTE:
        choice, gate = _route_rows(acc, offs_e, E, BLOCK_E)
        tl.store(expert_ptr + rows, choice.to(tl.int64), mask=mask_m)
        tl.store(gate_ptr + rows, gate, mask=mask_m)


_logits_launcher = Launcher(_router_logits_kernel, tensors=5)


@dataclasses.dataclass(frozen=True)
class ProjectionTiles:
    """Tiles of the router projection kernel: ``block_m`` rows a program, the contraction
    ``block_k`` at a time through ``num_stages`` buffers, ``split``: two tf32 products (the
    rows are exact in tf32) instead of ``tf32x3``'s three."""
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int = 3
    split: bool = True


def projection_tiles(E: int) -> ProjectionTiles:
    """The default tiles for E experts (the weight's columns are one tile, up to 256).
    ptxas for sm_90 (triton 3.6, bf16, split) compiles them without spills."""
    if E <= 64:
        return ProjectionTiles(64, 64, 4)
    return ProjectionTiles(16, 32, 8)


def triton_router_logits(u: torch.Tensor, weight: torch.Tensor, out=None,
                         tiles: ProjectionTiles | None = None, route: bool = False):
    """fp32 router logits ``[..., E]`` of ``u [..., d]`` (fp16 or bf16, CUDA) and the router
    weight ``weight [E, d]`` (fp32), without materialising ``u`` in fp32; with ``route``,
    ``(logits, expert [...] int64, gate [...] fp32)``: the top-1 route of each row taken
    from the same fp32 tile, as ``triton_top1_router(logits, 0.0)`` takes it (the same
    expert; the gate's sum of exponentials may be added in another order), in one launch
    and without re-reading the logits.

    Why: ``F.linear(u.float(), weight)`` writes and rereads an fp32 copy of ``u`` and runs an
    fp32 GEMM with E output columns, the slowest shape for the tensor cores; it took a quarter
    of the dense FFN's time at N=8192, d=768, E=64. Here each program widens a tile of ``u``
    in registers and accumulates in fp32 through tf32 dots: a half-precision value is exact
    in tf32 (bf16 and fp16 have at most tf32's 10 stored mantissa bits), and the weight is
    split into two tf32 terms, so each product carries a relative error of about 2^-21
    (fp32's is 2^-24) before the same fp32 accumulation. Grid: ``cdiv(rows, block_m)``.
    ``out``: optional preallocated fp32 ``[rows, E]``, contiguous; ``tiles``: see
    :func:`projection_tiles`."""
    d = u.shape[-1]
    E = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != d or E > LOGITS_MAX_E:
        raise ValueError(f"router_logits: weight must be [E <= {LOGITS_MAX_E}, {d}], "
                         f"got {list(weight.shape)}")
    rows = u.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    w = weight.float()
    n = rows.shape[0]
    if out is None:
        out = torch.empty(n, E, dtype=torch.float32, device=u.device)
    expert = torch.empty(n if route else 0, dtype=torch.int64, device=u.device)
    gate = torch.empty(n if route else 0, dtype=torch.float32, device=u.device)
    t = tiles or projection_tiles(E)
    block_e = max(16, triton.next_power_of_2(E))
    _logits_launcher((triton.cdiv(n, t.block_m), 1, 1),
                     (rows, w, out, expert, gate, n, d, E, rows.stride(0), w.stride(1),
                      w.stride(0)),
                     (t.block_m, t.block_k, block_e, t.split, route), num_warps=t.num_warps,
                     num_stages=t.num_stages)
    logits = out.view(*u.shape[:-1], E)
    if route:
        return logits, expert.view(u.shape[:-1]), gate.view(u.shape[:-1])
    return logits


# -- experts ---------------------------------------------------------------------------------
@triton.jit
def _claim_slots(e, mask, counts_ptr, E, BLOCK_E: tl.constexpr):
    """Each token's 0-based slot in its expert's group (tokens where ``mask``): one atomic add
    per (block, expert) on ``counts`` reserves the block's slots and returns their base."""
    offs_e = tl.arange(0, BLOCK_E)
    one_hot = _one_hot(e, offs_e, mask)
    here = tl.sum(one_hot, axis=0)
    base = tl.atomic_add(counts_ptr + offs_e, here, mask=(offs_e < E) & (here > 0))
    return _first_come(one_hot, tl.where(here > 0, base, 0)) - 1


@triton.jit
def _rank_kernel(expert_ptr, counts_ptr, rank_ptr, N, E,
                 BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    e = tl.load(expert_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(rank_ptr + offs, _claim_slots(e, mask, counts_ptr, E, BLOCK_E), mask=mask)


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
    # the tile table and the padding rows, BLOCK_TILES tiles at a time, the blocks strided
    # over the programs: tile j belongs to the expert e with tile_start[e] <= j < tile_end[e]
    # (E past the last), and row i of it is padding where (j - tile_start[e]) * BLOCK_M + i
    # reaches counts[e]
    tile_end = tile_start + tiles
    offs_i = tl.arange(0, BLOCK_M)
    for j0 in tl.range(pid * BLOCK_TILES, max_tiles, tl.num_programs(0) * BLOCK_TILES):
        j = j0 + tl.arange(0, BLOCK_TILES)
        in_j = j < max_tiles
        below = (tile_end[None, :] <= j[:, None]) & (offs_e[None, :] < E)
        owner = tl.sum(below.to(tl.int32), axis=1)                    # [BLOCK_TILES], E: none
        tl.store(tile_expert_ptr + j, owner, mask=in_j)
        pick = (offs_e[None, :] == owner[:, None]).to(tl.int32)
        first = tl.sum(pick * tile_start[None, :], axis=1)
        n = tl.sum(pick * counts[None, :], axis=1)
        slot = (j - first)[:, None] * BLOCK_M + offs_i[None, :]
        pad = (owner < E)[:, None] & (slot >= n[:, None]) & in_j[:, None]
        tl.store(row_token_ptr + j.to(tl.int64)[:, None] * BLOCK_M + offs_i[None, :],
                 tl.full((BLOCK_TILES, BLOCK_M), -1, tl.int32), mask=pad)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _rows_times_w(a_ptr, a_rows, valid, w_base, offs_n, mask_n, K, s_a, s_wk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_F32: tl.constexpr, WIDEN: tl.constexpr, EVEN_K: tl.constexpr):
    """``a[a_rows] @ w[:, offs_n]`` as a ``[BLOCK_M, BLOCK_N]`` fp32 tile (rows not ``valid``
    and columns not in ``mask_n`` load zeros): the K loop of both experts designs.
    EVEN_K: ``K % BLOCK_K == 0``, so the loads need no K mask."""
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
        acc = _mma(a, w, acc, DOT_F32, WIDEN)
    return acc


@triton.jit
def _mma(a, w, acc, DOT_F32: tl.constexpr, WIDEN: tl.constexpr):
    """``acc + a @ w``, the grouped GEMMs' product: fp32 operands at full precision
    (DOT_F32), half operands as they are, or widened (WIDEN: the interpreter's bf16 dot, see
    ``seqdeploy.launch.interpreter_widens_bf16``)."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif DOT_F32:
        return tl.dot(a, w, acc, input_precision="ieee")
    else:
        return tl.dot(a, w, acc)


@triton.jit
def _padded_work(tile_expert_ptr, N, BLOCK_N: tl.constexpr):
    """The padded design's work item of this program: (row tile, N block), the N blocks of a
    row tile adjacent, and the row tile's expert (E for an unused tile)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks
    return pid_m, pid % n_blocks, tl.load(tile_expert_ptr + pid_m)


@triton.jit
def _grouped_ffn_kernel(a_ptr, row_token_ptr, tile_expert_ptr, w_ptr, bias_ptr, gate_ptr,
                        out_ptr, K, N, E, s_a, s_we, s_wk, s_be, s_o,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FIRST: tl.constexpr, DOT_F32: tl.constexpr, WIDEN: tl.constexpr,
                        EVEN_K: tl.constexpr):
    """FIRST: ``out[row] = GELU(a[token(row)] @ w[e] + b[e])``;
    else: ``out[token(row)] = gate[token] * (a[row] @ w[e] + b[e])`` (0 where the gate is 0).
    EVEN_K: ``K % BLOCK_K == 0``, so the loads of the K loop need no K mask."""
    pid_m, pid_n, e = _padded_work(tile_expert_ptr, N, BLOCK_N)
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
        acc = _rows_times_w(a_ptr, a_rows, valid, w_base, offs_n, mask_n, K, s_a, s_wk,
                            BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, WIDEN, EVEN_K)
        _ffn_epilogue(acc, e, rows, token, valid, offs_n, mask_n, bias_ptr, gate_ptr, out_ptr,
                      s_be, s_o, FIRST)


@triton.jit
def _ffn_epilogue(acc, e, rows, token, valid, offs_n, mask_n, bias_ptr, gate_ptr, out_ptr,
                  s_be, s_o, FIRST: tl.constexpr):
    """Both grouped-GEMM kernels' epilogue on the fp32 tile ``acc [rows, offs_n]`` of expert
    ``e``: + bias, then FIRST: GELU, stored at the padded rows; else: times the gate (0 stays
    exactly 0), scattered to the tokens' rows. Padding rows (not ``valid``) are not stored."""
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


@triton.jit
def _grouped_ffn_tma_kernel(a_ptr, a_desc, row_token_ptr, tile_expert_ptr, w_desc, bias_ptr,
                            gate_ptr, out_ptr, K, N, E, s_a, s_be, s_o,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, FIRST: tl.constexpr, WIDEN: tl.constexpr):
    """``_grouped_ffn_kernel`` (half dtypes, ``K % BLOCK_K == 0``) with the weight tiles, and
    in the second layer the rows of ``h`` too, loaded by the tensor-memory accelerator:
    ``w_desc`` views the weights as ``[E * K, N]`` (expert e's rows start at ``e * K``; with K
    a multiple of BLOCK_K a tile never crosses experts, and columns past N read as zeros),
    ``a_desc`` views ``h`` as ``[rows, K]``. The first layer's rows are gathered by token, so
    they stay pointer loads (``a_ptr``). Padding rows of ``h`` are never written (they hold
    whatever the buffer held, NaN included): each output row depends on its own input row
    only, and padding rows are never stored."""
    pid_m, pid_n, e = _padded_work(tile_expert_ptr, N, BLOCK_N)
    if e < E:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        token = tl.load(row_token_ptr + rows)
        valid = token >= 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_row = e * K
        for k0 in tl.range(0, K, BLOCK_K):
            if FIRST:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + token.to(tl.int64)[:, None] * s_a + offs_k[None, :],
                            mask=valid[:, None], other=0.0)
            else:
                a = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([w_row + k0, pid_n * BLOCK_N])
            acc = _mma(a, w, acc, False, WIDEN)
        _ffn_epilogue(acc, e, rows, token, valid, offs_n, offs_n < N, bias_ptr, gate_ptr,
                      out_ptr, s_be, s_o, FIRST)


@triton.jit
def _bucket_kernel(expert_ptr, counts_ptr, slot_token_ptr, N, E,
                   BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """The whole grouping of the "buckets" design in one pass: each token takes the next slot
    of its expert's bucket (``slot_token[e * N + rank] = token``) with one atomic add per
    (block, expert) on ``counts``; no cumsum over experts and no tile table is needed
    because the GEMMs derive their tiles from ``counts`` themselves."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(expert_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    ok = (offs < N) & (e >= 0) & (e < E)      # an id out of range joins no bucket
    rank = _claim_slots(e, ok, counts_ptr, E, BLOCK_E)
    tl.store(slot_token_ptr + e.to(tl.int64) * N + rank, offs.to(tl.int32), mask=ok)


@triton.jit
def _bucket_tile(a_ptr, slot_ptr, w_base, bias_ptr, gate_ptr, out_ptr, row0, n_rows, tile_row,
                 pid_n, K, N, s_a, s_wk, s_o,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FIRST: tl.constexpr, DOT_F32: tl.constexpr, WIDEN: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` output tile of one expert: its rows ``row0 .. row0 + n_rows``
    of the expert's bucket (``slot_ptr``: the bucket's token ids), padded row ``tile_row`` of
    ``h``. FIRST: ``h[padded row] = GELU(x[token] @ w + b)``; else
    ``y[token] = gate * (h[padded row] @ w + b)`` (0 where the gate is 0)."""
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < n_rows
    token = tl.load(slot_ptr + row0 + offs_m, mask=valid, other=0)
    padded = tile_row + offs_m.to(tl.int64)
    if FIRST:
        a_rows = token.to(tl.int64)
    else:
        a_rows = padded
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = _rows_times_w(a_ptr, a_rows, valid, w_base, offs_n, mask_n, K, s_a, s_wk,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, WIDEN, EVEN_K)
    # bias_ptr is the expert's own row already: expert 0 of a bias with no expert stride
    _ffn_epilogue(acc, 0, padded, token, valid, offs_n, mask_n, bias_ptr, gate_ptr, out_ptr,
                  0, s_o, FIRST)


@triton.jit
def _bucket_ffn_kernel(a_ptr, slot_token_ptr, counts_ptr, w_ptr, bias_ptr, gate_ptr, out_ptr,
                       n_tokens, K, N, E, s_a, s_we, s_wk, s_be, s_o,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr, ORDER_N: tl.constexpr, TAIL: tl.constexpr,
                       FIRST: tl.constexpr, DOT_F32: tl.constexpr, WIDEN: tl.constexpr,
                       EVEN_K: tl.constexpr):
    """One layer of the "buckets" grouped GEMM. Expert e's bucket (``counts[e]`` tokens) is
    cut into ``ceil(counts[e] / BLOCK_M)`` row tiles, numbered across experts in expert
    order; work item ``(row tile, N block)``. Every program reads ``counts`` (E ints) and
    finds its items' experts by a cumsum and a count of the tile ends at or below them, so
    no tile table is built on the device nor read on the host.

    ORDER_N: the row tiles of one (expert, N block) are consecutive work items (the weight
    tile is read by them together); else the N blocks of one row tile are (as "padded").
    TAIL (0, 1 or 2): a last tile with at most BLOCK_M / 2 (/ 4) rows runs as a tile of that
    height (less padding); its padded rows in ``h`` stay BLOCK_M apart.
    The grid may be smaller than the work (a persistent grid): each program strides over it."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)                      # exclusive end tile of each expert
    n_blocks = tl.cdiv(N, BLOCK_N)
    work = tl.sum(tiles) * n_blocks
    for item in tl.range(tl.program_id(0), work, tl.num_programs(0)):
        if ORDER_N:
            e = tl.sum((ends * n_blocks <= item).to(tl.int32))
        else:
            e = tl.sum((ends <= item // n_blocks).to(tl.int32))
        # expert e's end tile and count in one reduction (two int32 halves of an int64)
        packed = tl.sum(tl.where(offs_e == e, (ends.to(tl.int64) << 32) + counts, 0))
        end = packed >> 32
        count = (packed - (end << 32)).to(tl.int32)
        n_tiles = (count + BLOCK_M - 1) // BLOCK_M
        first_tile = end.to(tl.int32) - n_tiles
        local = item - first_tile * n_blocks
        if ORDER_N:
            m = local % n_tiles
            pid_n = local // n_tiles
        else:
            m = local // n_blocks
            pid_n = local % n_blocks
        row0 = m * BLOCK_M
        n_rows = tl.minimum(count - row0, BLOCK_M)
        slot = slot_token_ptr + e.to(tl.int64) * n_tokens
        w_base = w_ptr + e.to(tl.int64) * s_we
        b_base = bias_ptr + e.to(tl.int64) * s_be
        tile_row = (first_tile + m).to(tl.int64) * BLOCK_M
        if TAIL == 0:
            _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                         tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M, BLOCK_N, BLOCK_K,
                         FIRST, DOT_F32, WIDEN, EVEN_K)
        elif TAIL == 1:
            if n_rows <= BLOCK_M // 2:
                _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                             tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M // 2, BLOCK_N,
                             BLOCK_K, FIRST, DOT_F32, WIDEN, EVEN_K)
            else:
                _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                             tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M, BLOCK_N,
                             BLOCK_K, FIRST, DOT_F32, WIDEN, EVEN_K)
        else:
            if n_rows <= BLOCK_M // 4:
                _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                             tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M // 4, BLOCK_N,
                             BLOCK_K, FIRST, DOT_F32, WIDEN, EVEN_K)
            elif n_rows <= BLOCK_M // 2:
                _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                             tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M // 2, BLOCK_N,
                             BLOCK_K, FIRST, DOT_F32, WIDEN, EVEN_K)
            else:
                _bucket_tile(a_ptr, slot, w_base, b_base, gate_ptr, out_ptr, row0, n_rows,
                             tile_row, pid_n, K, N, s_a, s_wk, s_o, BLOCK_M, BLOCK_N,
                             BLOCK_K, FIRST, DOT_F32, WIDEN, EVEN_K)


_rank_launcher = Launcher(_rank_kernel, tensors=3)
_layout_launcher = Launcher(_layout_kernel, tensors=5)
_ffn_launcher = Launcher(_grouped_ffn_kernel, tensors=7)
_bucket_launcher = Launcher(_bucket_kernel, tensors=3)
_bucket_ffn_launcher = Launcher(_bucket_ffn_kernel, tensors=7)
LAYOUT_BLOCK = 128   # tokens per program of the rank and layout kernels
LAYOUT_TILES = 16    # tiles per step of the layout kernel's tile table and padding rows


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
                     (LAYOUT_BLOCK, block_e, block_m, LAYOUT_TILES), num_warps=4)
    return row_token, tile_expert


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Tiles of one grouped-GEMM layer (powers of two >= 16, ``tl.dot``'s minimum): an output
    tile is ``[block_m, block_n]`` (block_m from :class:`ExpertsPlan`), the contraction is
    streamed ``block_k`` at a time through a ``num_stages``-deep pipeline."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ExpertsPlan:
    """How :func:`triton_moe_experts` runs. ``design``:

    - ``"padded"`` (the first design): rank + layout kernels build a padded row table and a
      tile -> expert table, then the two grouped GEMMs over a grid of ``cdiv(N, block_m) + E``
      row tiles, the N blocks of a row tile adjacent.
    - ``"buckets"``: one kernel groups (``slot_token[e, rank] = token``, atomic counts),
      and each GEMM derives its tiles from the E counts (no tile table).
      ``order``: ``"m"`` the N blocks of a row tile are adjacent, ``"n"`` the row tiles of
      one (expert, N block) are (they read the same weight tile together). ``tail`` (0-2):
      an expert's last tile runs at ``block_m / 2`` (``/ 4``) rows when it fits, so fewer
      padding rows are computed at large block_m. ``persistent``: a grid of
      ``persistent`` programs per SM striding over the work instead of one per work item.

    Both designs gather the token rows in the first GEMM's A load and apply the gate and
    scatter to the token's row in the second GEMM's epilogue."""
    design: str
    block_m: int
    first: GemmTiles              # h = GELU(x W1 + b1): K = d, N = f
    second: GemmTiles             # y = gate (h W2 + b2): K = f, N = d
    order: str = "m"
    tail: int = 0
    persistent: int = 0
    tma: bool = False

    def name(self) -> str:
        """A short label: design, tiles of each layer, options."""
        t = lambda g: f"{g.block_n}x{g.block_k}w{g.num_warps}s{g.num_stages}"  # noqa: E731
        label = f"{self.design} m{self.block_m} {t(self.first)}"
        if self.second != self.first:
            label += f"|{t(self.second)}"
        if self.tma:
            label += " tma"
        if self.design != "padded":
            label += f" {self.order}"
            label += f" tail{self.tail}" if self.tail else ""
            label += f" pers{self.persistent}" if self.persistent else ""
        return label


def _check_plan(plan: ExpertsPlan) -> None:
    if plan.design not in ("padded", "buckets") or plan.order not in ("m", "n"):
        raise ValueError(f"unknown experts plan {plan}")
    if plan.block_m >> plan.tail < 16 or plan.tail not in (0, 1, 2):
        raise ValueError(f"block_m {plan.block_m} / 2**tail {plan.tail} must be >= 16 (tl.dot)")
    if plan.design == "padded" and (plan.tail or plan.persistent or plan.order != "m"):
        raise ValueError("the padded design has no tail, persistent grid or order 'n'")
    if plan.tma and plan.design != "padded":
        raise ValueError("tensor-memory loads (tma) are a form of the padded design only")


#: named plans :func:`experts_plan` builds, for tests and the benchmark (each must be
#: correct everywhere; which is fastest is for the benchmark to say)
EXPERTS_VARIANTS = ("auto", "padded", "padded-tma", "buckets", "buckets-n", "buckets-tail",
                    "buckets-wide", "buckets-persistent")


def experts_plan(N: int, E: int, d: int, f: int, dtype: torch.dtype,
                 variant: str = "auto") -> ExpertsPlan:
    """The plan of a named variant for ``N`` tokens over ``E`` experts of width ``d -> f -> d``
    in ``dtype`` (see :class:`ExpertsPlan`). The row tile follows the mean group size, as
    :func:`experts_config`; on top of it:

    - ``auto`` (the default): ``padded-tma`` for fp16 / bf16 at row tiles of 64 and more,
      else ``padded``; :func:`triton_moe_experts` runs it under CUDA-graph capture (after
      one eager call of the same signature has compiled it) and ``padded`` in other eager
      calls (see :func:`_tma_warm`). The padded design's GEMMs were faster than every ``buckets``
      variant's on an H100 (bf16, N=8192, d=768, f=3072), and there its tensor-descriptor
      form at these tiles beat the best pointer tiles at E=8 and E=64
      (``benchmarks/moe_layer.py`` times each named plan);
    - ``padded``: the first design at :func:`experts_config`'s tiles (the ONNX Runtime
      library's);
    - ``padded-tma``: the first design with the weight tiles (and the second layer's rows of
      h) loaded through tensor descriptors (:func:`_grouped_ffn_tma_kernel`) where the dtype
      and alignment allow, 256-column tiles on 8 warps at 128-row tiles, 128-column tiles on
      4 warps at 64;
    - ``buckets``: the one-pass grouping with the same tiles (one kernel instead of the
      rank and layout kernels);
    - ``buckets-n``: row tiles of one (expert, N block) adjacent;
    - ``buckets-tail``: block_m doubled (fewer re-reads of each weight tile: at E=64 a
      weight tile is read once per row tile, ~2.5 times at 64 rows, ~1.5 at 128) with
      half-height last tiles, so the padding stays that of the smaller tile;
    - ``buckets-wide``: as tail, plus 256-column tiles in the first layer (N = f): the
      weight share of each tile's loads halves again;
    - ``buckets-persistent``: ``buckets-tail`` on a persistent grid (2 programs per SM).

    ``benchmarks/moe_layer.py`` times every variant."""
    if variant not in EXPERTS_VARIANTS:
        raise ValueError(f"unknown experts variant {variant!r}: one of {EXPERTS_VARIANTS}")
    cfg = experts_config(N, E, d, f, dtype)
    bm = cfg["block_m"]
    tiles = GemmTiles(cfg["block_n"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"])
    half = dtype != torch.float32
    if variant == "padded" or (variant == "auto" and not (half and bm >= 64)):
        return ExpertsPlan("padded", bm, tiles, tiles)
    if variant in ("padded-tma", "auto"):
        if bm >= 128:    # both layers 256 columns wide on two warpgroups, 3 stages
            first = second = GemmTiles(256, cfg["block_k"], 8, 3)
        else:            # 3 stages in the first layer: three programs fit an SM, not two
            first = GemmTiles(128, cfg["block_k"], 4, 3)
            second = GemmTiles(128, cfg["block_k"], 4, 4)
        return ExpertsPlan("padded", bm, first, second, tma=True)
    if variant == "buckets":
        return ExpertsPlan("buckets", bm, tiles, tiles)
    if variant == "buckets-n":
        return ExpertsPlan("buckets", bm, tiles, tiles, order="n")
    f32 = dtype == torch.float32
    big = min(2 * bm, 128)
    wide = GemmTiles(128, cfg["block_k"], 8 if big >= 128 else 4, cfg["num_stages"])
    plan = ExpertsPlan("buckets", big, wide, wide, order="n", tail=1 if big >= 32 else 0)
    if variant == "buckets-wide":
        # 128 x 256 x 64 bf16 in 3 stages: 144 KB of shared memory, 128 accumulator
        # registers per thread at 8 warps (fp32: 32-deep K, 2 stages)
        first = GemmTiles(256, 32 if f32 else 64, 8, 2 if f32 else 3)
        plan = dataclasses.replace(plan, first=first)
    elif variant == "buckets-persistent":
        plan = dataclasses.replace(plan, persistent=2)
    return plan


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                      # the interpreter: a few programs, so the stride runs
    return torch.cuda.get_device_properties(device).multi_processor_count


def _run_padded(plan, xf, ef, gf, w1, b1, w2, b2, h_dtype, yf, widen):
    N, d = xf.shape
    E, _, f = w1.shape
    bm = plan.block_m
    row_token, tile_expert = group_tokens(ef, E, bm)
    max_tiles = tile_expert.numel()
    h = torch.empty(max_tiles * bm, f, dtype=h_dtype, device=xf.device)
    f32 = xf.dtype == torch.float32
    layers = ((xf, w1, b1, h, d, f, True, plan.first), (h, w2, b2, yf, f, d, False, plan.second))
    for a, w, bias, dst, K, Nn, first, t in layers:
        bn, bk = _fit(t.block_n, Nn), _fit(t.block_k, K)
        if plan.tma and _tma_fits(a, w, K, bk, f32, first):
            _launch_tma(a, row_token, tile_expert, w, bias, gf, dst, K, Nn, E, bm, bn, bk,
                        first, widen, t, max_tiles)
            continue
        _ffn_launcher((max_tiles * triton.cdiv(Nn, bn),),
                      (a, row_token, tile_expert, w, bias, gf, dst, K, Nn, E, a.stride(0),
                       w.stride(0), w.stride(1), bias.stride(0), dst.stride(0)),
                      (bm, bn, bk, first, f32, widen, K % bk == 0), num_warps=t.num_warps,
                      num_stages=t.num_stages)


#: the call signatures (:func:`_tma_warm`) whose descriptor-form kernels have run eagerly
_TMA_WARM: set[tuple] = set()


def _tma_warm(plan, xf, gf, y, w1, b1, w2, b2) -> bool:
    """Whether an ``"auto"`` call takes its descriptor form (``plan``) rather than the
    pointer form. The descriptor form's launches go through Triton's own launch path,
    which builds the descriptors each call: an eager H100 call at E=8 was bound by that
    host time, where the pointer kernels' direct launches were not. So the descriptor form
    runs where the launches are recorded once, in a CUDA graph; but its kernels must be
    compiled and loaded before a capture (a module cannot load while a stream captures), so
    the first eager call of each signature runs it (and compiles it), later eager calls run
    the pointer form, and a capture takes it only for a signature already run. The
    signature is what Triton specializes a binary on: the plan, dtypes, E, d, f, strides
    and 16-byte alignment of the tensors the kernels receive."""
    E, d, f = w1.shape
    key = (plan, xf.device, xf.dtype, E, d, f,
           *((t.dtype, t.data_ptr() % 16 == 0, t.stride()) for t in (xf, gf, y, w1, b1, w2, b2)))
    if xf.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return key in _TMA_WARM
    if key in _TMA_WARM:
        return False
    if len(_TMA_WARM) >= 1024:
        _TMA_WARM.clear()
    _TMA_WARM.add(key)
    return True


def _tma_fits(a, w, K, block_k, f32, first) -> bool:
    """Whether a layer can take :func:`_grouped_ffn_tma_kernel`: half dtypes, K a multiple of
    the K tile (a weight tile never crosses experts) and the 16-byte alignment tensor
    descriptors need (bases and row strides of the weights, and of h in the second layer;
    the first layer's rows are pointer loads)."""
    size = a.element_size()
    return (not f32 and K % block_k == 0 and w.is_contiguous() and a.stride(1) == 1
            and w.data_ptr() % 16 == 0 and (w.shape[-1] * size) % 16 == 0
            and (first or (a.data_ptr() % 16 == 0 and (a.stride(0) * size) % 16 == 0)))


def _launch_tma(a, row_token, tile_expert, w, bias, gf, dst, K, N, E, bm, bn, bk, first,
                widen, t, max_tiles) -> None:
    """One layer of the padded design through :func:`_grouped_ffn_tma_kernel` (a plain Triton
    launch: tensor descriptors are not raw pointers, which :class:`Launcher` passes)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    w_desc = TensorDescriptor(w, [w.shape[0] * K, N], [N, 1], [bk, bn])
    a_desc = None if first else TensorDescriptor(a, [a.shape[0], K], [a.stride(0), 1], [bm, bk])
    _grouped_ffn_tma_kernel[(max_tiles * triton.cdiv(N, bn),)](
        a, a_desc, row_token, tile_expert, w_desc, bias, gf, dst, K, N, E, a.stride(0),
        bias.stride(0), dst.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FIRST=first,
        WIDEN=widen, num_warps=t.num_warps, num_stages=t.num_stages)


def _bucket_block_e(E: int) -> int:
    """The width of E in the buckets GEMM: 128 up to E = 128, so E = 8 and E = 64 share its
    binaries (each program's search over the counts is a few 128-lane reductions)."""
    return max(128, triton.next_power_of_2(E))


def bucket_tokens(expert: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouping of the "buckets" design, with no host sync: ``counts [E]`` int32 and
    ``slot_token [E, N]`` int32 whose row e holds expert e's tokens in its first counts[e]
    slots (in no particular order; the rest is unset). ``expert [N]`` int64 on the device.
    Two launches: the memset of counts and :func:`_bucket_kernel`."""
    N = expert.numel()
    counts = torch.zeros(E, dtype=torch.int32, device=expert.device)
    slot_token = torch.empty(E, N, dtype=torch.int32, device=expert.device)
    block_e = max(2, triton.next_power_of_2(E))    # its one-hot tile is [LAYOUT_BLOCK, block_e]
    _bucket_launcher((triton.cdiv(N, LAYOUT_BLOCK),), (expert, counts, slot_token, N, E),
                     (LAYOUT_BLOCK, block_e), num_warps=4)
    return counts, slot_token


def _run_buckets(plan, xf, ef, gf, w1, b1, w2, b2, h_dtype, yf, widen):
    N, d = xf.shape
    E, _, f = w1.shape
    bm = plan.block_m
    counts, slot_token = bucket_tokens(ef, E)
    max_tiles = triton.cdiv(N, bm) + min(E, N)       # bounds the row tiles of any routing
    h = torch.empty(max_tiles * bm, f, dtype=h_dtype, device=xf.device)
    f32 = xf.dtype == torch.float32
    block_e = _bucket_block_e(E)
    layers = ((xf, w1, b1, h, d, f, True, plan.first), (h, w2, b2, yf, f, d, False, plan.second))
    for a, w, bias, dst, K, Nn, first, t in layers:
        bn, bk = _fit(t.block_n, Nn), _fit(t.block_k, K)
        grid = max_tiles * triton.cdiv(Nn, bn)
        if plan.persistent:
            grid = min(grid, plan.persistent * _sm_count(xf.device))
        _bucket_ffn_launcher((grid,),
                             (a, slot_token, counts, w, bias, gf, dst, N, K, Nn, E, a.stride(0),
                              w.stride(0), w.stride(1), bias.stride(0), dst.stride(0)),
                             (bm, bn, bk, block_e, plan.order == "n", plan.tail, first, f32,
                              widen, K % bk == 0),
                             num_warps=t.num_warps, num_stages=t.num_stages)


def triton_moe_experts(x, expert, gate, w1, b1, w2, b2, out=None, block_m=None, block_n=None,
                       block_k=None, num_warps=None, num_stages=None,
                       plan: ExpertsPlan | str | None = None):
    """Launch the grouping and the two grouped GEMMs (see the module docstring).
    ``x [B, T, d]``; weights ``[E, ...]`` contiguous in their last dim. ``out``: optional
    preallocated ``y [B, T, d]`` (contiguous). ``plan``: an :class:`ExpertsPlan` or a variant
    name of :data:`EXPERTS_VARIANTS` (default ``"auto"``). ``block_m`` ... ``num_stages``
    override the plan's row tile and both layers' tiles (the first design's knobs)."""
    check_experts_args(x, expert, gate, w1, b1, w2, b2)
    B, T, d = x.shape
    E, _, f = w1.shape
    N = B * T
    xf = x.reshape(N, d)
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    w1, b1, w2, b2 = (w if w.stride(-1) == 1 else w.contiguous() for w in (w1, b1, w2, b2))
    ef = expert.reshape(N)
    gf = gate.reshape(N)
    if gf.dtype != torch.float32:
        gf = gf.float()
    ef, gf = ef.contiguous(), gf.contiguous()
    auto = plan is None or plan == "auto"
    if auto or isinstance(plan, str):
        plan = experts_plan(N, E, d, f, x.dtype, plan or "auto")
    over = {k: v for k, v in (("block_n", block_n), ("block_k", block_k),
                              ("num_warps", num_warps), ("num_stages", num_stages)) if v}

    def overridden(plan):
        if over:
            plan = dataclasses.replace(plan, first=dataclasses.replace(plan.first, **over),
                                       second=dataclasses.replace(plan.second, **over))
        if block_m:     # the plan's tail tiles, as deep as they stay >= 16 rows
            tail = min(plan.tail, max(0, (block_m // 16).bit_length() - 1))
            plan = dataclasses.replace(plan, block_m=block_m, tail=tail)
        return plan

    plan = overridden(plan)
    _check_plan(plan)
    y = out if out is not None else torch.empty(B, T, d, dtype=x.dtype, device=x.device)
    if auto and plan.tma and not _tma_warm(plan, xf, gf, y, w1, b1, w2, b2):
        plan = overridden(experts_plan(N, E, d, f, x.dtype, "padded"))
    run = _run_padded if plan.design == "padded" else _run_buckets
    run(plan, xf, ef, gf, w1, b1, w2, b2, x.dtype, y.view(N, d), interpreter_widens_bf16(x.dtype))
    return y


def padded_rows(counts: list[int], block_m: int) -> int:
    """Rows the grouped GEMMs compute for these group sizes (for the benchmark's report)."""
    return sum(math.ceil(c / block_m) * block_m for c in counts)
