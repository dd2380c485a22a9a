"""Every Triton kernel compiles for Hopper (sm_90) on this machine, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never lowers them; this catches
code that only the real compiler rejects (layouts, dot shapes, atomics) before the GPU does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seqdeploy_ten import kernels as ten
    from seqdeploy_cfc import kernels as cfc

    def compile(fn, sig, const, num_warps, source=ASTSource):
        sig = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(source(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
        assert k.asm["cubin"], fn.__name__
        print(fn.__name__, "ok", flush=True)
        return k

    i32 = "i32"
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        compile(ten._eigen_scan_kernel,
                dict(xr_ptr=p, xi_ptr=p, nu_ptr="*fp32", th_ptr="*fp32", h0r_ptr=p, h0i_ptr=p,
                     yr_ptr=p, yi_ptr=p, carry_ptr="*fp32", flag_ptr="*i32", B=i32, T=i32, K=i32,
                     sx_b=i32, sx_t=i32, sy_b=i32, sy_t=i32, sh_b=i32),
                dict(BLOCK_T=32, BLOCK_K=32), 1)
        cfc_sig = dict(xw_ptr=p, h0_ptr=p, w_ptr=p, tau_ptr="*fp32", y_ptr=p, dt="fp32", B=i32,
                       T=i32, H=i32, sx_b=i32, sx_t=i32, sh_b=i32, sw_k=i32, sy_b=i32, sy_t=i32)
        for resident in (True, False):
            compile(cfc._cfc_scan_kernel, cfc_sig,
                    dict(BLOCK_B=16, BLOCK_H=256 if dt != "fp32" else 128, BLOCK_K=32,
                         W_RESIDENT=resident, DOT_F32=dt == "fp32", SERIES_BELOW=0.5,
                         FAST_TANH=dt != "fp32"), 8)
        split_sig = {k: v for k, v in cfc_sig.items() if k != "dt"}
        split_sig = {**{k: split_sig[k] for k in ("xw_ptr", "h0_ptr", "w_ptr", "tau_ptr", "y_ptr")},
                     "ybits_ptr": "*i16" if dt != "fp32" else "*i32", "dt": "fp32",
                     **{k: split_sig[k] for k in ("B", "T", "H", "sx_b", "sx_t", "sh_b", "sw_k",
                                                  "sy_b", "sy_t")}}
        for resident in (True, False):
            for cluster in (True, False):
                for k_split in ((1, 2) if resident else (1,)):
                    compile(cfc._cfc_split_kernel, split_sig,
                            dict(BLOCK_B=16, BLOCK_H=512, BLOCK_N=64 if dt != "fp32" else 32,
                                 BLOCK_K=32, W_RESIDENT=resident, DOT_F32=dt == "fp32",
                                 SERIES_BELOW=0.5, FAST_TANH=dt != "fp32", K_SPLIT=k_split,
                                 CLUSTER=cluster), 8)

    # the wgmma form (Gluon) of the cluster kernel, at its two default tilings
    from triton.experimental.gluon._runtime import GluonASTSource
    from seqdeploy_cfc import wgmma
    # a single step (T == 1) fails to lower when T is a constexpr, which Triton makes an
    # integer argument equal to 1 unless told not to
    assert [p.name for p in wgmma._cfc_wgmma_kernel.params
            if p.do_not_specialize] == ["T", "h_off", "bar_off"]
    for dt in ("fp16", "bf16"):
        p = "*" + dt
        sig = dict(xw_ptr=p, h0_ptr=p, w_ptr=p, tau_ptr="*fp32", y_ptr=p, dt="fp32", B=i32,
                   T=i32, H=i32, sx_b=i32, sx_t=i32, sh_b=i32, sw_k=i32, sy_b=i32, sy_t=i32,
                   h_off=i32, bar_off=i32)
        for block_h, block_n in ((256, 64), (512, 128)):
            k = compile(wgmma._cfc_wgmma_kernel, sig,
                        dict(BLOCK_B=16, BLOCK_H=block_h, BLOCK_N=block_n,
                             CLUSTER_N=block_h // block_n, SERIES_BELOW=0.5, FAST_TANH=True,
                             NUM_WARPS=block_n // 16), block_n // 16, source=GluonASTSource)
            # the host finds its shared buffers in the PTX (the first two, at offset 0)
            assert cfc.wgmma_shared_offsets(k.asm["ptx"], 16 * block_h * 2) == \
                (0, 2 * 16 * block_h * 2), (dt, block_h)
""")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok") == 3 * 9 + 4


MOE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seqdeploy_moe import kernels as moe

    def compile(fn, sig, const, num_warps, num_stages=3):
        sig = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        assert k.asm["cubin"], fn.__name__
        print(fn.__name__, "ok", flush=True)

    i32 = "i32"
    for capacity in (False, True):
        for block_t, block_e in ((64, 64),):
            compile(moe._top1_router_kernel,
                    dict(logits_ptr="*fp32", expert_ptr="*i64", gate_ptr="*fp32", T=i32, E=i32,
                         cap=i32, s_b=i32, s_t=i32),
                    dict(BLOCK_T=block_t, BLOCK_E=block_e, CAPACITY=capacity), 4)
    compile(moe._rank_kernel, dict(expert_ptr="*i64", counts_ptr="*i32", rank_ptr="*i32", N=i32,
                                   E=i32), dict(BLOCK=128, BLOCK_E=64), 4)
    compile(moe._layout_kernel, dict(expert_ptr="*i64", rank_ptr="*i32", counts_ptr="*i32",
                                     row_token_ptr="*i32", tile_expert_ptr="*i32", N=i32, E=i32,
                                     max_tiles=i32), dict(BLOCK=128, BLOCK_E=8, BLOCK_M=64,
                                                          BLOCK_TILES=64), 4)
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        cfg = moe.experts_config(8192, 8, 768, 3072, {"fp32": moe.torch.float32,
                                  "fp16": moe.torch.float16, "bf16": moe.torch.bfloat16}[dt])
        for block_m in ((64, 128) if dt == "bf16" else (64,)):
            for first in (True, False):
                compile(moe._grouped_ffn_kernel,
                        dict(a_ptr=p, row_token_ptr="*i32", tile_expert_ptr="*i32", w_ptr=p,
                             bias_ptr=p, gate_ptr="*fp32", out_ptr=p, K=i32, N=i32, E=i32,
                             s_a=i32, s_we=i32, s_wk=i32, s_be=i32, s_o=i32),
                        dict(BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                             FIRST=first, DOT_F32=dt == "fp32", WIDEN=False,
                             EVEN_K=block_m == 64),
                        8 if block_m == 128 else 4, cfg["num_stages"])
""")


def test_moe_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", MOE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok") == 2 + 2 + 4 * 2
