"""linoss_scan on the GPU, in one run: every kernel design vs the seed's formulation (a step
loop of ``x @ A.T + Bu_t`` with a block-diagonal A of 2x2 blocks) vs PyTorch's compiled
``associative_scan`` of the same recurrence vs the copy-bandwidth ceiling (``y.copy_(x)`` of
the same bytes), all measured here, in this run, at every size.

    python benchmarks/dlinoss_scan.py [--dtype fp32] [--budget-s 95] [--sweep]
        [--no-seed-loop | --seed-loop-all] [--small-only] [--json out.json]

Sizes (``SIZES``): the seed's point B=32 T=1024 P=128 (67 MB in fp32) and three shapes that
move >= 1 GB (2.1 GB each in fp32): many rows (B=256 T=4096 P=128), a long T with few rows
(B=32 T=32768 P=128) and wide P (B=32 T=4096 P=1024). Per size, one line per variant:
``ms`` (median of CUDA-graph replays), ``%copy`` (the copy's time for the op's bytes over
the variant's: 100% is the copy ceiling), ``x_comp`` (compiled scan's ms over the
variant's), ``rel-L2`` (x_re, x_im of the first two batch rows against the float64 loop,
outputs NaN-poisoned before the variant runs). ``*`` marks the default plan (``choose``).

Order and budget: per size the copy, each design's default plan (with the float64 check)
and, at the issue's two sizes, the compiled scan (a torch.compile per shape; the last
compile's time estimates the next) and the seed loop (eager); then the compiled scan at the
other sizes, the ``EXTRA`` tiles (``--sweep``: and ``SWEEP``) at every size, and the seed
loop at the other sizes (``--seed-loop-all``). A stage that would end past ``--budget-s`` is
skipped and says so, and the JSON is rewritten after every stage, so a run cut short still
reports what it measured. ``--smoke`` runs it all on the CPU at tiny sizes
(``TRITON_INTERPRET=1``; no compiled scan) to check the script without a GPU.

Bytes moved by the op: b_re, b_im read once, x_re, x_im written once (4 B*T*P elements) plus
the [B, P, 4] fp32 states. The copy reads and writes the same 4 B*T*P elements' bytes.
Targets (issue 16): >= 3x the compiled scan at the small size and at >= 1 GB, and >= 80% of
copy bandwidth at >= 1 GB.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from seqdeploy.bench import time_fn
from seqdeploy_dlinoss.kernels import DESIGNS, LaunchPlan, choose, default_plan, triton_linoss_scan
from seqdeploy_dlinoss.ops import naive_linoss_scan, stable_band, transition

SMALL = (32, 1024, 128)
SMOKE = [(1, 20, 3), (3, 40, 9)]   # B=3 > the reference rows: outputs are cut to them
SIZES = [SMALL, (256, 4096, 128), (32, 32768, 128), (32, 4096, 1024)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: extra plans timed at every size besides each design's default: (design, BLOCK_T,
#: BLOCK_P, num_warps[, look-back window]); ``--sweep`` adds ``SWEEP``
EXTRA = [("chunk_loop", 32, 32, 1, 1), ("chunk_loop", 32, 32, 1, 8), ("chunk_loop", 16, 32, 1, 4),
         ("chunk_loop", 64, 32, 1, 4), ("chunk_loop", 32, 64, 2, 4)]
SWEEP = [("chunk", 16, 64, 2), ("chunk", 32, 32, 2), ("rows", 16, 64, 2), ("rows", 8, 32, 1),
         ("chunk_loop", 8, 32, 1, 8), ("chunk_loop", 32, 128, 4, 8), ("chunk_loop", 16, 64, 2, 8),
         ("chunk_loop", 32, 32, 2, 8), ("chunk_loop", 16, 32, 1, 16), ("chunk_loop", 64, 32, 1, 1)]


def make(B, T, P, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    b_re = torch.randn(B, T, P, device=device, generator=g).to(dtype)
    b_im = torch.randn(B, T, P, device=device, generator=g).to(dtype)
    dt = torch.sigmoid(torch.empty(P, device=device).uniform_(-2.0, 0.0, generator=g))
    G = torch.rand(P, device=device, generator=g)
    lo, hi = stable_band(G, dt)
    A = torch.clamp(torch.rand(P, device=device, generator=g), lo, hi)
    state0 = torch.randn(B, P, 4, device=device, generator=g)
    return b_re, b_im, A, G, dt, state0


def seed_step_loop(b_re, b_im, A, G, dt, state0):
    """The seed's formulation: state [2B, 2P] (real rows then imaginary rows, (z, x) pairs
    interleaved), ``state = state @ A_big.T + Bu_t`` per step with A_big block-diagonal."""
    B, T, P = b_re.shape
    m00, m01, m10, m11, c0, c1 = transition(A, G, dt)
    blocks = torch.stack([torch.stack([m00, m01], -1), torch.stack([m10, m11], -1)], -2)
    A_big = torch.block_diag(*blocks)                                   # [2P, 2P]
    b = torch.cat([b_re, b_im], 0).float()                              # [2B, T, P]
    Bu = torch.stack([c0 * b, c1 * b], -1).reshape(2 * B, T, 2 * P)     # interleaved (z, x)
    s = torch.cat([torch.stack([state0[..., 0], state0[..., 2]], -1),      # (z_re, x_re)
                   torch.stack([state0[..., 1], state0[..., 3]], -1)],     # (z_im, x_im)
                  0).reshape(2 * B, 2 * P)
    xs = []
    for t in range(T):
        s = s @ A_big.T + Bu[:, t]
        xs.append(s[:, 1::2])
    x = torch.stack(xs, 1).to(b_re.dtype)
    return x[:B], x[B:], s


def _compose(left, right):
    a00, a01, a10, a11, az_r, ax_r, az_i, ax_i = left
    b00, b01, b10, b11, bz_r, bx_r, bz_i, bx_i = right
    return (b00 * a00 + b01 * a10, b00 * a01 + b01 * a11,
            b10 * a00 + b11 * a10, b10 * a01 + b11 * a11,
            b00 * az_r + b01 * ax_r + bz_r, b10 * az_r + b11 * ax_r + bx_r,
            b00 * az_i + b01 * ax_i + bz_i, b10 * az_i + b11 * ax_i + bx_i)


def torch_parallel_scan(b_re, b_im, A, G, dt, state0, combine_mode="pointwise"):
    """The same recurrence as PyTorch's own parallel scan (fp32), then the state applied."""
    from torch._higher_order_ops.associative_scan import associative_scan

    m00, m01, m10, m11, c0, c1 = transition(A, G, dt)
    br, bi = b_re.float(), b_im.float()
    ms = [m.expand_as(br) for m in (m00, m01, m10, m11)]
    p00, p01, p10, p11, _, s_xr, _, s_xi = associative_scan(
        _compose, (*ms, c0 * br, c1 * br, c0 * bi, c1 * bi), dim=1, combine_mode=combine_mode)
    z_r, z_i, x_r, x_i = (state0[..., k][:, None] for k in range(4))
    x_re = s_xr + p10 * z_r + p11 * x_r
    x_im = s_xi + p10 * z_i + p11 * x_i
    return x_re.to(b_re.dtype), x_im.to(b_re.dtype)


