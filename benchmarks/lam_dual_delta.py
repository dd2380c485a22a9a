"""dual_delta_rule on the GPU, in one run: the Triton kernels (both memories) vs the seed's
formulation (a per-token Python loop over both memories) vs flash-linear-attention's
``chunk_gated_delta_rule`` for ONE memory (when ``fla`` is importable), then (``--sweep``)
every design and tiling of ``kernels.LaunchPlan`` in a table, then the ``base`` encoder's
latency at B=1, T=128 and 512 on the torch engine.

    python benchmarks/lam_dual_delta.py [--json out.json] [--dtype bf16] [--sweep]
        [--variants NAME,NAME] [--budget-s 70] [--device cpu --shapes 1,1,130,16]

Target: both memories in at most 1.5x fla's time for one memory. Every number printed comes
from this run on this GPU; the seed's own figures (13.7 / 23.9 ms per 128 / 512-token batch)
were measured on different hardware.

The sweep table has one row per variant and, per shape, its CUDA-graph time (``ms``), that
time over fla's one memory (``/fla``, when fla is available) and its rel-L2 against the
float64 per-token loop on two batch rows of one head (``rel64``), so a fast but wrong variant
shows. Before timing, ``--sweep`` compiles every variant in parallel worker processes (each
runs it once per shape, filling Triton's on-disk cache), so compile time stays out of the
stage budget; ``--budget-s`` stops starting new measurements (each skip is printed) past it.
``--device cpu`` runs the kernels in Triton's interpreter (a smoke test of this script at a
tiny shape, ``--shapes``; no CUDA graphs, fla or encoder there).
"""
from __future__ import annotations

import argparse
import sys
import json
import math
import os
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # (--device cpu) the interpreter must be on before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from seqdeploy.bench import time_fn  # noqa: E402
from seqdeploy_lam.kernels import launch_plan, triton_dual_delta_rule  # noqa: E402
from seqdeploy_lam.ops import dual_delta_rule, naive_dual_delta_rule, reference_dual_delta_rule  # noqa: E402

SHAPES = [(8, 8, 2048, 64), (8, 8, 128, 64), (8, 8, 512, 64)]   # (B, n, T, d), dv = d
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: name -> launch_plan arguments; the first of each design is that design's default plan
VARIANTS = {
    "split": dict(design="split"),
    "split bv16": dict(design="split", BV=16),
    "split bv64": dict(design="split", BV=64),
    "split bv16 w2": dict(design="split", BV=16, num_warps=2),
    "split bv32 both-mem": dict(design="split", mems_per_program=2),
    "split bv16 both-mem": dict(design="split", BV=16, mems_per_program=2),
    "split out64": dict(design="split", BV_OUT=64),
    "split state-w8": dict(design="split", num_warps=8),
    "split stages2": dict(design="split", state_stages=2),
    "split stages4": dict(design="split", state_stages=4),
    "split out-w8": dict(design="split", out_warps=8),
    # the whole dv = 64 in one output program (Q K^T and the q, k loads once, not per value
    # block): spills at 4 warps, none at 8 (ptxas sm_90, triton 3.6: 255 registers, no stack)
    "split out64 w8": dict(design="split", BV_OUT=64, out_warps=8),
    "split ws-fp32": dict(design="split", workspace="fp32"),
    # the WY representation (default: "solve", its substitutions loading rows back, 2 warps)
    "split wy-fused": dict(design="split", wy="fused", inverse="extract", wy_warps=4),
    "split wy-fused w2": dict(design="split", wy="fused", inverse="extract"),
    "split wy-fused doubling": dict(design="split", wy="fused", inverse="doubling", wy_warps=4),
    "split wy-solve w4": dict(design="split", wy_warps=4),
    "split wy-solve w1": dict(design="split", wy_warps=1),
    "split wy-solve extract": dict(design="split", inverse="extract"),
    "split wy-solve extract w4": dict(design="split", inverse="extract", wy_warps=4),
    "split wy-solve doubling": dict(design="split", inverse="doubling"),
    # the inverse stored in the input dtype (half its bytes), K K^T on widened keys, the
    # inverse's chained products at one tf32 pass instead of three
    "split tinv-input": dict(design="split", inverse="extract", tinv="input"),
    "split tinv-input doubling": dict(design="split", inverse="doubling", tinv="input"),
    "split kk-fp32": dict(design="split", kk_dots="fp32"),
    # the inverse and W, U in one program a chunk and memory (wy="solve-apply": no stored
    # inverse, one launch fewer), at the default's row loads and with extract, on 2 and 4
    # warps (ptxas sm_90, triton 3.6, bf16: 8 bytes of spills for rows on 2 warps, none for
    # the other three; doubling spills at every warp count and is left out)
    "split solve-apply": dict(design="split", wy="solve-apply"),
    "split solve-apply w4": dict(design="split", wy="solve-apply", wy_warps=4),
    "split solve-apply extract": dict(design="split", wy="solve-apply", inverse="extract"),
    "split solve-apply extract w4": dict(design="split", wy="solve-apply", inverse="extract",
                                         wy_warps=4),
    "split inv-tf32": dict(design="split", INV_PREC="tf32"),
    "split solve-apply inv-tf32": dict(design="split", wy="solve-apply", INV_PREC="tf32"),
    "fused": dict(design="fused"),
    "fused bv16": dict(design="fused", BV=16),
    "fused bv64 w8": dict(design="fused", BV=64, num_warps=8),
    "recurrent": dict(design="recurrent"),   # the per-token kernel (default at T <= 16 only)
    # input-dtype dots: refused on CUDA (an illegal memory access on an H100), so they report
    # that refusal; last, so nothing else waits on them
    "split half-dots": dict(design="split", dot_operands="input"),
    "split half inv-tf32": dict(design="split", dot_operands="input", INV_PREC="tf32"),
}


