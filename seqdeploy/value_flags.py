"""Input value checks that run on the device, for a CUDA graph that checks its own inputs.

:func:`check_inputs`' value checks (NaN or Inf in a float input, an integer outside its
``bounds``) read the values on the host, which on a GPU costs a synchronisation and a copy
per input. :func:`flag_bad_values` computes the same verdicts on the device without a sync:
one small Triton kernel per checked input, which

- ORs its verdict into a device flag (``any_bad``, a 0-d bool tensor) that the graph's later
  kernels read, e.g. to keep the old state when an input is bad, and
- writes it into ``host_flags[i]`` directly. When ``host_flags`` is pinned host memory the
  GPU stores there itself (pinned memory is mapped into the device's address space), so the
  graph needs no device-to-host copy node: on the H200 that node cost about 13 us of a
  35 us streaming step. After the stream is synchronised the host reads the flags as they
  are.

Given ``sources`` (addresses in pinned host memory), the same kernels also copy each input
into the graph's static buffer first, so a replay takes new feeds without a host-side copy.

Everything is launched as plain ``kernel[grid]``: this is meant to be captured once into a
CUDA graph, where launch overhead is paid at capture time only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from seqdeploy.architecture import TensorSpec

_BLOCK = 1024


@triton.jit
def _flag_bad_values(x_ptr, n, lo, hi, any_ptr, host_ptr, FINITE: tl.constexpr,
                     WIDEN: tl.constexpr, BOUNDS: tl.constexpr, FIRST: tl.constexpr,
                     BLOCK: tl.constexpr, source_ptr, GATHER: tl.constexpr):
    """Flag one input's bad values (``FINITE`` / ``BOUNDS``; neither: flag nothing). With
    ``GATHER``, first copy the input into ``x`` from the address held at ``source_ptr``."""
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    if GATHER:
        src = tl.load(source_ptr).to(tl.pointer_type(x_ptr.dtype.element_ty))
    else:
        src = x_ptr
    for start in range(0, n, BLOCK):
        inside = start + offs < n
        v = tl.load(src + start + offs, mask=inside, other=0)
        if GATHER:
            tl.store(x_ptr + start + offs, v, mask=inside)
        if WIDEN:   # fp16 / bf16 -> fp32 is exact, NaN and Inf included
            v = v.to(tl.float32)
        hit = tl.zeros([BLOCK], dtype=tl.int32)
        if FINITE:
            hit = hit | ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)
        if BOUNDS:
            hit = hit | ((v < lo) | (v >= hi)).to(tl.int32)
        bad = bad | tl.where(inside, hit, 0)
    if FINITE or BOUNDS:
        flag = tl.max(bad, axis=0)
        tl.store(host_ptr, flag.to(tl.int1))
        if not FIRST:
            flag = flag | tl.load(any_ptr).to(tl.int32)
        tl.store(any_ptr, flag.to(tl.int1))


def flag_bad_values(specs: list["TensorSpec"], inputs: dict[str, torch.Tensor],
                    any_bad: torch.Tensor, host_flags: torch.Tensor,
                    sources: torch.Tensor | None = None) -> None:
    """Set ``host_flags[i]`` where :func:`check_inputs` would reject the values of input
    ``specs[i]`` and ``any_bad`` to the OR of them, on the inputs' device, without a sync.

    ``any_bad`` is a 0-d bool tensor on the inputs' device; ``host_flags`` a bool vector with
    one entry per spec (pinned host memory when the inputs are on a GPU, or any tensor the
    kernel can store to). ``host_flags`` must start out False: an input without a value check
    (an unbounded integer or bool) launches nothing, so its entry is never written; so must
    ``any_bad`` where no input is checked at all (else the first checked input's kernel
    overwrites it). Inputs must be contiguous (the stream's static buffers are made so).

    ``sources`` (optional): an int64 vector with one entry per spec, each the address of a
    contiguous tensor of that input's dtype and size, typically in pinned host memory that
    the host rewrites before each replay of a graph. Then every input (checked or not) is
    first copied from that address into ``inputs[name]`` by its kernel, so a graph takes
    new feeds without a copy launched from the host per input (a host-side ``copy_`` cost
    6-8 us of a streaming step on the H200's host). The addresses are read when the kernel
    runs: the host may rewrite them only once that has happened (after a synchronise).

    Bounds on a float input are compared in fp32 against the bounds rounded up to fp32,
    which for fp16, bf16 and fp32 values gives exactly the comparison against the exact
    bounds (no fp32 lies between a bound and its rounded-up value)."""
    if any_bad.dtype != torch.bool or any_bad.dim() != 0:
        raise ValueError("any_bad must be a 0-d bool tensor")
    if host_flags.dtype != torch.bool or tuple(host_flags.shape) != (len(specs),):
        raise ValueError(f"host_flags must be a bool vector of {len(specs)}")
    if sources is not None and (sources.dtype != torch.int64
                                or tuple(sources.shape) != (len(specs),)):
        raise ValueError(f"sources must be an int64 vector of {len(specs)}")
    first = True
    for i, spec in enumerate(specs):
        tensor = inputs[spec.name]
        finite = tensor.is_floating_point()
        bounded = spec.bounds is not None
        if not (finite or bounded or sources is not None):
            continue
        if not tensor.is_contiguous():
            raise ValueError(f"input {spec.name}: flag_bad_values needs a contiguous tensor")
        lo, hi = spec.bounds if bounded else (0, 0)
        widen = finite and tensor.element_size() < 4       # fp16 / bf16
        if finite and bounded:
            lo, hi = _round_up_fp32(lo), _round_up_fp32(hi)
        _flag_bad_values[(1,)](tensor, tensor.numel(), lo, hi, any_bad, host_flags[i:],
                               FINITE=finite, WIDEN=widen, BOUNDS=bounded, FIRST=first,
                               BLOCK=_BLOCK,
                               source_ptr=tensor if sources is None else sources[i:],
                               GATHER=sources is not None, num_warps=4)
        first = first and not (finite or bounded)


def _round_up_fp32(x: float) -> float:
    """The smallest fp32 value >= ``x`` (Triton passes a float scalar as fp32)."""
    with np.errstate(over="ignore"):          # beyond fp32: inf, as a comparison wants
        f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)
