"""``cfc_scan`` on CUDA: which kernel design runs (:func:`choose`) and its launch.

The recurrence is nonlinear, so every design walks the T steps in order in one launch (``xw``
read once, ``y`` written once, fp32 state); they differ in how a step's ``[B, H] @ [H, H]``
spreads over the GPU. One file each, the step they share in ``common.py``:
- ``rows`` (``rows.py``): a program per 16 batch rows, all H columns; nothing exchanged.
- ``split`` (``split.py``): a batch block's columns over a thread-block cluster exchanging
  ``h`` through ``y`` and the cluster barrier; for one step, over independent programs.
- ``wgmma`` (``wgmma.py``): the cluster split for Hopper in Gluon, ``w_rec`` in registers,
  ``h`` exchanged through the siblings' shared memory.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from seqdeploy.launch import Launcher, cluster_launch_available
from seqdeploy_cfc.common import SERIES_BELOW
from seqdeploy_cfc.rows import _cfc_scan_kernel
from seqdeploy_cfc.split import _cfc_split_kernel

W_RESIDENT_BYTES = 128 * 1024   # the largest w_rec tile (in the dot's dtype) kept on chip
MAX_CLUSTER = 8                 # the most programs in a cluster (CUDA's portable limit)
#: whether kernels run in Triton's interpreter (``triton.jit`` reads TRITON_INTERPRET at import)
_INTERPRETED = not isinstance(_cfc_split_kernel, triton.runtime.JITFunction)


@triton.jit
def _cfc_scan_aot_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, dt_bits, B, T, H, y_ptr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         W_RESIDENT: tl.constexpr, DOT_F32: tl.constexpr,
                         SERIES_BELOW: tl.constexpr, FAST_TANH: tl.constexpr):
    """TensorRT's AOT entry (``seqdeploy.trt.aot``): the ``rows`` design (``rows.py``, one
    launch, no workspace, no cluster) with its parameters in TensorRT's order (inputs,
    scalars, outputs) on dense tensors (``xw, y [B, T, H]``, ``h0 [B, H]``, ``w_rec [H, H]``).
    ``dt_bits``: the ``dt`` attribute's fp32 bit pattern (TensorRT's AOT scalars are
    integers)."""
    dt = dt_bits.to(tl.float32, bitcast=True)
    _cfc_scan_kernel(xw_ptr, h0_ptr, w_ptr, tau_ptr, y_ptr, dt, B, T, H, T * H, H, H, H, T * H,
                     H, BLOCK_B, BLOCK_H, BLOCK_K, W_RESIDENT, DOT_F32, SERIES_BELOW, FAST_TANH)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What :func:`choose` needs to know of a CUDA device."""
    sms: int
    capability: tuple[int, int]
    clusters: bool   # thread-block cluster launches (``seqdeploy.launch``), sm_90 on
    wgmma: bool      # the wgmma design runs: clusters, compute capability 9.x, Gluon


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One launch of a design. Tiles are powers of two >= 16 (``tl.dot``)."""
    design: str        # "rows", "split" or "wgmma"
    block_b: int       # batch rows per program
    block_h: int       # H rounded up: the contraction axis, all of h
    block_n: int       # columns of h per program (all of block_h for rows)
    block_k: int       # slice of the contraction axis where w_rec is streamed
    num_warps: int
    w_resident: bool   # the program's w_rec columns stay on chip (else re-read every step)
    cluster: bool      # a batch block's column blocks launch as one thread-block cluster
    dot_f32: bool      # the dot in fp32 (fp32 inputs; bf16 in the interpreter)
    fast_tanh: bool    # tanh.approx.f32 (fp16/bf16 on a GPU)

    def column_blocks(self, H: int) -> int:
        return triton.cdiv(H, self.block_n)

    def grid(self, B: int, H: int) -> int:
        return triton.cdiv(B, self.block_b) * self.column_blocks(H)

    def constexprs(self, H: int) -> tuple:
        """The design's kernel's constexpr arguments, in order."""
        if self.design == "rows":
            return (self.block_b, self.block_h, self.block_k, self.w_resident, self.dot_f32,
                    SERIES_BELOW, self.fast_tanh)
        if self.design == "split":
            return (self.block_b, self.block_h, self.block_n, self.block_k, self.w_resident,
                    self.dot_f32, SERIES_BELOW, self.fast_tanh, self.cluster)
        return (self.block_b, self.block_h, self.block_n, self.column_blocks(H), SERIES_BELOW,
                self.fast_tanh, self.num_warps)


@functools.lru_cache(maxsize=4096)
def choose(B: int, T: int, H: int, dtype: torch.dtype, gpu: Gpu | None) -> LaunchPlan:
    """The default plan for ``[B, T, H]`` inputs of ``dtype`` on ``gpu`` (None: the
    interpreter). Each rule won where measured (benchmarks/cfc_scan.py, the README's table):
    - several steps at H >= 129 where clusters launch: ``wgmma`` in fp16/bf16 up to H = 512
      on sm_9x (4 programs of 64 columns up to H = 256, of 128 above), else the cluster
      ``split`` (8 programs per batch block; 4 in fp16/bf16 from H = 257). Any B runs;
    - one step (streaming): ``split`` without clusters where H spans several column blocks
      and the grid fits the SMs with <= 64 rows per program (each reads its w_rec slice);
    - otherwise ``rows``, ``w_rec`` on chip where it fits in ``W_RESIDENT_BYTES``."""
    half = dtype != torch.float32
    block_h = max(16, triton.next_power_of_2(H))
    plan = functools.partial(LaunchPlan, block_h=block_h, block_k=min(32, block_h),
                             dot_f32=not half or (dtype == torch.bfloat16 and gpu is None),
                             fast_tanh=half and gpu is not None and gpu.capability >= (7, 5))
    if gpu is not None and gpu.clusters and T > 1 and block_h >= 256:
        if gpu.wgmma and half and block_h <= 512:
            block_n = 64 if block_h <= 256 else 128
            return plan(design="wgmma", block_b=16, block_n=block_n, num_warps=block_n // 16,
                        w_resident=True, cluster=True)
        block_n = block_h // (4 if half and block_h >= 512 else MAX_CLUSTER)
        return plan(design="split", block_b=16, block_n=block_n, cluster=True,
                    **_split_tile(16, block_n, block_h, half))
    if gpu is not None and T == 1:
        block_n = min(64 if half and block_h >= 512 else 32, block_h)
        n_nb, block_b = triton.cdiv(H, block_n), 16
        while block_b < 64 and triton.cdiv(B, block_b) * n_nb > gpu.sms:
            block_b *= 2
        if n_nb >= 2 and triton.cdiv(B, block_b) * n_nb <= gpu.sms:
            return plan(design="split", block_b=block_b, block_n=block_n, cluster=False,
                        **_split_tile(block_b, block_n, block_h, half))
    return plan(design="rows", block_b=16, block_n=block_h, cluster=False,
                num_warps=4 if block_h <= 128 or (half and block_h <= 256) else 8,
                w_resident=block_h * block_h * (2 if half else 4) <= W_RESIDENT_BYTES)


def _split_tile(block_b: int, block_n: int, block_h: int, half: bool) -> dict:
    """``w_resident`` and ``num_warps`` of a split tile: the largest that ptxas compiled for
    sm_90 without spills (``block_b * block_h * block_n`` up to 2^20 in fp16/bf16, 2^18 in
    fp32, an FMA loop); larger slices are streamed in ``block_k`` pieces."""
    volume = block_b * block_h * block_n
    if not half:
        return {"w_resident": volume <= 2 ** 18, "num_warps": 4 if block_b == 16 else 8}
    return {"w_resident": volume <= 2 ** 20 and block_h * block_n * 2 <= W_RESIDENT_BYTES,
            "num_warps": 4 if block_b * block_h <= 16 * 512 else 8}


def gpu_of(device) -> Gpu | None:
    """The :class:`Gpu` of a CUDA device, or None where kernels run in the interpreter."""
    device = torch.device(device)
    if device.type != "cuda" or _INTERPRETED:
        return None
    return _gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> Gpu:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    clusters = cluster_launch_available() and capability >= (9, 0)
    try:   # a Triton without Gluon's Hopper ops never runs the wgmma design
        from seqdeploy_cfc import wgmma   # noqa: F401
    except (ImportError, AttributeError):
        wgmma = None
    return Gpu(props.multi_processor_count, capability, clusters,
               clusters and capability[0] == 9 and wgmma is not None)


_LAUNCHERS = {"rows": Launcher(_cfc_scan_kernel, tensors=5),
              "split": Launcher(_cfc_split_kernel, tensors=5)}


def launcher(design: str) -> Launcher:
    """The :class:`seqdeploy.launch.Launcher` of a design (Gluon imported on first use)."""
    if design not in _LAUNCHERS:
        from seqdeploy_cfc.wgmma import _cfc_wgmma_kernel
        _LAUNCHERS[design] = Launcher(_cfc_wgmma_kernel, tensors=5)
    return _LAUNCHERS[design]


def _launch(plan: LaunchPlan, xw, h0, w_rec, tau, y, dt: float, keep: tuple | None) -> None:
    """Launch ``plan``; with ``keep`` (a :func:`_signature`), keep the launch in ``_READY``."""
    B, T, H = xw.shape
    sx, sy = xw.stride(), y.stride()
    args = (xw, h0, w_rec, tau, y, float(dt), B, T, H, sx[0], sx[1], h0.stride(0),
            w_rec.stride(0), sy[0], sy[1])
    run, grid, values = launcher(plan.design), (plan.grid(B, H),), plan.constexprs(H)
    if plan.design == "wgmma":
        from seqdeploy_cfc.wgmma import shared_offsets
        args = (*args, *shared_offsets(run, grid, args, values, plan.num_warps))
    cluster = plan.column_blocks(H) if plan.cluster else 0
    if cluster:
        run.clustered(grid, cluster, args, values, num_warps=plan.num_warps)
    else:
        run(grid, args, values, num_warps=plan.num_warps)
    bound = keep and run.bind(grid, args, values, cluster, num_warps=plan.num_warps)
    if bound:
        if len(_READY) >= 4096:
            _READY.clear()
        _READY[keep] = bound


#: default launches bound by :func:`_signature`: a repeat eager call skips ``_prepare``,
#: :func:`choose` and the launcher's key, which cost more than a short GPU run
_READY: dict[tuple, object] = {}


def _signature(xw, h0, w_rec, tau, dt) -> tuple:   # all a launch depends on but addresses
    return (xw.get_device(), xw.shape, xw.stride(), xw.dtype, h0.stride(), h0.dtype,
            w_rec.stride(0), w_rec.is_contiguous(), w_rec.dtype, tau.is_contiguous(),
            tau.dtype, dt)


def _prepare(xw, h0, w_rec, tau, out):
    """The inputs as the kernels take them (unit stride over H, ``xw``'s dtype for ``h0`` and
    ``w_rec``, fp32 ``tau``) and ``y``; attribute tests only where nothing needs changing."""
    if xw.stride(2) != 1:
        xw = xw.contiguous()
    if h0.dtype != xw.dtype or h0.stride(1) != 1:
        h0 = h0.to(xw.dtype).contiguous()
    if w_rec.dtype != xw.dtype or not w_rec.is_contiguous():
        w_rec = w_rec.to(xw.dtype).contiguous()
    if tau.dtype != torch.float32 or not tau.is_contiguous():
        tau = tau.float().contiguous()
    if out is None:
        return xw, h0, w_rec, tau, torch.empty_like(xw, memory_format=torch.contiguous_format)
    if out.shape != xw.shape or out.dtype != xw.dtype or out.device != xw.device or \
            (out.numel() and out.stride(2) != 1):
        raise ValueError(f"cfc_scan out must be {tuple(xw.shape)} {xw.dtype} on {xw.device}, unit "
                         f"stride over H, not {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"strides {out.stride()}")
    base = out.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == base for t in (xw, h0, w_rec, tau)):
        raise ValueError("cfc_scan out shares memory with an input")   # y is read back
    return xw, h0, w_rec, tau, out


def triton_cfc_scan(xw, h0, w_rec, tau, dt: float, out=None,
                    plan: LaunchPlan | None = None) -> torch.Tensor:
    """``y [B, T, H]`` in ``xw``'s dtype (fp32, fp16 or bf16; ``h0 [B, H]`` and ``w_rec [H, H]``
    take it, ``tau [H]`` is fp32). ``xw`` and ``h0`` may be views with unit stride over H.
    ``out``: a preallocated ``y``; ``plan``: the launch (default :func:`choose`'s)."""
    keep = None
    if out is None and plan is None:
        keep = _signature(xw, h0, w_rec, tau, dt)
        ready = _READY.get(keep)
        if ready is not None:
            y = torch.empty_like(xw, memory_format=torch.contiguous_format)
            if ready(xw, h0, w_rec, tau, y):
                return y
    given = (xw, h0, w_rec, tau)
    xw, h0, w_rec, tau, y = _prepare(xw, h0, w_rec, tau, out)
    B, T, H = xw.shape
    if B == 0 or T == 0:
        return y
    gpu = gpu_of(xw.device)
    if gpu is None or any(a is not b for a, b in zip(given, (xw, h0, w_rec, tau))):
        keep = None   # kept ready only where the inputs were used as given
    if plan is None:
        plan = choose(B, min(T, 2), H, xw.dtype, gpu)
    elif plan.cluster and not (gpu and gpu.clusters and plan.column_blocks(H) <= MAX_CLUSTER):
        raise RuntimeError(f"cfc_scan plan {plan.design} needs cluster launches (compiled, "
                           f"sm_90 on, seqdeploy.launch) of at most {MAX_CLUSTER} programs")
    elif plan.design == "wgmma" and not (gpu and gpu.wgmma):
        raise RuntimeError("cfc_scan plan wgmma needs compute capability 9.x and Gluon")
    elif plan.design == "split" and not plan.cluster and T > 1:
        raise ValueError(f"cfc_scan split without clusters runs a single step, not T={T}")
    _launch(plan, xw, h0, w_rec, tau, y, dt, keep)
    return y