def rel_err(out, ref):
    """rel-L2 of outputs ``(x_re, x_im)`` against the float64 reference, which holds only the
    first batch rows (:func:`float64_reference`): the outputs are cut to those rows."""
    rows = ref[0].shape[0]
    x = torch.cat([out[0][:rows].double().flatten(), out[1][:rows].double().flatten()]).cpu()
    r = torch.cat([ref[0].flatten(), ref[1].flatten()])
    return float((x - r).norm() / r.norm())


def float64_reference(args, rows=2):
    """The float64 loop on the first ``rows`` batch rows (on the host: slow, once a size)."""
    sub = [a[:rows].cpu() if a.dim() == 3 else a.cpu() for a in args]
    return naive_linoss_scan(*sub)


def name_of(plan: LaunchPlan, B, T, P) -> str:
    """``design`` for a design's default plan, else ``design/tBLOCK_T pBLOCK_P wWARPS [lWINDOW]``."""
    if plan == default_plan(plan.design, B, T, P):
        return plan.design
    name = f"{plan.design}/t{plan.block_t}p{plan.block_p}w{plan.num_warps}"
    return name + (f"l{plan.window}" if plan.design == "chunk_loop" else "")


def plans(B, T, P, extra: bool, sweep: bool = False) -> list[LaunchPlan]:
    """The default ``choose`` plan and each design's default plan; with ``extra`` also
    ``EXTRA`` (and with ``sweep`` ``SWEEP``) where their tile fits T."""
    out = [choose(B, T, P), *[default_plan(d, B, T, P) for d in DESIGNS]]
    if extra:
        out += [LaunchPlan(*tile) for tile in EXTRA + (SWEEP if sweep else []) if tile[1] <= T]
    seen, unique = set(), []
    for plan in out:
        if plan not in seen:
            seen.add(plan)
            unique.append(plan)
    return unique


