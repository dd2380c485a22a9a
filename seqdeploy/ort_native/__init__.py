"""seqdeploy's native ONNX Runtime op library: how a plugin contributes its op's ORT kernel.

An op joins the library by carrying an :class:`OrtKernel` in ``CustomOp.extra["ort"]``: its C++
source(s) beside the op's other forms in the plugin folder (``ort_<op>.cc``, written against
``seqdeploy_ort.h``), the kernel class the source registers (``SEQDEPLOY_ORT_OP(Kernel)``),
and the Triton kernels its CUDA form launches (:class:`TritonAOT`), which the build compiles
ahead of time from the plugin's own ``kernels.py``: one kernel source for torch and ORT.
``seqdeploy build-ort-ops`` (:func:`seqdeploy.ort_native.build.build_library`) finds every
registered op's ``OrtKernel`` through the plugin registry; the core names no op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: ``CustomOp.extra`` key of an op's :class:`OrtKernel`
EXTRA_KEY = "ort"


@dataclass(frozen=True)
class TritonAOT:
    """One Triton kernel compiled ahead of time into the library, per dtype and variant, for
    sm_80 and sm_90. The C++ side finds it as ``FindTritonKernel("<name>_<dtype>_<variant>")``.

    - ``kernel``: ``"package.module:function"`` of the ``@triton.jit`` function;
    - ``signature``: its runtime (non-constexpr) parameters in order, Triton types, with
      ``"*T"`` for a pointer to the dtype being compiled (e.g. ``"*fp32"``, ``"i32"``);
    - ``variants``: ``dtype -> {variant: (constexprs, num_warps)}``, every constexpr named;
    - ``dtypes``: Triton dtype names compiled (``fp32``, ``fp16``);
    - ``archs``: the architectures compiled, where the kernel needs a newer one than the
      library's oldest (a kernel using thread-block clusters: ``(90,)``); None for all. The
      op's C++ form checks ``ComputeCapability()`` before it looks such a kernel up.
    """

    name: str
    kernel: str
    signature: dict[str, str]
    variants: Callable[[str], dict[str, tuple[dict, int]]]
    dtypes: tuple[str, ...] = ("fp32", "fp16")
    archs: tuple[int, ...] | None = None


@dataclass(frozen=True)
class OrtKernel:
    """An op's ORT kernel: ``sources`` (C++ files, relative to the folder of ``package``, the
    plugin package), ``kernel_class`` (the class its ``SEQDEPLOY_ORT_OP`` registers for the CPU
    and CUDA providers) and ``triton`` (the Triton kernels its CUDA form launches)."""

    package: str
    sources: tuple[str, ...]
    kernel_class: str
    triton: tuple[TritonAOT, ...] = field(default=())