def make(B, n, T, d, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)   # noqa: E731
    q = (F.normalize(r(B, T, n, d), dim=-1) / math.sqrt(d)).to(dtype)
    k = F.normalize(r(B, T, n, d), dim=-1).to(dtype)
    v = r(B, T, n, d).to(dtype)
    beta, mix = torch.sigmoid(r(B, T, n)).to(dtype), torch.sigmoid(r(B, T, n)).to(dtype)
    g_fast = F.logsigmoid(r(B, T, n)).float()
    g_slow = F.logsigmoid(r(B, T, n) + 3.5).float()
    state = torch.zeros(B, n, 2, d, d, device=device)
    return q, k, v, beta, g_fast, g_slow, mix, state


def plan_for(name, x):
    q, v = x[0], x[2]
    return launch_plan(q.shape[1], q.shape[3], v.shape[3], q.dtype, **VARIANTS[name])


def fla_one_memory():
    """fla's chunk_gated_delta_rule, or None with the reason."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:   # noqa: BLE001 - any import failure means "not available here"
        return None, f"fla not importable: {type(exc).__name__}: {exc}"
    return chunk_gated_delta_rule, ""


def rel(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def float64_slice(x):
    """The float64 loop on two batch rows of one head: ``(o [2, T, 1, dv], slicer)``."""
    small = [t[:2, :, :1] for t in x[:7]]
    ref_o, _ = naive_dual_delta_rule(*small, x[7][:2, :1])
    return ref_o, lambda o: o[:2, :, :1]


def _warm(job):
    """Worker process: run one variant once at every shape, so its kernels compile into
    Triton's on-disk cache; returns ``(name, error or "")``."""
    name, shapes, dtype_name = job
    try:
        for B, n, T, d in shapes:
            x = make(B, n, T, d, DTYPES[dtype_name])
            triton_dual_delta_rule(*x, plan=plan_for(name, x))
        torch.cuda.synchronize()
        return name, ""
    except Exception as exc:   # noqa: BLE001 - reported, and the timing loop reports it again
        return name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def precompile(names, shapes, dtype_name, workers, timeout_s=40.0):
    import concurrent.futures as cf
    import multiprocessing

    t0 = time.perf_counter()
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for name, err in pool.map(_warm, [(nm, shapes, dtype_name) for nm in names], timeout=timeout_s):
            if err:
                print(f"precompile {name}: failed: {err}")
        print(f"precompiled {len(names)} variants in {workers} processes: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as exc:   # noqa: BLE001 - timing compiles what is missing, in process
        print(f"precompile stopped after {time.perf_counter() - t0:.1f} s: {type(exc).__name__} {exc}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def encoder_latency(results, dtype_name):
    from seqdeploy.plugins import load_registry
    from seqdeploy.precision import cast_model

    registry = load_registry()
    arch = registry.architecture("lam")
    config = arch.config("base")
    torch.manual_seed(0)
    model = cast_model(arch.build(config).eval().cuda(), "fp16", arch.fp32_parameters)
    for T in (128, 512):
        inputs = arch.make_inputs(config, 1, T, seed=1)
        args = [inputs[s.name].cuda() for s in arch.input_specs(config)]
        with torch.inference_mode():
            timing = time_fn(lambda: model(*args), "cuda")
            graphed = time_fn(lambda: model(*args), "cuda", cuda_graph=True)
        row = {"what": "base encoder fp16, torch engine", "B": 1, "T": T,
               "eager_ms": timing.median_ms, "cuda_graph_ms": graphed.median_ms}
        results["encoder"].append(row)
        print(f"base encoder B=1 T={T:4d} fp16: eager {timing.median_ms:7.3f} ms, "
              f"CUDA graph {graphed.median_ms:7.3f} ms (seed, other GPU: "
              f"{13.7 if T == 128 else 23.9} ms)")


def kernel_breakdown(fn, iters: int = 20, top: int = 6) -> list[tuple[str, float]]:
    """GPU time per call of each kernel ``fn`` launches, from torch.profiler: ``[(kernel
    name, ms per call)]``, the largest first. Says where the time goes (our WY, state and
    output kernels; fla's pipeline) without touching either implementation."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append((evt.key, us / 1000.0 / iters))
    return sorted(rows, key=lambda r: -r[1])[:top]


def print_breakdown(label: str, rows: list[tuple[str, float]]) -> None:
    total = sum(ms for _, ms in rows)
    parts = ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in rows)
    print(f"    {label} kernels (ms per call, {total:.3f} in all): {parts}")


def main():
    sys.stdout.reconfigure(line_buffering=True)   # lines survive a stage timeout's kill
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--no-encoder", action="store_true")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every design / tiling variant (VARIANTS) at every shape")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of the sweep's variants (implies --sweep); "
                             f"known: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=70.0,
                        help="start no new measurement after this many seconds")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", default=None,
                        help="B,n,T,d[;B,n,T,d...] instead of the target shapes")
    parser.add_argument("--workers", type=int, default=8, help="precompile processes (--sweep)")
    args = parser.parse_args()
    start = time.perf_counter()
    over = lambda: time.perf_counter() - start > args.budget_s   # noqa: E731
    dtype = DTYPES[args.dtype]
    dev = args.device
    cuda = dev == "cuda"
    shapes = SHAPES if args.shapes is None else \
        [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    names = list(VARIANTS)
    if args.variants:
        names = [s.strip() for s in args.variants.split(",")]
        unknown = [s for s in names if s not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        args.sweep = True
    fla, why = fla_one_memory() if cuda else (None, "fla: not run on cpu")
    gpu = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"GPU: {gpu}, torch {torch.__version__}, dtype {args.dtype}" + (f"; {why}" if why else ""))
    results = {"gpu": gpu, "dtype": args.dtype, "fla": why or "available", "ops": [],
               "encoder": [], "sweep": []}
    if args.sweep and cuda and args.workers > 0:
        precompile(names, shapes, args.dtype, min(args.workers, len(names)))
    graph = dict(cuda_graph=cuda)
    refs = {}
    fla_ms = {}
    for B, n, T, d in shapes:
        if over():
            print(f"B={B} n={n} T={T}: skipped (past --budget-s {args.budget_s:.0f} s)")
            continue
        x = make(B, n, T, d, dtype, dev)
        row = {"B": B, "n": n, "T": T, "d": d}
        ours = time_fn(lambda: triton_dual_delta_rule(*x), dev)
        ours_g = time_fn(lambda: triton_dual_delta_rule(*x), dev, **graph)
        row["plan"] = str(launch_plan(T, d, d, dtype))
        row["ours_ms"], row["ours_graph_ms"] = ours.median_ms, ours_g.median_ms
        row["op_ms"] = time_fn(lambda: dual_delta_rule(*x), dev).median_ms
        seed = time_fn(lambda: reference_dual_delta_rule(*x), dev, warmup=1, min_repeats=3,
                       max_repeats=5, budget_s=2.0)
        row["seed_loop_ms"] = seed.median_ms
        # correctness at this shape, against the float64 loop on one head of two rows
        refs[T] = float64_slice(x)
        o, S = triton_dual_delta_rule(*x)
        row["rel_err_vs_float64"] = rel(refs[T][1](o), refs[T][0])
        if fla is not None:
            q, k, v, beta, g_fast = x[0], x[1], x[2], x[3], x[4]
            h0 = x[7][:, :, 0].contiguous()
            call = lambda: fla(q, k, v, g=g_fast, beta=beta, scale=1.0, initial_state=h0,   # noqa: E731
                               output_final_state=True)
            row["fla_one_memory_ms"] = time_fn(call, "cuda").median_ms
            try:
                row["fla_one_memory_graph_ms"] = time_fn(call, "cuda", cuda_graph=True).median_ms
                fla_ms[T] = row["fla_one_memory_graph_ms"]
            except Exception as exc:   # noqa: BLE001 - fla may not capture; compare eager then
                print(f"fla under a CUDA graph failed ({type(exc).__name__}); comparing eager times")
                row["fla_one_memory_graph_ms"] = row["fla_one_memory_ms"]
                row["ours_graph_ms_note"] = "ratio uses eager times"
                row["ours_graph_ms"] = row["ours_ms"]
                fla_ms[T] = None    # the sweep's graph times have no graph time of fla to meet
            # the fast memory alone (mix = 1) must agree with fla's one memory
            fast_only = list(x)
            fast_only[6] = torch.ones_like(x[6])
            o1, _ = triton_dual_delta_rule(*fast_only)
            o_fla, _ = call()
            row["rel_diff_vs_fla"] = rel(o1.float(), o_fla.float())
            row["ratio_both_vs_fla_one"] = row["ours_graph_ms"] / row["fla_one_memory_graph_ms"]
        results["ops"].append(row)
        line = (f"B={B} n={n} T={T:5d} d={d}: ours {row['ours_ms']:8.3f} ms "
                f"(graph {row['ours_graph_ms']:8.3f}, via op {row['op_ms']:8.3f}) | seed loop "
                f"{row['seed_loop_ms']:9.2f} ms (x{row['seed_loop_ms'] / row['ours_ms']:.0f}) | "
                f"rel err {row['rel_err_vs_float64']:.1e}")
        if fla is not None:
            line += (f" | fla one memory {row['fla_one_memory_ms']:8.3f} ms (graph "
                     f"{row['fla_one_memory_graph_ms']:8.3f}); both/one = "
                     f"{row['ratio_both_vs_fla_one']:.2f} (target <= 1.5); fast memory vs fla "
                     f"rel {row['rel_diff_vs_fla']:.1e}")
        print(line, flush=True)
        if cuda:
            row["ours_kernels_ms"] = kernel_breakdown(lambda: triton_dual_delta_rule(*x))
            print_breakdown("ours", row["ours_kernels_ms"])
            if fla is not None:
                row["fla_kernels_ms"] = kernel_breakdown(call)
                print_breakdown("fla ", row["fla_kernels_ms"])
        del x
    save(args.json, results)     # kept if a later part is cut off by a time budget
    if args.sweep:
        sweep(shapes, names, dtype, dev, refs, fla_ms, results, over, args)
        save(args.json, results)
    if cuda and not args.no_encoder:
        if over():
            print(f"encoder latency: skipped (past --budget-s {args.budget_s:.0f} s)")
        else:
            encoder_latency(results, args.dtype)
    save(args.json, results)


def sweep(shapes, names, dtype, dev, refs, fla_ms, results, over, args):
    """Every variant at every shape: CUDA-graph ms, ratio to fla's one memory, rel-L2 vs the
    float64 loop; then the table."""
    cells = {}
    for B, n, T, d in shapes:
        if T not in refs:
            continue
        x = make(B, n, T, d, dtype, dev)
        for name in names:
            if over():
                print(f"sweep T={T} {name}: skipped (past --budget-s {args.budget_s:.0f} s)")
                continue
            entry = {"variant": name, "T": T, "B": B, "n": n, "d": d}
            try:
                plan = plan_for(name, x)
                entry["plan"] = str(plan)
                o, _ = triton_dual_delta_rule(*x, plan=plan)
                entry["rel_vs_float64"] = rel(refs[T][1](o), refs[T][0])
                entry["graph_ms"] = time_fn(lambda: triton_dual_delta_rule(*x, plan=plan), dev,
                                            budget_s=1.0, max_repeats=200,
                                            cuda_graph=dev == "cuda").median_ms
                if fla_ms.get(T):
                    entry["ratio_vs_fla_one"] = entry["graph_ms"] / fla_ms[T]
            except Exception as exc:   # noqa: BLE001 - a variant that fails is reported
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                print(f"sweep T={T} {name}: failed: {entry['error']}", flush=True)
            results["sweep"].append(entry)
            cells[name, T] = entry
            save(args.json, results)    # (a run cut short keeps what it measured)
            if "graph_ms" in entry:
                print(f"sweep T={T} {name}: {entry['graph_ms']:.3f} ms"
                      + (f" ({entry['ratio_vs_fla_one']:.2f}x fla)" if "ratio_vs_fla_one" in entry
                         else "") + f", rel-L2 {entry['rel_vs_float64']:.1e}", flush=True)
            if "illegal memory access" in entry.get("error", "") or \
                    "CUDA error" in entry.get("error", ""):
                print(f"sweep: the CUDA context is lost after {name}; the rest cannot run",
                      flush=True)
                return
        del x
    Ts = [T for _, _, T, _ in shapes if T in refs]
    has_fla = any(fla_ms.get(T) for T in Ts)
    head = f"{'variant':<22}" + "".join(
        f" | T={T:<5d} {'ms':>7} {'/fla' if has_fla else '':>5} {'rel64':>7}" for T in Ts)
    print("\nsweep (CUDA graph ms; /fla: over fla's one memory, target <= 1.5; rel64: rel-L2 vs "
          "the float64 loop)" if dev == "cuda" else "\nsweep (interpreter, ms)")
    print(head)
    print("-" * len(head))
    for name in names:
        line = f"{name:<22}"
        for T in Ts:
            e = cells.get((name, T))
            if e is None or "graph_ms" not in e:
                line += f" | {'':7} {('failed' if e else 'skipped'):>7} {'':>5} {'':>7}"
                continue
            ratio = f"{e['ratio_vs_fla_one']:5.2f}" if "ratio_vs_fla_one" in e else ""
            line += f" | {'':7} {e['graph_ms']:7.3f} {ratio:>5} {e['rel_vs_float64']:7.1e}"
        print(line)
    for T in Ts:
        done = [cells[nm, T] for nm in names if "graph_ms" in cells.get((nm, T), {})]
        if done:
            best = min(done, key=lambda e: e["graph_ms"])
            print(f"fastest at T={T}: {best['variant']} {best['graph_ms']:.3f} ms"
                  + (f" ({best['ratio_vs_fla_one']:.2f}x fla)" if "ratio_vs_fla_one" in best else ""))


def save(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