class Budget:
    """Wall-clock budget of the whole run: ``fits(s)`` says whether a stage of about ``s``
    seconds ends before it runs out."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, s: float) -> bool:
        return self.left() > s


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sweep", action="store_true", help="also time the SWEEP tiles")
    parser.add_argument("--no-seed-loop", action="store_true", help="skip the seed loop")
    parser.add_argument("--seed-loop-all", action="store_true",
                        help="time the seed loop at every size (default: the issue's two)")
    parser.add_argument("--small-only", action="store_true", help=f"only {SMALL}")
    parser.add_argument("--budget-s", type=float, default=95.0,
                        help="skip stages that would end later than this (seconds)")
    parser.add_argument("--json", help="write results here (after every stage)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter (checks this "
                             "script runs end to end without a GPU; times mean nothing)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    dtype = DTYPES[args.dtype]
    dev = "cpu" if args.smoke else "cuda"
    gpu = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"GPU {gpu}  dtype {args.dtype}  torch {torch.__version__}"
          f"  triton {__import__('triton').__version__}", flush=True)
    sizes = SMOKE if args.smoke else [SMALL] if args.small_only else SIZES
    if args.smoke:      # one interpreted call each (time_fn's rounds of 10 take minutes)
        def timed(fn, **_):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        def timed(fn, **kw):
            return time_fn(fn, dev, cuda_graph=True, **kw).median_ms
    sync = (lambda: None) if args.smoke else torch.cuda.synchronize  # noqa: E731
    results = []

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"gpu": gpu, "dtype": args.dtype,
                           "sizes": results}, fh, indent=2)

    refs: dict[tuple, tuple] = {}
    compiled = torch.compile(torch_parallel_scan, fullgraph=True, dynamic=False)
    state = {"compile_s": 20.0}     # a guess until the first compile is timed

    def inputs(row):
        B, T, P = row["B"], row["T"], row["P"]
        a = make(B, T, P, dtype, dev)
        if (B, T, P) not in refs:
            refs[(B, T, P)] = float64_reference(a)
        return a

    def variants(row, a, tiles):
        """Time ``tiles`` (plans) on inputs ``a``, NaN-poisoned outputs checked first."""
        B, T, P = row["B"], row["T"], row["P"]
        elem, default = a[0].element_size(), choose(B, T, P)
        out = (torch.empty_like(a[0]), torch.empty_like(a[0]), torch.empty(B, P, 4, device=dev))
        for plan in tiles:
            name = name_of(plan, B, T, P)
            if name in row["variants"]:
                continue
            if not budget.fits(5.0):
                print(f"  B={B} T={T} P={P} {name}: skipped (budget)", flush=True)
                continue
            try:
                for o in out:
                    o.fill_(math.nan)
                triton_linoss_scan(*a, out=out, plan=plan)
                sync()
                err = rel_err(out, refs[(B, T, P)])
                ms = timed(lambda: triton_linoss_scan(*a, out=out, plan=plan), budget_s=0.5)
            except Exception as exc:  # noqa: BLE001 - report a variant that fails, go on
                print(f"  B={B} T={T} P={P} {name}: failed: {type(exc).__name__}: "
                      f"{str(exc)[:300]}", flush=True)
                row["variants"][name] = {"plan": dataclasses.asdict(plan), "error": str(exc)[:300]}
                continue
            pct = 100 * row["copy_ms"] / ms * row["bytes"] / (4 * B * T * P * elem)
            row["variants"][name] = {"plan": dataclasses.asdict(plan), "ms": ms, "pct_copy": pct,
                                     "rel_l2": err, "default": plan == default}
            if "compiled_ms" in row:
                row["variants"][name]["x_vs_compiled"] = row["compiled_ms"] / ms
            print(f"  B={B} T={T} P={P} {'*' if plan == default else ' '}{name:<26} {ms:8.4f} ms "
                  f"{pct:5.0f}% of copy  rel-L2 {err:.1e}", flush=True)

    def compiled_scan(row, a):
        B, T, P = row["B"], row["T"], row["P"]
        if "compiled_tried" in row:
            return
        row["compiled_tried"] = True
        if not budget.fits(state["compile_s"] + 5.0):
            print(f"  B={B} T={T} P={P}: compiled scan skipped (budget: {budget.left():.0f} s "
                  f"left, a compile took {state['compile_s']:.0f} s)", flush=True)
            return
        t0 = time.perf_counter()
        c_out = compiled(*a)
        sync()
        state["compile_s"] = time.perf_counter() - t0
        row["compiled_err"] = rel_err(c_out, refs[(B, T, P)])
        del c_out
        row["compiled_ms"] = timed(lambda: compiled(*a), budget_s=1.0)
        for v in row["variants"].values():
            if "ms" in v:
                v["x_vs_compiled"] = row["compiled_ms"] / v["ms"]
        print(f"  B={B} T={T} P={P}: compiled scan {row['compiled_ms']:.4f} ms (compile "
              f"{state['compile_s']:.0f} s, rel-L2 {row['compiled_err']:.1e})", flush=True)

    def seed_loop(row, a):
        B, T, P = row["B"], row["T"], row["P"]
        if "seed_tried" in row:
            return
        row["seed_tried"] = True
        if not budget.fits(5.0 + T * 2e-3):
            print(f"  B={B} T={T} P={P}: seed loop skipped (budget)", flush=True)
            return
        s_out = seed_step_loop(*a)
        row["seed_err"] = rel_err(s_out, refs[(B, T, P)])
        del s_out
        row["seed_loop_ms"] = time_fn(lambda: seed_step_loop(*a), dev, min_repeats=3,
                                      max_repeats=5, warmup=1, budget_s=3.0).median_ms \
            if not args.smoke else timed(lambda: seed_step_loop(*a))
        print(f"  B={B} T={T} P={P}: seed loop {row['seed_loop_ms']:.2f} ms", flush=True)

    # 1. per size: the copy ceiling and each design's default plan (and the default)
    for B, T, P in sizes:
        elem = torch.empty((), dtype=dtype).element_size()
        row = {"B": B, "T": T, "P": P, "dtype": args.dtype,
               "bytes": 4 * B * T * P * elem + 2 * B * P * 4 * 4,
               "default": dataclasses.asdict(choose(B, T, P)), "variants": {}}
        src = torch.empty(2 * B * T * P * elem, dtype=torch.uint8, device=dev).random_()
        dst = torch.empty_like(src)
        row["copy_ms"] = timed(lambda: dst.copy_(src))
        row["copy_gb_s"] = 4 * B * T * P * elem / (row["copy_ms"] * 1e6)
        del src, dst
        print(f"B={B} T={T} P={P} ({row['bytes'] / 1e6:.0f} MB): copy {row['copy_ms']:.4f} ms "
              f"({row['copy_gb_s']:.0f} GB/s)", flush=True)
        results.append(row)
        a = inputs(row)
        variants(row, a, plans(B, T, P, extra=False))
        if len(results) <= 2 and not args.smoke:   # the two sizes: their baselines first
            compiled_scan(row, a)
            if not args.no_seed_loop:
                seed_loop(row, a)
        save()
        del a
        if not args.smoke:
            torch.cuda.empty_cache()
    # 2. the compiled scan (3. extra tiles, 4. the seed loop) per size, within the budget
    stages = ([] if args.smoke else [("compiled", compiled_scan)]) + \
        [("extra", lambda row, a: variants(row, a, plans(row["B"], row["T"], row["P"],
                                                         extra=True, sweep=args.sweep)))]
    if not args.no_seed_loop:
        stages.append(("seed", lambda row, a: seed_loop(row, a)
                       if any(row is r for r in results[:2]) or args.seed_loop_all
                       else None))
    for _, stage in stages:
        for row in results:
            a = inputs(row)
            stage(row, a)
            save()
            del a
            if not args.smoke:
                torch.cuda.empty_cache()
    report(results)


def report(results):
    nan = float("nan")
    print("\nGPU times are medians of CUDA-graph replays (the seed loop: eager, few repeats); "
          "* = default plan")
    print(f"{'B':>4} {'T':>6} {'P':>5} {'MB':>5} {'variant':<27} {'ms':>8} {'%copy':>6} "
          f"{'x_comp':>6} {'x_seed':>7} {'rel-L2':>8}")
    for r in results:
        print(f"{r['B']:>4} {r['T']:>6} {r['P']:>5} {r['bytes'] / 1e6:>5.0f} {'copy':<27} "
              f"{r['copy_ms']:>8.4f} {100:>5.0f}%")
        comp = r.get("compiled_ms", nan)
        print(f"{'':>23} {'compiled associative_scan':<27} {comp:>8.4f} "
              f"{100 * r['copy_ms'] / comp:>5.0f}% {1.0:>6.1f} {'':>7} "
              f"{r.get('compiled_err', nan):>8.1e}")
        if "seed_loop_ms" in r:
            print(f"{'':>23} {'seed step loop':<27} {r['seed_loop_ms']:>8.2f}  "
                  f"{'':>5} {comp / r['seed_loop_ms']:>6.2f} {1.0:>7.0f} {r['seed_err']:>8.1e}")
        for name, v in sorted(r["variants"].items(), key=lambda kv: kv[1].get("ms", 1e9)):
            if "ms" not in v:
                print(f"{'':>23} {name:<27} failed")
                continue
            seed = r.get("seed_loop_ms", nan) / v["ms"]
            print(f"{'':>23} {('*' if v['default'] else '') + name:<27} {v['ms']:>8.4f} "
                  f"{v['pct_copy']:>5.0f}% {v.get('x_vs_compiled', nan):>6.2f} {seed:>7.0f} "
                  f"{v['rel_l2']:>8.1e}")
    print("\nper size: default and fastest variant (targets: >= 3x compiled everywhere, "
          ">= 80% of copy at >= 1 GB)")
    for r in results:
        ok = {k: v for k, v in r["variants"].items() if "ms" in v}
        if not ok:
            continue
        best = min(ok, key=lambda k: ok[k]["ms"])
        dflt = next((k for k, v in ok.items() if v["default"]), None)
        for label, k in (("default", dflt), ("fastest", best)):
            if k is None:
                continue
            v = ok[k]
            print(f"  B={r['B']} T={r['T']} P={r['P']} {label} {k}: {v['ms']:.4f} ms, "
                  f"{v['pct_copy']:.0f}% of copy, {v.get('x_vs_compiled', nan):.2f}x compiled")


if __name__ == "__main__":
    main()
