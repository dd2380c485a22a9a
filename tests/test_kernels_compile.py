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
""")


def compile_for_sm90(script: str) -> subprocess.CompletedProcess:
    """Run a compile script in a fresh process without the interpreter (it compiles for
    sm_90 with ``triton.compile``); skip where this Triton ships no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_kernels_compile_for_sm90():
    out = compile_for_sm90(SCRIPT)
    assert out.stdout.count(" ok") == 3


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
                                                          BLOCK_TILES=moe.LAYOUT_TILES), 4)
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
    # the padded design's tensor-descriptor form at the tiles "auto" picks for E = 8 and 64
    for dt in ("fp16", "bf16"):
        torch_dtype = {"fp16": moe.torch.float16, "bf16": moe.torch.bfloat16}[dt]
        for E in (8, 64):
            plan = moe.experts_plan(8192, E, 768, 3072, torch_dtype, "padded-tma")
            bm = plan.block_m
            for first, t in ((True, plan.first), (False, plan.second)):
                a_desc = {} if first else {"a_desc": f"tensordesc<{dt}[{bm}, {t.block_k}]>"}
                compile(moe._grouped_ffn_tma_kernel,
                        dict(a_ptr="*" + dt, **a_desc, row_token_ptr="*i32",
                             tile_expert_ptr="*i32",
                             w_desc=f"tensordesc<{dt}[{t.block_k}, {t.block_n}]>",
                             bias_ptr="*" + dt, gate_ptr="*fp32", out_ptr="*" + dt, K=i32,
                             N=i32, E=i32, s_a=i32, s_be=i32, s_o=i32),
                        dict(**({"a_desc": None} if first else {}), BLOCK_M=bm,
                             BLOCK_N=t.block_n, BLOCK_K=t.block_k, FIRST=first, WIDEN=False),
                        t.num_warps, t.num_stages)
    # the "buckets" design: its grouping kernel, and both layers of every named variant at
    # E = 8 and 64 (the tail branches compile one pipelined K loop per tile height)
    compile(moe._bucket_kernel, dict(expert_ptr="*i64", counts_ptr="*i32", slot_token_ptr="*i32",
                                     N=i32, E=i32), dict(BLOCK=128, BLOCK_E=128), 4)
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        torch_dtype = {"fp32": moe.torch.float32, "fp16": moe.torch.float16,
                       "bf16": moe.torch.bfloat16}[dt]
        plans = {moe.experts_plan(8192, E, 768, 3072, torch_dtype, v)
                 for E in (8, 64) for v in moe.EXPERTS_VARIANTS}
        for plan in sorted((q for q in plans if q.design == "buckets"), key=repr):
            for first, t in ((True, plan.first), (False, plan.second)):
                compile(moe._bucket_ffn_kernel,
                        dict(a_ptr=p, slot_token_ptr="*i32", counts_ptr="*i32", w_ptr=p,
                             bias_ptr=p, gate_ptr="*fp32", out_ptr=p, n_tokens=i32, K=i32,
                             N=i32, E=i32, s_a=i32, s_we=i32, s_wk=i32, s_be=i32, s_o=i32),
                        dict(BLOCK_M=plan.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                             BLOCK_E=128, ORDER_N=plan.order == "n", TAIL=plan.tail,
                             FIRST=first, DOT_F32=dt == "fp32", WIDEN=False, EVEN_K=True),
                        t.num_warps, t.num_stages)
        print("bucket plans", dt, len(plans), flush=True)
    # the router projection (fp16 / bf16 rows, fp32 weight, tf32 dots) at the tiles
    # triton_router_logits picks for E = 8, 64 (with the route) and 256
    for dt in ("fp16", "bf16"):
        for E, route in ((8, True), (64, True), (256, False)):
            t, block_e = moe.projection_tiles(E), max(16, triton.next_power_of_2(E))
            compile(moe._router_logits_kernel,
                    dict(u_ptr="*" + dt, w_ptr="*fp32", out_ptr="*fp32", expert_ptr="*i64",
                         gate_ptr="*fp32", N=i32, K=i32, E=i32, s_u=i32, s_wk=i32, s_we=i32),
                    dict(BLOCK_M=t.block_m, BLOCK_K=t.block_k, BLOCK_E=block_e, SPLIT=t.split,
                         ROUTE=route), t.num_warps)
