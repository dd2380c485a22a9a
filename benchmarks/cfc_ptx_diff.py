"""CPU-only check of the cfc refactor (issue 21): the sm_90 PTX of each kernel design before
and after, at the tilings the dispatch uses. No GPU needed.

    python benchmarks/cfc_ptx_diff.py BEFORE_DIR

BEFORE_DIR is an extracted tree from before the refactor (``git archive e4bab40``); its
``plugins/seqdeploy_cfc`` is imported under another name. Per design and dtype it prints
``identical`` (the same PTX, debug sections and line info aside), ``same ops`` (the same
instructions up to register numbering and order: the split kernel lost its unused
integer-view parameter) or ``differs`` (expected only for the single-step split, whose
flag-in-data code is gone).
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402


def import_before(before_dir: str):
    """The before tree's plugin as package ``cfc_before`` (its own imports renamed)."""
    root = tempfile.mkdtemp()
    dst = os.path.join(root, "cfc_before")
    shutil.copytree(os.path.join(before_dir, "plugins", "seqdeploy_cfc"), dst)
    for name in os.listdir(dst):
        if name.endswith(".py"):
            path = os.path.join(dst, name)
            text = open(path).read().replace("seqdeploy_cfc.", "cfc_before.")
            text = text.replace("from seqdeploy_cfc import", "from cfc_before import")
            open(path, "w").write(text)
    sys.path.insert(0, root)
    import cfc_before.kernels
    import cfc_before.wgmma

    return cfc_before.kernels, cfc_before.wgmma


def ptx(fn, sig, const, num_warps, source=ASTSource, drop_param=None) -> list[str]:
    """The kernel's PTX for sm_90, without debug sections, line info and comments;
    ``drop_param``: a parameter index removed (the later ones renumbered)."""
    k = triton.compile(source(fn, {**sig, **{c: "constexpr" for c in const}}, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    out = []
    for line in k.asm["ptx"].splitlines():
        s = line.strip()
        if s.startswith(".section") and "debug" in s:
            break
        if not s or s.startswith((".loc", ".file", "//", "$L__")):
            continue
        if drop_param is not None and (m := re.search(r"_param_(\d+)", s)):
            n = int(m.group(1))
            if n == drop_param and s.startswith(".param"):
                continue
            if n > drop_param:
                s = s.replace(f"_param_{n}", f"_param_{n - 1}")
        out.append(s.rstrip(","))
    return out


def verdict(a: list[str], b: list[str]) -> str:
    if a == b:
        return "identical"
    strip = lambda s: re.sub(r"\$L__\w+", "L", re.sub(r"%[a-z]+\d+", "%r", s))  # noqa: E731
    same = collections.Counter(map(strip, a)) == collections.Counter(map(strip, b))
    return f"{'same ops' if same else 'differs'} ({len(a)} vs {len(b)} lines)"


def main():
    old, old_wgmma = import_before(sys.argv[1])
    from seqdeploy_cfc import rows, split, wgmma

    for dt in ("fp32", "fp16", "bf16"):
        p, half = "*" + dt, dt != "fp32"
        sig = dict(xw_ptr=p, h0_ptr=p, w_ptr=p, tau_ptr="*fp32", y_ptr=p, dt="fp32",
                   **{k: "i32" for k in ("B", "T", "H", "sx_b", "sx_t", "sh_b", "sw_k", "sy_b",
                                         "sy_t")})
        for resident, block_h in ((True, 256 if half else 128), (False, 256)):
            c = dict(BLOCK_B=16, BLOCK_H=block_h, BLOCK_K=32, W_RESIDENT=resident,
                     DOT_F32=not half, SERIES_BELOW=0.5, FAST_TANH=half)
            a, b = ptx(old._cfc_scan_kernel, sig, c, 8), ptx(rows._cfc_scan_kernel, sig, c, 8)
            print("rows", dt, "resident" if resident else "streamed", verdict(a, b), flush=True)
        old_sig = {**dict(list(sig.items())[:5]), "ybits_ptr": "*i16" if half else "*i32",
                   **dict(list(sig.items())[5:])}
        cases = [(True, 256, 32, True, "cluster"), (True, 256, 32, False, "single step")]
        if not half:   # the fp32 default at H = 512
            cases.append((False, 512, 64, True, "cluster, streamed"))
        for resident, block_h, block_n, cluster, label in cases:
            c = dict(BLOCK_B=16, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_K=32,
                     W_RESIDENT=resident, DOT_F32=not half, SERIES_BELOW=0.5, FAST_TANH=half)
            a = ptx(old._cfc_split_kernel, old_sig, {**c, "K_SPLIT": 1, "CLUSTER": cluster}, 4,
                    drop_param=5)
            b = ptx(split._cfc_split_kernel, sig, {**c, "CLUSTER": cluster}, 4)
            print("split", dt, label, verdict(a, b), flush=True)
        if half:
            wsig = {**sig, "h_off": "i32", "bar_off": "i32"}
            for block_h, block_n in ((256, 64), (512, 128)):
                c = dict(BLOCK_B=16, BLOCK_H=block_h, BLOCK_N=block_n,
                         CLUSTER_N=block_h // block_n, SERIES_BELOW=0.5, FAST_TANH=True,
                         NUM_WARPS=block_n // 16)
                a = ptx(old_wgmma._cfc_wgmma_kernel, wsig, c, block_n // 16, GluonASTSource)
                b = ptx(wgmma._cfc_wgmma_kernel, wsig, c, block_n // 16, GluonASTSource)
                print("wgmma", dt, f"H={block_h}", verdict(a, b), flush=True)


if __name__ == "__main__":
    main()
