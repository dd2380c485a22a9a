"""Compile plugins' Triton kernels ahead of time to PTX, for the ORT op library.

Run as ``python -m seqdeploy.ort_native.aot JOBS.json OUT_DIR`` by :mod:`.build` (a separate
process: the caller may run Triton's interpreter, ``TRITON_INTERPRET=1``, which replaces the
kernels' ``JITFunction``). Each job names a kernel (``module:function``), its runtime
signature, constexprs, ``num_warps`` and the GPU architecture; the job's PTX is written to
``OUT_DIR/<name>.sm<arch>.ptx`` and its launch facts to ``OUT_DIR/kernels.json``.

PTX, not cubins: ptxas takes minutes on the larger tiles on a 2-core CI machine, while the
driver JIT-compiles a module once per process (and caches it on disk). The PTX ISA version is
pinned to 8.0 (CUDA 12.0), so the PTX of a newer Triton still loads into older drivers. No
specialisation hints are given, so every runtime argument stays a kernel parameter (an int
equal to 1 is not folded, no divisibility is assumed), in signature order, followed by the
parameters Triton appends (global and profile scratch pointers from Triton 3.3 on), which the
library passes as null; a kernel that needs scratch memory is refused here.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys

#: PTX ISA 8.0 (CUDA 12.0): the oldest that targets sm_90a
PTX_VERSION = 80

_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)


def entry_match(ptx: str) -> re.Match:
    """The PTX's single ``.entry``: group 1 its name, group 2 its parameter list; ValueError
    unless there is exactly one."""
    found = list(_ENTRY.finditer(ptx))
    if len(found) != 1:
        raise ValueError(f"expected one .entry in the PTX, found {len(found)}")
    return found[0]


def entry_params(ptx: str) -> tuple[str, int]:
    """``(name, parameter count)`` of the PTX's single ``.entry``."""
    m = entry_match(ptx)
    return m.group(1), m.group(2).count(".param")


def compile_ptx(fn, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int):
    """Triton's compiled kernel of ``fn`` for ``sm_<arch>`` (its PTX in ``asm["ptx"]``), with
    every runtime argument kept a parameter (no specialisation hints) and PTX ISA
    :data:`PTX_VERSION`. ValueError where a plain driver launch cannot run it: the kernel
    needs Triton scratch memory, a cluster or a cooperative launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "ptx_version": PTX_VERSION})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise ValueError("the kernel needs Triton scratch memory")
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False):
        raise ValueError("cluster or cooperative launches are not supported")
    return compiled


def compile_job(job: dict) -> tuple[str, dict]:
    module, attr = job["kernel"].split(":")
    fn = getattr(importlib.import_module(module), attr)
    try:
        compiled = compile_ptx(fn, job["signature"], job["constexprs"], job["arch"],
                               job["num_warps"])
    except ValueError as exc:
        raise SystemExit(f"{job['name']}: {exc}, which the ORT library does not provide")
    ptx = compiled.asm["ptx"]
    entry, n_params = entry_params(ptx)
    md = compiled.metadata
    n_args = len(job["signature"])
    if n_params < n_args:
        raise SystemExit(f"{job['name']}: PTX entry has {n_params} parameters for {n_args} "
                         "arguments (a specialised argument was dropped)")
    return ptx, {"name": job["name"], "arch": job["arch"], "entry": entry,
                 "num_warps": md.num_warps, "shared": md.shared, "n_args": n_args,
                 "n_params": n_params}


def ptx_only(*args):
    """Triton's stage inspection hook: the binary stage keeps the PTX instead of running
    ptxas (see the module docstring). Called with no arguments, it returns its cache key."""
    if not args:
        return "seqdeploy-ptx-only", "seqdeploy-ptx-only"
    stages = args[1]
    stages["cubin"] = lambda src, metadata: src.encode()


def main(jobs_path: str, out_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs

    knobs.runtime.add_stages_inspection_hook = ptx_only
    with open(jobs_path) as f:
        jobs = json.load(f)
    facts = []
    for job in jobs:
        ptx, fact = compile_job(job)
        path = os.path.join(out_dir, f"{job['name']}.sm{job['arch']}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        facts.append({**fact, "ptx": path})
        print(f"compiled {job['name']} sm_{job['arch']}", flush=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(facts, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
