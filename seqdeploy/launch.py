"""Launching Triton kernels with little host overhead.

``kernel[grid](*args, **meta)`` binds every argument, derives Triton's specialization key
and looks the binary up, on every call: on the H200 host that is 20-40 us of Python per
launch, longer than the whole GPU run of a short recurrence. :class:`Launcher` pays that once
per distinct call signature, and only behind one version check (``PRIVATE_LAUNCH``: the
Triton versions in ``PRIVATE_LAUNCH_VERSIONS``, whose private C launcher the GPU tests ran):

- there, the first call with a signature goes through ``kernel[grid]`` (which compiles if
  needed) and keeps the compiled binary's C launcher (:func:`_private_launch`, the one
  function that touches Triton's private launch API); later calls call it directly with
  what ``CompiledKernel.run`` would pass it, pointers as the integers already read for the
  key. Launches as thread-block clusters (:meth:`Launcher.clustered`) exist only there;
- on every other version, every call is ``kernel[grid]``, Triton's public launch path.

The signature is finer than anything Triton specializes on: the device, every tensor's
dtype and the low byte of its address (Triton keys on 16-byte alignment), the exact value of
every scalar (Triton keys on an integer's ``== 1`` and divisibility by 16), the grid, the
constexprs and the launch options. So a cached binary is only reused where ``kernel[grid]``
would pick the same one.

Even behind the check, calls take ``kernel[grid]`` in Triton's interpreter and on CPU
tensors, for tensors off the current CUDA device, while launch hooks are installed
(profilers), and for binaries that need scratch memory.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import triton

#: distinct signatures kept per kernel before the table is cleared (each costs one slow call)
MAX_SIGNATURES = 4096
#: Triton versions (major.minor) whose private C launcher the GPU tests ran:
#: ``launch(grid_x, grid_y, grid_z, stream, function, cooperative_grid, pdl, global_scratch,
#: profile_scratch, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``
PRIVATE_LAUNCH_VERSIONS = ("3.6",)
#: the one version check: whether the fast path (and cluster launches) may run at all
PRIVATE_LAUNCH = ".".join(triton.__version__.split(".")[:2]) in PRIVATE_LAUNCH_VERSIONS


class Launcher:
    """``Launcher(kernel, tensors=n)(grid, args, values, num_warps=...)`` runs
    ``kernel[grid](*args, **constexprs, num_warps=...)``. ``args`` are the kernel's runtime
    parameters in order, the first ``tensors`` of them tensors and the rest scalars;
    ``values`` is a tuple of its constexpr parameters, all of them, in order, which must come
    last in the kernel's signature (their names are the kernel's parameter names after
    ``args``)."""

    def __init__(self, kernel, tensors: int) -> None:
        self.kernel = kernel
        self.tensors = tensors
        self._jit = isinstance(kernel, triton.runtime.JITFunction)
        self._binaries: dict[tuple, tuple | None] = {}
        self._stream = None
        self.fast_calls = 0   # how many calls took the fast path (tests check it is used)

    def _constexprs(self, args, values) -> dict[str, Any]:
        names = self.kernel.arg_names[len(args):]
        if len(names) != len(values):
            raise TypeError(f"{self.kernel.__name__}: {len(args)} runtime arguments and "
                            f"{len(values)} constexprs, but it has {len(names)} parameters "
                            "after the runtime ones")
        return dict(zip(names, values))

    def _plain(self, grid, args, values, options) -> Any:
        return self.kernel[grid](*args, **self._constexprs(args, values), **options)

    def _key(self, cluster, device, grid, args, ptrs, values, options) -> tuple:
        """What a cached binary is keyed on (see the module docstring); ``cluster``: the
        cluster size of :meth:`clustered`, 0 for plain launches."""
        n = self.tensors
        return (cluster, device, grid, values, *options.values(), *[t.dtype for t in args[:n]],
                *[p & 255 for p in ptrs], *args[n:])

    def _remember(self, key, entry) -> None:
        if len(self._binaries) >= MAX_SIGNATURES:
            self._binaries.clear()
        self._binaries[key] = entry

    def _launch(self, direct, grid_x, grid_y, grid_z, device, ptrs, tail) -> None:
        """Call a :func:`_private_launch` on the current stream; pointers go as the integers
        already read for the key, then ``tail``: the scalar arguments and the constexprs."""
        if self._stream is None:
            from triton.runtime import driver

            self._stream = driver.active.get_current_stream
        launch, function, cooperative, pdl, packed = direct
        launch(grid_x, grid_y, grid_z, self._stream(device), function, cooperative, pdl, None,
               None, packed, None, None, None, *ptrs, *tail)
        self.fast_calls += 1

    def __call__(self, grid: tuple[int, ...], args: tuple, values: tuple,
                 **options: Any) -> None:
        first = args[0]
        if not (PRIVATE_LAUNCH and self._jit and first.is_cuda and _plain_launch()) or \
                first.get_device() != torch._C._cuda_getDevice():
            # (Triton loads and launches binaries on the current device: leave others to it)
            self._plain(grid, args, values, options)
            return
        device = first.get_device()
        n = self.tensors
        ptrs = [t.data_ptr() for t in args[:n]]
        key = self._key(0, device, grid, args, ptrs, values, options)
        if key not in self._binaries:
            if any(not isinstance(a, torch.Tensor) for a in args[:n]) or \
                    any(isinstance(a, torch.Tensor) for a in args[n:]):
                raise TypeError(f"{self.kernel.__name__}: the first {n} arguments must be "
                                "tensors and the rest scalars")
            binary = self._plain(grid, args, values, options)
            self._remember(key, _private_launch(binary) if binary is not None else None)
            return
        direct = self._binaries[key]
        if direct is None:   # (a binary that needs scratch memory)
            self._plain(grid, args, values, options)
            return
        g = (*grid, 1, 1)
        self._launch(direct, g[0], g[1], g[2], device, ptrs, (*args[n:], *values))

    def clustered(self, grid: tuple[int], cluster: int, args: tuple, values: tuple,
                  **options: Any) -> None:
        """Run ``grid[0]`` programs as thread-block clusters of ``cluster`` consecutive
        programs (Hopper on): the programs of one cluster are scheduled together, and may
        synchronise through the cluster barrier. ``kernel[grid]`` cannot ask for clusters
        without also splitting every tensor across them (``num_ctas``), so this always takes
        the private C launcher, with the cluster size in place of ``num_ctas``; the first
        call of a signature compiles with ``warmup`` (no launch). Where that launcher is not
        available (:func:`cluster_launch_available` is False), it raises RuntimeError.
        Launch hooks are not called."""
        if not cluster_launch_available():
            raise RuntimeError("cluster launches need the private C launcher of triton "
                               f"{' or '.join(PRIVATE_LAUNCH_VERSIONS)}, not "
                               f"{triton.__version__}")
        device = args[0].get_device()
        if device != torch._C._cuda_getDevice():
            # Triton compiles for, and launches on, the current device
            with torch.cuda.device(device):
                self.clustered(grid, cluster, args, values, **options)
            return
        ptrs = [t.data_ptr() for t in args[:self.tensors]]
        key = self._key(cluster, device, grid, args, ptrs, values, options)
        direct = self._binaries.get(key)
        if direct is None:   # (a signature seen before passed the checks in here)
            direct = self._cluster_binary(key, grid, cluster, args, values, options)
        # the launcher multiplies the grid by the cluster size it reads from the metadata
        self._launch(direct, grid[0] // cluster, 1, 1, device, ptrs,
                     (*args[self.tensors:], *values))

    def bind(self, grid: tuple[int, ...], args: tuple, values: tuple, cluster: int = 0,
             **options: Any) -> Callable[..., bool] | None:
        """The launch just made with these arguments (by ``__call__``, or by :meth:`clustered`
        with ``cluster``), as a function of its tensors alone: ``run(*tensors)`` launches the
        same binary with the same grid, scalars, constexprs and options on new tensors of
        the same dtypes, through the C launcher, and returns True. It launches nothing and
        returns False where the normal call must run instead: a tensor is not 16-byte
        aligned (Triton specializes on that), the current CUDA device is another, or (plain
        launches) launch hooks are installed.

        This is for a caller that memoises launches under its own cheaper signature of the
        inputs: that signature must determine everything here but the tensors' addresses.
        None where no private launch of these arguments is cached (another Triton version,
        the interpreter, a binary that needs scratch memory) or a tensor of this call is not
        16-byte aligned."""
        if not (PRIVATE_LAUNCH and self._jit and args[0].is_cuda):
            return None
        n = self.tensors
        device = args[0].get_device()
        ptrs = [t.data_ptr() for t in args[:n]]
        direct = self._binaries.get(self._key(cluster, device, grid, args, ptrs, values, options))
        if direct is None or any(p & 15 for p in ptrs):
            return None
        grid_x, grid_y, grid_z = (grid[0] // cluster, 1, 1) if cluster else (*grid, 1, 1)[:3]
        tail = (*args[n:], *values)
        current = torch._C._cuda_getDevice

        def run(*tensors) -> bool:
            ptrs = [t.data_ptr() for t in tensors]
            for p in ptrs:
                if p & 15:
                    return False
            if current() != device or not PRIVATE_LAUNCH or not (cluster or _plain_launch()):
                return False
            self._launch(direct, grid_x, grid_y, grid_z, device, ptrs, tail)
            return True

        return run

    def compile(self, grid: tuple[int, ...], args: tuple, values: tuple, **options: Any):
        """The compiled binary (Triton's ``CompiledKernel``) that a launch with these
        arguments runs, compiled without launching (``warmup``; Triton caches it)."""
        return self.kernel.warmup(*args, **self._constexprs(args, values), grid=grid,
                                  **options)

    def _cluster_binary(self, key, grid, cluster, args, values, options) -> tuple:
        """Compile (``warmup``: no launch) what :meth:`clustered` launches for ``key``, and
        remember its private launch with ``cluster`` in place of ``num_ctas``."""
        if grid[0] % cluster:
            raise ValueError(f"{grid[0]} programs do not split into clusters of {cluster}")
        direct = _private_launch(self.compile(grid, args, values, **options))
        if direct is None:
            raise RuntimeError(f"{self.kernel.__name__}: a kernel that needs scratch "
                               "memory cannot be launched in clusters")
        direct = (*direct[:4], (direct[4][0], cluster, *direct[4][2:]))
        self._remember(key, direct)
        return direct


def interpreter_widens_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel must widen bf16 ``tl.dot`` operands to fp32 for this call: only in
    Triton's interpreter (``TRITON_INTERPRET=1``), whose 3.9 release multiplies bf16 tiles as
    their uint16 bit patterns (it stores bf16 as uint16 and calls ``np.matmul`` on them:
    errors ~1e10 on a plain 16 x 16 product). Compiled kernels never widen (the sm_90
    compile tests and the GPU tests cover their bf16 dots)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def cluster_launch_available() -> bool:
    """Whether :meth:`Launcher.clustered` can launch: a Triton whose private C launcher the
    GPU tests ran (it reads the cluster size from the packed metadata)."""
    return PRIVATE_LAUNCH


def _private_launch(binary) -> tuple | None:
    """The only use of Triton's private launch API: what calling a compiled binary's C
    launcher takes, ``(launch, function, cooperative grid, PDL, packed metadata)``, as
    ``CompiledKernel.run`` passes it on. None for a kernel that needs global or profiling
    scratch memory (``kernel[grid]`` runs those), and off the ``PRIVATE_LAUNCH`` versions."""
    if not PRIVATE_LAUNCH:
        return None
    run = binary.run
    if run.global_scratch_size or run.profile_scratch_size:
        return None
    return (run.launch, binary.function, run.launch_cooperative_grid, run.launch_pdl,
            binary.packed_metadata)


#: Triton's runtime knobs (where launch hooks are installed), if this Triton has them
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)


def _plain_launch() -> bool:
    """No launch hooks (profilers install them): the fast path calls none, so it steps
    aside while any is set."""
    runtime = _RUNTIME
    return runtime is None or not (_hooked(getattr(runtime, "launch_enter_hook", None))
                                   or _hooked(getattr(runtime, "launch_exit_hook", None)))


def _hooked(hook) -> bool:
    # a hook, or a chain of hooks (``HookChain`` in triton 3.6 and 3.9) that holds any
    return hook is not None and bool(getattr(hook, "calls", True))
