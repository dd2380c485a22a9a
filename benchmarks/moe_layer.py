"""The whole MoE layer on the GPU against the alternatives, in one run (bf16 by default).

At N tokens, d, f and each E, times (``triton.testing.do_bench``, median ms):

- ``router``: ``seqdeploy::top1_router`` alone on ``[1, N, E]`` fp32 logits (capacity off, the
  inference default; and with capacity factor 1.25, the router over the row's tiles, then
  the tiles' per-expert counts, their cumsum and the drop);
- ``moe layer``: router projection and ``top1_router`` as the model runs them
  (``router.route_top1``: one launch on CUDA) + ``moe_experts`` (grouping, both grouped
  GEMMs, gate, scatter): what one Switch FFN costs; eager, and replayed from a CUDA graph
  (the GPU's time without the host's launch gaps; the torch engine replays graphs for
  streaming steps, a caller may capture the whole model);
- ``mask loop``: the seed's ``for e in range(E): m = expert == e; y[m] = FFN_e(x[m])``;
- ``grouped_mm``: ``torch._grouped_mm`` over expert-sorted tokens (argsort, gather, two grouped
  GEMMs with bias + GELU in torch, scatter), where torch has it for this device and dtype;
- ``dense floor``: one dense FFN (d -> f -> d, bias, GELU) over the same N tokens: the work a
  top-1 layer must do.

Prints the ratios to the floor (target: the MoE layer at most 1.5x at every E, the router
under 20 us; both judged on the CUDA-graph times, the GPU's time without host launch gaps)
and writes JSON with ``--json``. ``--block-m`` times the experts op at other row tiles too
(the default picks one from the mean group size).

Then, per plan of the experts op (``kernels.ExpertsPlan``: the named variants of
``kernels.EXPERTS_VARIANTS``, the first design ``padded`` among them, and a sweep around them
unless ``--no-sweep``), a row with the experts op alone and the whole layer on that plan
(each with its ratio to the floor) and its max-abs and rel-L2 error against the op's fp32
reference (``reference_moe_experts``): a wrong plan shows there, not only in its time. A plan
that fails is reported and the run goes on; past its share of ``--budget-s`` the rest of an
E's plans are skipped, and say so (the run is meant for one unattended device call). ``--variants`` picks the named plans.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch
import torch.nn.functional as F


def make(N, d, f, E, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, d, device=device, dtype=dtype, generator=g)
    w_r = torch.randn(d, E, device=device, generator=g) * d ** -0.5
    w1 = (torch.randn(E, d, f, device=device, generator=g) * d ** -0.5).to(dtype)
    b1 = (0.02 * torch.randn(E, f, device=device, generator=g)).to(dtype)
    w2 = (torch.randn(E, f, d, device=device, generator=g) * f ** -0.5).to(dtype)
    b2 = (0.02 * torch.randn(E, d, device=device, generator=g)).to(dtype)
    return x, w_r, w1, b1, w2, b2


def grouped_mm_reason(dtype) -> str | None:
    """Why ``torch._grouped_mm`` cannot run here, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if torch.cuda.get_device_capability() < (9, 0):
        return "torch._grouped_mm needs compute capability 9.0+"
    if dtype != torch.bfloat16:
        return "torch._grouped_mm runs bf16 only"
    return None


def sweep_plans(N, d, f, E, dtype, names) -> dict:
    """The plans to time: each named variant of ``names``, then (``names`` holding
    ``"sweep"``) variations of the new design around them: quarter tail tiles, row-tile
    order, 256-wide tiles in both layers, a persistent grid with wide tiles, 256-wide
    first-layer tiles at the mean-size row tile, a 3-stage pipeline (two programs per SM
    fit), 64-wide second-layer tiles (twice the work items where N = d is narrow)."""
    from seqdeploy_moe.kernels import GemmTiles, experts_plan

    plans = {n: experts_plan(N, E, d, f, dtype, n) for n in names if n != "sweep"}
    if "sweep" in names:
        rep = dataclasses.replace
        tail = experts_plan(N, E, d, f, dtype, "buckets-tail")
        wide = experts_plan(N, E, d, f, dtype, "buckets-wide")
        base = experts_plan(N, E, d, f, dtype, "buckets")
        plans.update({
            "sweep tail2": rep(tail, tail=2),
            "sweep tail order-m": rep(tail, order="m"),
            "sweep wide both": rep(wide, second=wide.first),
            "sweep wide tail2": rep(wide, tail=2),
            "sweep wide persistent": rep(wide, persistent=1),
            "sweep mean-m n256": rep(base, order="n",
                                     first=GemmTiles(256, base.first.block_k, 8, 3)),
            "sweep tail stages3": rep(tail, first=rep(tail.first, num_stages=3),
                                      second=rep(tail.second, num_stages=3)),
            "sweep tail second n64": rep(tail, second=rep(tail.second, block_n=64)),
        })
    return plans