""")


def test_moe_kernels_compile_for_sm90():
    out = compile_for_sm90(MOE_SCRIPT)
    buckets = out.stdout.count("_bucket_ffn_kernel ok")
    assert out.stdout.count(" ok") == 2 + 2 + 4 * 2 + 8 + 1 + buckets + 6 and buckets >= 3 * 2 * 4
    assert out.stdout.count("_grouped_ffn_tma_kernel ok") == 8
    assert out.stdout.count("_router_logits_kernel ok") == 6


CFC_SCRIPT = textwrap.dedent("""
    import dataclasses
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seqdeploy_cfc import kernels, rows, split, wgmma
    from triton.experimental.gluon._runtime import GluonASTSource

    # every design and branch the dispatch chooses on Hopper (with the wgmma design, and
    # without it as on a cluster GPU of another generation) at the seed's points and around
    # them, up to H = 512: one plan per (design, dtype, w_resident, cluster, block_n of
    # wgmma), the widest H of each where w_rec stays on chip (its shared memory); a streamed
    # w_rec at H = 256 and 32 columns per program (the same code, a quarter of the time)
    gpus = [kernels.Gpu(132, (9, 0), True, True), kernels.Gpu(132, (9, 0), True, False)]
    plans = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, T, H in [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512),
                        (19, 37, 40), (5, 9, 100), (1, 1, 256), (33, 1, 512), (8192, 1, 256),
                        (8192, 1, 512)]:
            for gpu in gpus:
                plan = kernels.choose(B, T, H, dtype, gpu)
                key = (plan.design, dtype, plan.w_resident, plan.cluster,
                       plan.block_n if plan.design == "wgmma" else 0)
                if not plan.w_resident:
                    plan = dataclasses.replace(plan, block_h=256, block_n=min(plan.block_n, 32))
                if key not in plans or plans[key].block_h < plan.block_h:
                    plans[key] = plan
    kernel = {"rows": rows._cfc_scan_kernel, "split": split._cfc_split_kernel,
              "wgmma": wgmma._cfc_wgmma_kernel}
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for (design, dtype, *_), plan in sorted(plans.items(), key=str):
        p = "*" + names[dtype]
        sig = dict(xw_ptr=p, h0_ptr=p, w_ptr=p, tau_ptr="*fp32", y_ptr=p, dt="fp32",
                   **{k: "i32" for k in ("B", "T", "H", "sx_b", "sx_t", "sh_b", "sw_k", "sy_b",
                                         "sy_t")})
        if design == "wgmma":
            sig.update(h_off="i32", bar_off="i32")
        fn = kernel[design]
        const = dict(zip(fn.arg_names[len(sig):], plan.constexprs(plan.block_h)))
        source = GluonASTSource if design == "wgmma" else ASTSource
        k = triton.compile(source(fn, {**sig, **{c: "constexpr" for c in const}},
                                  constexprs=const),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": plan.num_warps})
        assert k.asm["cubin"], plan
        if design == "wgmma":   # the host finds its shared buffers in the PTX (at offset 0)
            assert wgmma.offsets_in_ptx(k.asm["ptx"], 16 * plan.block_h * 2) == \\
                (0, 2 * 16 * plan.block_h * 2), plan
        print(design, names[dtype], plan, "ok", flush=True)
    # a single step fails to lower when T is a constexpr (triton 3.6), which Triton makes an
    # integer argument equal to 1 unless told not to
    assert [p.name for p in wgmma._cfc_wgmma_kernel.params
            if p.do_not_specialize] == ["T", "h_off", "bar_off"]
    print("designs", sorted({d for d, *_ in plans}), len(plans), flush=True)
""")


def test_cfc_kernels_compile_for_sm90():
    """Every plan ``seqdeploy_cfc.kernels.choose`` makes on Hopper compiles for sm_90: rows
    (w_rec on chip or streamed), split (clusters or a single step, on chip or streamed) and
    the Gluon wgmma form at both of its tilings, in fp32, fp16 and bf16."""
    out = compile_for_sm90(CFC_SCRIPT)
    assert "designs ['rows', 'split', 'wgmma']" in out.stdout, out.stdout[-2000:]
    assert out.stdout.count(" ok") >= 17, out.stdout[-2000:]


LAM_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seqdeploy_lam import kernels as lam

    def compile(fn, sig, const, num_warps=4):
        sig = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
        assert k.asm["cubin"], fn.__name__
        # sm_90 gives a block at most 227 KiB of shared memory
        assert k.metadata.shared <= 227 * 1024, (fn.__name__, const, k.metadata.shared)
        print(fn.__name__, const, "shared", k.metadata.shared, "ok", flush=True)

    i32 = "i32"
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        ws = p if dt != "fp32" else "*fp32"
        prec = "ieee" if dt == "fp32" else "tf32"
        for d in ((32, 64) if dt == "fp16" else (64,)):   # head dims of tiny and base
            for inverse in (("extract", "doubling") if dt == "bf16" else ("extract",)):
                compile(lam._wy_kernel,
                        dict(k_ptr=p, v_ptr=p, beta_ptr=p, gf_ptr="*fp32", gs_ptr="*fp32",
                             w_ptr=ws, u_ptr=ws, gam_ptr="*fp32", T=i32, n=i32, d=i32, dv=i32,
                             sk_b=i32, sk_t=i32, sk_h=i32, sv_b=i32, sv_t=i32, sv_h=i32, Tp=i32),
                        dict(BT=64, BD=d, BDV=d, PREC=prec,
                             INV_PREC="ieee" if dt == "fp32" else "tf32x3", INVERSE=inverse))
            compile(lam._chunk_kernel,
                    dict(q_ptr=p, k_ptr=p, w_ptr=ws, u_ptr=ws, gam_ptr="*fp32", mix_ptr=p,
                         s0_ptr="*fp32", o_ptr=p, sT_ptr="*fp32", T=i32, n=i32, d=i32, dv=i32,
                         sq_b=i32, sq_t=i32, sq_h=i32, sk_b=i32, sk_t=i32, sk_h=i32, so_b=i32,
                         so_t=i32, so_h=i32, Tp=i32),
                    dict(BT=64, BD=d, BV=32, PREC=prec))
            # the solve form: the default (row loads, input-dtype K K^T, fp32 inverse), and
            # for bf16 the extract and doubling forms with the inverse stored in bf16
            solve_forms = [("rows", dt != "fp32", "*fp32")]
            if dt == "bf16":
                solve_forms += [("extract", True, p), ("doubling", False, p)]
            for inverse, kk_input, tinv in solve_forms:
                compile(lam._solve_kernel,
                        dict(k_ptr=p, beta_ptr=p, gf_ptr="*fp32", gs_ptr="*fp32",
                             tinv_ptr=tinv, gam_ptr="*fp32", T=i32, n=i32, d=i32, sk_b=i32,
                             sk_t=i32, sk_h=i32, Tp=i32, NT=i32),
                        dict(BT=64, BD=d, PREC=prec, INV_PREC="ieee" if dt == "fp32" else "tf32x3",
                             INVERSE=inverse, KK_INPUT=kk_input), num_warps=2)
            # the solve-apply form (inverse and W, U in one program; not the default): row
            # loads on 2 warps, and for bf16 also extract on 4 warps and doubling on widened keys
            fused_forms = [("rows", dt != "fp32", 2)]
            if dt == "bf16":
                fused_forms += [("extract", True, 4), ("doubling", False, 2)]
            for inverse, kk_input, warps in fused_forms:
                compile(lam._solve_apply_kernel,
                        dict(k_ptr=p, v_ptr=p, beta_ptr=p, gf_ptr="*fp32", gs_ptr="*fp32",
                             scratch_ptr="*fp32", w_ptr=ws, u_ptr=ws, gam_ptr="*fp32", T=i32, n=i32,
                             d=i32, dv=i32, sk_b=i32, sk_t=i32, sk_h=i32, sv_b=i32, sv_t=i32,
                             sv_h=i32, Tp=i32, NT=i32),
                        dict(BT=64, BD=d, BDV=d, PREC=prec,
                             INV_PREC="ieee" if dt == "fp32" else "tf32x3", INVERSE=inverse,
                             KK_INPUT=kk_input), num_warps=warps)
            for tinv in (("*fp32", p) if dt == "bf16" else ("*fp32",)):
                compile(lam._apply_kernel,
                        dict(k_ptr=p, v_ptr=p, beta_ptr=p, tinv_ptr=tinv, gam_ptr="*fp32",
                             w_ptr=ws, u_ptr=ws, T=i32, n=i32, d=i32, dv=i32, sk_b=i32, sk_t=i32,
                             sk_h=i32, sv_b=i32, sv_t=i32, sv_h=i32, Tp=i32, NT=i32),
                        dict(BT=64, BD=d, BDV=d, PREC=prec))
            compile(lam._recurrent_kernel,
                    dict(q_ptr=p, k_ptr=p, v_ptr=p, beta_ptr=p, gf_ptr="*fp32", gs_ptr="*fp32",
                         mix_ptr=p, s0_ptr="*fp32", o_ptr=p, sT_ptr="*fp32", T=i32, n=i32,
                         d=i32, dv=i32, sq_b=i32, sq_t=i32, sq_h=i32, sk_b=i32, sk_t=i32,
                         sk_h=i32, sv_b=i32, sv_t=i32, sv_h=i32, so_b=i32, so_t=i32, so_h=i32),
                    dict(BD=d, BV=32))
            # the split design: the default plan's tiles, and for bf16 the benchmark's sweep
            sweep = dt == "bf16" and d == 64
            for ws_h, half in ((ws, False), ("*fp32", False), (ws, True)) if sweep else ((ws, False),):
                for bv, mems in (((16, 1), (32, 1), (64, 1), (32, 2)) if sweep else ((32, 1),)):
                    compile(lam._state_kernel,
                            dict(k_ptr=p, w_ptr=ws_h, u_ptr=ws_h, gam_ptr="*fp32", s0_ptr="*fp32",
                                 h_ptr=ws_h, sT_ptr="*fp32", T=i32, n=i32, d=i32, dv=i32, sk_b=i32,
                                 sk_t=i32, sk_h=i32, Tp=i32, NT=i32),
                            dict(BT=64, BD=d, BV=bv, MEMS=mems, PREC=prec, HALF_DOTS=half))
                for bv in ((32, 64) if sweep else (32,)):
                    compile(lam._output_kernel,
                            dict(q_ptr=p, k_ptr=p, u_ptr=ws_h, gam_ptr="*fp32", h_ptr=ws_h,
                                 mix_ptr=p, o_ptr=p, T=i32, n=i32, d=i32, dv=i32, sq_b=i32,
                                 sq_t=i32, sq_h=i32, sk_b=i32, sk_t=i32, sk_h=i32, so_b=i32,
                                 so_t=i32, so_h=i32, Tp=i32, NT=i32),
                            dict(BT=64, BD=d, BV=bv, PREC=prec, HALF_DOTS=half))
""")


def test_lam_kernels_compile_for_sm90():
    """The lam kernels (WY prep in its three forms, fused chunk recurrence, split state and
    output kernels, recurrent step): every dtype at d = 64 (base), fp16 also at d = 32 (tiny);
    bf16 at d = 64 also at every split tiling the benchmark sweeps (workspace bf16 and fp32,
    and bf16 dot operands), the solve and solve-apply forms' three ways to the diagonal blocks
    (row loads on 2 warps as the default) and the bf16 inverse, and the fused WY kernel's
    doubling inverse. Each within sm_90's shared memory."""
    out = compile_for_sm90(LAM_SCRIPT)
    # 4 (dtype, d) cases x 8 kernels, plus bf16's 3 (workspace, dots) x (4 state + 2 output) - 2,
    # plus bf16's two more solve forms, its WY kernel with doubling, its apply kernel on a
    # bf16 inverse and its two more solve-apply forms
    assert out.stdout.count(" ok") == 4 * 8 + 3 * 6 - 2 + 4 + 2, out.stdout[-2000:]
    assert out.stdout.count("_solve_apply_kernel") == 4 + 2, out.stdout[-2000:]