def main(argv=None) -> int:
    import triton.testing

    from seqdeploy_moe.experts import reference_moe_experts
    from seqdeploy_moe.kernels import (EXPERTS_VARIANTS, bucket_tokens, experts_config,
                                       experts_plan, group_tokens, padded_rows,
                                       triton_moe_experts)
    # the ops as the model calls them (seqdeploy.ops.call: the kernel directly in eager inference)
    from seqdeploy_moe.model import MOE_EXPERTS as moe_experts
    from seqdeploy_moe.model import TOP1_ROUTER as top1_router
    from seqdeploy_moe.router import route_top1

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--f", type=int, default=3072)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--block-m", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--variants", nargs="*", default=[*EXPERTS_VARIANTS[1:], "sweep"],
                    help="named plans of the experts op to time (plus 'sweep': variations "
                         f"around them); of {EXPERTS_VARIANTS}")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="seconds for the whole run: the i-th of k values of E skips its "
                         "remaining plans past i/k of it (compiling the plans' kernels is most "
                         "of the time on a fresh machine)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="run every path once on the CPU (Triton's interpreter, tiny shapes "
                         "given by the other options; times are one untimed-quality call): "
                         "checks the script before a GPU run")
    args = ap.parse_args(argv)
    names = [v for v in args.variants if not (args.no_sweep and v == "sweep")]
    unknown = [v for v in names if v not in (*EXPERTS_VARIANTS, "sweep")]
    if unknown:
        ap.error(f"unknown variants {unknown}: choose from {EXPERTS_VARIANTS} or 'sweep'")
    started = time.monotonic()
    if not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    N, d, f = args.tokens, args.d, args.f
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        bench = _one_call_ms
        card = "CPU smoke run"
    else:
        bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300)  # noqa: E731  (ms)
        card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, {platform.node()}: N={N} d={d} f={f} {args.dtype}")
    results = {"card": card, "torch": torch.__version__, "N": N, "d": d, "f": f,
               "dtype": args.dtype, "points": []}

    for i, E in enumerate(args.experts):
        deadline = started + args.budget_s * (i + 1) / len(args.experts)
        x, w_r, w1, b1, w2, b2 = make(N, d, f, E, dtype, seed=E, device=device)
        w_router = w_r.T.contiguous()                   # nn.Linear's layout, [E, d]
        logits = (x.float() @ w_r)[None]
        expert, gate = top1_router(logits, 0.0)
        xb = x[None]
        counts = torch.bincount(expert.view(-1), minlength=E)
        point = {"E": E, "tokens_per_expert": [int(c) for c in counts.tolist()]}

        def layer():    # as the model runs it: projection and router in one launch
            _, e, g = route_top1(xb, w_router)
            return moe_experts(xb, e, g, w1, b1, w2, b2)

        def layer_on(plan):
            _, e, g = route_top1(xb, w_router)
            return triton_moe_experts(xb, e, g, w1, b1, w2, b2, plan=plan)

        def mask_loop():
            lg = (x.float() @ w_r)
            g, e = torch.softmax(lg, -1).max(-1)
            y = torch.empty_like(x)
            for i in range(E):
                m = e == i
                y[m] = (g[m, None] * (F.gelu(x[m] @ w1[i] + b1[i]) @ w2[i] + b2[i]).float()).to(dtype)
            return y

        w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)      # grouped_mm wants [E, K, N]
        w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)

        def grouped_mm():
            _, e, g = route_top1(xb, w_router)
            e, g = e.view(-1), g.view(-1)
            order = torch.argsort(e)
            offs = torch.cumsum(torch.bincount(e, minlength=E), 0).to(torch.int32)
            xs = x[order]
            h = torch._grouped_mm(xs, w1_t, offs=offs)
            h = F.gelu(h + b1[e[order]])
            o = torch._grouped_mm(h, w2_t, offs=offs) + b2[e[order]]
            y = torch.empty_like(x)
            y[order] = (o.float() * g[order, None]).to(dtype)
            return y

        def dense():
            return F.gelu(x @ w1[0] + b1[0]) @ w2[0] + b2[0]

        # correctness of what is timed: the layer equals the mask loop
        ref = mask_loop().float()
        err = float((layer()[0].float() - ref).norm() / ref.norm())
        point["layer_vs_mask_loop_rel_l2"] = err
        times = {
            "router": bench(lambda: top1_router(logits, 0.0)),
            "router_capacity_1.25": bench(lambda: top1_router(logits, 1.25)),
            "moe layer": bench(layer),
            "experts op": bench(lambda: moe_experts(xb, expert, gate, w1, b1, w2, b2)),
            "grouping only": bench(lambda: group_tokens(expert.view(-1), E,
                                                        experts_config(N, E, d, f, dtype)["block_m"])),
            "grouping only (buckets)": bench(lambda: bucket_tokens(expert.view(-1), E)),
            "mask loop": bench(mask_loop),
            "dense floor": bench(dense),
        }
        default_bm = experts_config(N, E, d, f, dtype)["block_m"]
        for bm in args.block_m:     # the first design (padded) at each row tile, as before
            times[f"experts op BLOCK_M={bm}"] = bench(
                lambda bm=bm: triton_moe_experts(xb, expert, gate, w1, b1, w2, b2, block_m=bm,
                                                 plan="padded"))
        if not args.smoke:
            point["projection"] = projection_breakdown(x, w_r, w_router, logits[0], bench, times)
            for name, fn in (("router", lambda: top1_router(logits, 0.0)),
                             ("router_capacity_1.25", lambda: top1_router(logits, 1.25)),
                             ("moe layer", layer)):
                ms = graph_ms(fn, bench)
                if isinstance(ms, str):
                    point[f"{name} graph"] = ms
                else:
                    times[f"{name} (CUDA graph)"] = ms
        reason = "smoke run on the CPU" if args.smoke else grouped_mm_reason(dtype)
        if reason is None:
            try:
                got = grouped_mm().float()
                point["grouped_mm_vs_mask_loop_rel_l2"] = float((got - ref).norm() / ref.norm())
                times["grouped_mm"] = bench(grouped_mm)
            except Exception as exc:  # report, do not hide: the other numbers still stand
                reason = f"torch._grouped_mm failed: {str(exc).splitlines()[0][:160]}"
        point["grouped_mm_skipped"] = reason
        floor = times["dense floor"]
        point["ms"] = times
        point["x_floor"] = {k: v / floor for k, v in times.items()}
        point["default_block_m"] = default_bm
        results["points"].append(point)
        flops = 4.0 * N * d * f                 # two GEMMs of one FFN over N tokens
        weight_bytes = 2 * E * d * f * x.element_size()
        point["tflops"] = {k: flops / (v * 1e-3) / 1e12 for k, v in times.items()
                           if k in ("moe layer", "experts op", "dense floor", "grouped_mm")}
        point["padded_rows"] = {bm: padded_rows(point["tokens_per_expert"], bm) for bm in args.block_m}
        point["expert_weight_MB"] = weight_bytes / 1e6
        print(f"\nE={E}  tokens/expert {min(point['tokens_per_expert'])}..{max(point['tokens_per_expert'])}"
              f"  default BLOCK_M={default_bm}  layer vs mask loop rel-L2 {err:.2e}")
        print(f"  expert weights {weight_bytes / 1e6:.0f} MB (read at least once per layer); rows "
              f"computed per BLOCK_M: {point['padded_rows']} for {N} tokens")
        for k, v in times.items():
            tf = point["tflops"].get(k)
            print(f"  {k:28s} {v * 1e3:10.1f} us   {v / floor:6.2f}x floor"
                  + (f"   {tf:6.1f} TFLOP/s" if tf else ""))
        if reason:
            print(f"  grouped_mm: skipped ({reason})")
        # the targets on the GPU's time (CUDA-graph replays: no host launch gaps) where the
        # capture worked, else on the eager calls
        layer_key = "moe layer (CUDA graph)" if "moe layer (CUDA graph)" in times else "moe layer"
        router_key = "router (CUDA graph)" if "router (CUDA graph)" in times else "router"
        layer_ok = times[layer_key] <= 1.5 * floor
        router_ok = times[router_key] * 1e3 < 20
        point["target_keys"] = [layer_key, router_key]
        print(f"  target {layer_key} <= 1.5x floor: {'MET' if layer_ok else 'MISSED'} "
              f"({times[layer_key] / floor:.2f}x); {router_key} < 20 us: "
              f"{'MET' if router_ok else 'MISSED'} ({times[router_key] * 1e3:.1f} us)")
        point["targets_met"] = {"layer_1.5x_floor": layer_ok, "router_20us": router_ok}
        point["default_plan"] = experts_plan(N, E, d, f, dtype).name()
        point["default_plan_eager"] = experts_plan(N, E, d, f, dtype, "padded").name()
        print(f"  experts op and moe layer above ran the default plan (variant 'auto'): "
              f"{point['default_plan']} in the CUDA-graph rows, {point['default_plan_eager']} "
              f"in eager calls; the plan rows below are eager calls of each")
        point["plans"] = time_plans(sweep_plans(N, d, f, E, dtype, names), floor, deadline,
                                    bench, layer_on, xb, expert, gate, (w1, b1, w2, b2),
                                    reference_moe_experts)
    print("\nsummary (x floor; the plan with the fastest layer among those within rel-L2 2e-2):")
    for point in results["points"]:
        ok = {k: v for k, v in point["plans"].items() if v.get("rel_l2", 1.0) < 2e-2}
        best = min(ok, key=lambda k: ok[k]["layer_ms"]) if ok else None
        old = point["plans"].get("padded", {})
        print(f"  E={point['E']}: default layer {point['x_floor']['moe layer']:.2f}x"
              + (f", padded (old) layer {old['layer_x_floor']:.2f}x" if "layer_ms" in old else "")
              + (f", best {best} layer {ok[best]['layer_x_floor']:.2f}x experts "
                 f"{ok[best]['experts_x_floor']:.2f}x ({ok[best]['plan']})" if best else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def projection_breakdown(x, w_r, w_router, fp32, bench, times) -> dict:
    """Where the layer's time outside the experts op goes: the router projection as the
    model runs it (``router.router_logits`` on ``w_router = w_r.T``: the Triton kernel on
    half inputs) against ``x.float() @ w_r`` (``fp32``, its result) and the fp32 upcast
    alone, and their errors against a float64 product. Adds timings to ``times`` and
    returns the errors."""
    from seqdeploy_moe.router import router_logits

    exact = x.double() @ w_r.double()
    got = router_logits(x, w_router)
    out = {"fp32_max_abs_vs_f64": float((fp32.double() - exact).abs().max()),
           "kernel_max_abs_vs_f64": float((got.double() - exact).abs().max()),
           "kernel_argmax_agrees_with_fp32": float((got.argmax(-1) == fp32.argmax(-1)).float().mean())}
    times["projection fp32 (x.float() @ w)"] = bench(lambda: x.float() @ w_r)
    times["upcast x.float() alone"] = bench(lambda: x.float())
    times["projection router_logits"] = bench(lambda: router_logits(x, w_router))
    print(f"  projection errors vs float64: {out}")
    return out


def graph_ms(fn, bench) -> float | str:
    """``fn`` captured in a CUDA graph and timed by replaying it: the GPU's time without the
    host's launch gaps. A failure comes back as its one-line message."""
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        return bench(g.replay)
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def time_plans(plans, floor, deadline, bench, layer_on, xb, expert, gate, weights,
               reference) -> dict:
    """Per plan: the experts op alone and the layer on it (us and x floor), and the op's
    max-abs / rel-L2 error against the fp32 reference; prints one row each."""
    ref = reference(xb, expert, gate, *weights).float()
    print(f"  {'plan':24s} {'experts us':>10s} {'x floor':>7s} {'layer us':>9s} {'x floor':>7s}"
          f" {'max-abs':>9s} {'rel-L2':>9s}  tiles")
    out = {}
    for label, plan in plans.items():
        if time.monotonic() > deadline:
            print(f"  {label:24s} skipped: past its share of --budget-s")
            out[label] = {"plan": plan.name(), "skipped": "budget"}
            continue
        try:
            poisoned = torch.full_like(xb, float("nan"))       # an unwritten row shows
            y = triton_moe_experts_on(plan, xb, expert, gate, weights, out=poisoned).float()
            if y.is_cuda:
                torch.cuda.synchronize()
            abs_err = float((y - ref).abs().max())
            rel = float((y - ref).norm() / ref.norm())
            op_ms = bench(lambda: triton_moe_experts_on(plan, xb, expert, gate, weights))
            layer_ms = bench(lambda: layer_on(plan))
        except Exception as exc:  # report, do not hide: the other plans still run
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"  {label:24s} FAILED {msg}")
            out[label] = {"plan": plan.name(), "failed": msg}
            continue
        bad = "" if rel < 2e-2 else "   <-- WRONG"        # NaN compares False too
        print(f"  {label:24s} {op_ms * 1e3:10.1f} {op_ms / floor:6.2f}x {layer_ms * 1e3:9.1f}"
              f" {layer_ms / floor:6.2f}x {abs_err:9.2e} {rel:9.2e}  {plan.name()}{bad}")
        out[label] = {"plan": plan.name(), "plan_fields": dataclasses.asdict(plan),
                      "experts_ms": op_ms, "layer_ms": layer_ms,
                      "experts_x_floor": op_ms / floor, "layer_x_floor": layer_ms / floor,
                      "max_abs": abs_err, "rel_l2": rel}
    return out


def _one_call_ms(fn) -> float:
    """--smoke's stand-in for do_bench: one call, its wall time in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def triton_moe_experts_on(plan, xb, expert, gate, weights, out=None):
    from seqdeploy_moe.kernels import triton_moe_experts

    return triton_moe_experts(xb, expert, gate, *weights, out=out, plan=plan)


if __name__ == "__main__":
    raise SystemExit(main())
