"""cfc_scan on the GPU at the seed's four benchmark points, fp16, in one run:

- the Triton kernel (through the registered op ``seqdeploy::cfc_scan``, which runs the plan
  ``seqdeploy_cfc.kernels.choose`` makes: design ``rows``, ``split`` or ``wgmma``, printed per
  point);
- the seed's formulation: a ``torch.jit.script`` step function called in a Python loop;
- ``torch.compile`` of that loop (default mode);
- cuDNN's tanh RNN (``torch.nn.RNN``) at the same B, T, H: not the same cell (no leak), but
  the same work per step (one [B, H] x [H, H] GEMM plus a pointwise tail), so it is the
  vendor's yardstick for a fused sequential recurrence.

Each is timed three ways (``MODES``): eager, one synchronised call (latency, Python launch
overhead included); pipelined, calls back to back (throughput of a loop that does not wait on
each result); and replayed from a CUDA graph where it can be captured (GPU time). The kernel
is also timed through ``torch.ops`` (the dispatcher) beside the direct eager call models make.
Then the streaming case: one step (B=1, T=1, H=256) per call.

    python benchmarks/cfc_scan.py [--sweep [--sweep-budget S]] [--engines kernel,cudnn]
                                  [--design rows|split|wgmma] [--json out.json]

``--design`` times that design's plan (the dispatch's plan for it, see ``design_plan``)
instead of the registered op's choice, through ``triton_cfc_scan(plan=...)``: e.g. ``split``
for the Triton cluster kernel where the op runs ``wgmma``.

``--sweep`` also times other tilings (``LaunchPlan`` fields) at every point, for every
design this GPU runs: ``rows`` (block_b, num_warps, w_resident, block_k), cluster ``split``
(block_b, block_n, num_warps, w_resident) and ``wgmma`` (block_n), the defaults first,
within ``--sweep-budget`` seconds in all (plans past a point's share are listed as
skipped). All numbers come from this run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F

from seqdeploy.bench import time_fn
from seqdeploy.ops import call
from seqdeploy_cfc import kernels
from seqdeploy_cfc.kernels import LaunchPlan, choose, gpu_of, triton_cfc_scan
from seqdeploy_cfc.model import CFC_SCAN
from seqdeploy_cfc.ops import cfc_scan, naive_cfc_scan

POINTS = [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512)]   # (B, T, H)
DTYPE = torch.float16
BUDGET_S = 1.0   # per timing; keeps the whole default run well under three minutes
SWEEP_BUDGET_S = 90.0   # all sweep points together (compiles included): about 3 min in all
ENGINES = ("kernel", "seed", "compile", "cudnn")
#: "eager": one call between two CUDA events, synchronised (a call's latency, launch overhead
#: and all); "pipelined": PIPELINED calls back to back, one synchronisation, per call (what a
#: serving loop that does not wait on each result sees: the larger of host and GPU time);
#: "graph": one CUDA-graph replay (GPU time only)
MODES = ("eager", "pipelined", "graph")
SUFFIX = {"eager": "", "pipelined": "_pipe", "graph": "_graph"}
PIPELINED = 20


@torch.jit.script
def seed_step(h, x_t, w_rec, alpha, gain):
    return alpha * h + gain * torch.tanh(x_t + h @ w_rec)


def seed_loop(xw, h, w_rec, alpha, gain):
    """The seed's formulation: the scripted step in a Python loop over T."""
    ys = []
    for t in range(xw.shape[1]):
        h = seed_step(h, xw[:, t], w_rec, alpha, gain)
        ys.append(h)
    return torch.stack(ys, 1)


def python_loop(xw, h, w_rec, alpha, gain):
    """The same loop with the step in plain Python, which is what dynamo traces."""
    ys = []
    for t in range(xw.shape[1]):
        h = alpha * h + gain * torch.tanh(xw[:, t] + h @ w_rec)
        ys.append(h)
    return torch.stack(ys, 1)


def make(B, T, H, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xw = torch.randn(B, T, H, device="cuda", generator=g).to(DTYPE)
    h0 = (0.5 * torch.randn(B, H, device="cuda", generator=g)).to(DTYPE)
    w_rec = (torch.randn(H, H, device="cuda", generator=g) / math.sqrt(H)).to(DTYPE)
    tau = F.softplus(2.0 * torch.randn(H, device="cuda", generator=g)) + 0.01
    return xw, h0, w_rec, tau


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def timed(fn, mode: str):
    """Median ms per call in ``mode`` (see ``MODES``), or None with the reason when ``fn``
    cannot be captured in a CUDA graph."""
    try:
        if mode == "pipelined":
            burst = lambda: [fn() for _ in range(PIPELINED)]  # noqa: E731
            return time_fn(burst, "cuda", budget_s=BUDGET_S).median_ms / PIPELINED, ""
        return time_fn(fn, "cuda", budget_s=BUDGET_S, cuda_graph=mode == "graph").median_ms, ""
    except Exception as exc:  # noqa: BLE001 - report what cannot be captured, keep going
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"


def design_plan(design: str, B: int, T: int, H: int) -> LaunchPlan:
    """The dispatch's plan for ``design`` at this point on this GPU: what it chooses for the
    design without the faster ones (rows: no clusters; split: no wgmma)."""
    gpu = gpu_of("cuda")
    if design == "rows":
        gpu = dataclasses.replace(gpu, clusters=False, wgmma=False)
    elif design == "split":
        gpu = dataclasses.replace(gpu, wgmma=False)
    plan = choose(B, T, H, DTYPE, gpu)
    if plan.design != design:
        raise SystemExit(f"the dispatch has no {design} plan at B={B} T={T} H={H} here")
    return plan


def sweep_plans(B, T, H):
    """Plans to time: the registered op's first, then each design's default and its other
    tilings (those past a cluster's size or a tile's register budget are left to fail)."""
    gpu = gpu_of("cuda")
    plans = [choose(B, T, H, DTYPE, gpu)]
    rows = design_plan("rows", B, T, H)
    plans.append(rows)
    fits = rows.block_h ** 2 * DTYPE.itemsize <= kernels.W_RESIDENT_BYTES
    for block_b in (16, 32):
        for num_warps in (4, 8):
            for w_resident, block_k in [(True, 32), (False, 32), (False, 64)]:
                if w_resident and not fits:   # (ptxas would refuse the tile)
                    continue
                plans.append(dataclasses.replace(rows, block_b=block_b, num_warps=num_warps,
                                                 w_resident=w_resident, block_k=block_k))
    if gpu.clusters and T > 1 and rows.block_h >= 256:
        split = design_plan("split", B, T, H)
        plans.append(split)
        for block_n in (32, 64, 128):
            if -(-H // block_n) > kernels.MAX_CLUSTER:
                continue
            for num_warps in (4, 8):
                for w_resident in (True, False):
                    plans.append(dataclasses.replace(split, block_n=block_n,
                                                     num_warps=num_warps,
                                                     w_resident=w_resident))
    if gpu.wgmma and rows.block_h <= 512:
        wgmma = choose(B, 2, max(rows.block_h, 256), DTYPE, gpu)
        for block_n in (64, 128):
            if block_n <= rows.block_h:
                plans.append(dataclasses.replace(wgmma, block_h=rows.block_h, block_n=block_n,
                                                 num_warps=block_n // 16))
    plans.append(dataclasses.replace(plans[0], fast_tanh=False))   # the exp-based tanh
    return unique(plans)


def unique(plans):
    return list(dict.fromkeys(plans))


def sweep(args_, ref, B, T, H, deadline):
    """Time :func:`sweep_plans` until ``deadline`` (perf_counter), CUDA-graph time."""
    out = torch.empty_like(args_[0])
    plans = sweep_plans(B, T, H)
    rows, skipped = [], 0
    for plan in plans:
        fields = dataclasses.asdict(plan)
        label = f"B={B} T={T} H={H} " + " ".join(f"{k}={v}" for k, v in fields.items())
        if time.perf_counter() > deadline:
            skipped += 1
            continue
        launch = lambda: triton_cfc_scan(*args_, 1.0, out=out, plan=plan)  # noqa: E731
        try:
            out.fill_(math.nan)
            launch()
            err = rel_err(out, ref)
            ms = time_fn(launch, "cuda", budget_s=0.2, cuda_graph=True).median_ms
        except Exception as exc:  # noqa: BLE001 - report plans that fail, keep sweeping
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a broken context fails every later plan too
                pass
            print(f"  {label}: failed {type(exc).__name__}: {exc}"[:240], flush=True)
            continue
        rows.append({**fields, "ms": ms, "err": err})
        print(f"  {label}: {ms:.4f} ms err {err:.1e}", flush=True)
    if skipped:
        print(f"  B={B} T={T} H={H}: {skipped} of {len(plans)} plans skipped (sweep budget; "
              "raise --sweep-budget)", flush=True)
    rows.sort(key=lambda r: r["ms"])
    return rows


@torch.no_grad()   # one grad mode throughout, so torch.compile does not recompile per mode
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configs")
    parser.add_argument("--sweep-budget", type=float, default=SWEEP_BUDGET_S,
                        help="seconds for the whole sweep (default %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated subset of %(default)s (e.g. kernel,cudnn to skip "
                             "torch.compile's compile time)")
    parser.add_argument("--design", choices=("rows", "split", "wgmma"),
                        help="time this design's plan instead of the registered op's choice")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    start = time.perf_counter()
    sweep_left = args.sweep_budget
    print(f"GPU {torch.cuda.get_device_name()}  dtype {str(DTYPE)[6:]}", flush=True)
    compiled = torch.compile(python_loop, dynamic=False)   # one static graph per point
    results = []
    for B, T, H in POINTS:
        args_ = make(B, T, H)
        xw, h0, w_rec, tau = args_
        alpha = torch.exp(-1.0 / tau).to(DTYPE)
        gain = (-torch.expm1(-1.0 / tau)).to(DTYPE)
        ref = naive_cfc_scan(*args_, 1.0)
        plan = design_plan(args.design, B, T, H) if args.design else \
            choose(B, T, H, DTYPE, gpu_of(xw.device))
        row = {"B": B, "T": T, "H": H, "config": dataclasses.asdict(plan)}
        print(f"  B={B} T={T} H={H} {'times' if args.design else 'registered op runs'} "
              f"{plan}", flush=True)

        out = torch.full_like(xw, math.nan)
        triton_cfc_scan(*args_, 1.0, out=out, plan=plan)
        row["kernel_err"] = rel_err(out, ref)
        kernel = lambda: call(CFC_SCAN, *args_, 1.0)  # noqa: E731
        if args.design:
            kernel = lambda: triton_cfc_scan(*args_, 1.0, plan=plan)  # noqa: E731
        dispatch = lambda: cfc_scan(*args_, 1.0)  # noqa: E731
        seed = lambda: seed_loop(xw, h0, w_rec, alpha, gain)  # noqa: E731
        row["seed_err"] = rel_err(seed(), ref)
        if "compile" in engines:
            t0 = time.perf_counter()
            row["compile_err"] = rel_err(compiled(xw, h0, w_rec, alpha, gain), ref)
            row["compile_s"] = time.perf_counter() - t0
        comp = lambda: compiled(xw, h0, w_rec, alpha, gain)  # noqa: E731
        rnn = torch.nn.RNN(H, H, nonlinearity="tanh", batch_first=True).cuda().half()
        h_rnn = h0[None].contiguous()
        cudnn = lambda: rnn(xw, h_rnn)  # noqa: E731
        for name, fn in [("kernel", kernel), ("dispatch", dispatch), ("seed", seed),
                         ("compile", comp), ("cudnn", cudnn)]:
            for mode in MODES:
                key = f"{name}_ms{SUFFIX[mode]}"
                if name not in engines and not (name == "dispatch" and "kernel" in engines):
                    row[key] = None
                    continue
                row[key], why = timed(fn, mode)
                if why:
                    row[key + "_error"] = why
                shown = "n/a" if row[key] is None else f"{row[key]:.4f} ms"
                print(f"  B={B} T={T} H={H} {key}: {shown} {why}", flush=True)
        for base in ("cudnn", "compile", "seed"):
            for suffix in SUFFIX.values():
                k, b = row[f"kernel_ms{suffix}"], row[f"{base}_ms{suffix}"]
                row[f"speedup_vs_{base}{suffix}"] = b / k if k and b else None
        if args.sweep:
            t0 = time.perf_counter()
            share = sweep_left / (len(POINTS) - len(results))
            row["sweep"] = sweep(args_, ref, B, T, H, t0 + share)
            sweep_left -= time.perf_counter() - t0
            for design in ("rows", "split", "wgmma"):
                best = [r for r in row["sweep"] if r["design"] == design][:3]
                print(f"  sweep B={B} T={T} H={H} best {design}: {best}", flush=True)
        results.append(row)
        del args_, out, rnn
        torch.cuda.empty_cache()

    # streaming: one step per call, the latency a per-token server sees
    xw, h0, w_rec, tau = make(1, 1, 256, seed=1)
    alpha, gain = torch.exp(-1.0 / tau).to(DTYPE), (-torch.expm1(-1.0 / tau)).to(DTYPE)
    rnn = torch.nn.RNN(256, 256, nonlinearity="tanh", batch_first=True).cuda().half()
    stream = {
        "kernel_us": time_fn(lambda: call(CFC_SCAN, xw, h0, w_rec, tau, 1.0), "cuda",
                             budget_s=BUDGET_S).median_ms * 1e3,
        "seed_step_us": time_fn(lambda: seed_step(h0, xw[:, 0], w_rec, alpha, gain), "cuda",
                                budget_s=BUDGET_S).median_ms * 1e3,
        "cudnn_us": time_fn(lambda: rnn(xw, h0[None]), "cuda", budget_s=BUDGET_S).median_ms * 1e3,
    }

    def fmt(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    print("\nms per call, fp16. kernel: the op as models call it (seqdeploy.ops.call); "
          "dispatch: through torch.ops")
    for mode in MODES:
        sfx = SUFFIX[mode]
        print(f"\n[{mode}]")
        print(f"{'B':>4} {'T':>4} {'H':>4} | {'kernel':>8} {'dispatch':>8} {'seed':>8} "
              f"{'compile':>8} {'cudnn':>8} | {'x cudnn':>7} {'x comp':>7} {'x seed':>7}")
        for r in results:
            print(f"{r['B']:>4} {r['T']:>4} {r['H']:>4} | {fmt(r['kernel_ms' + sfx]):>8} "
                  f"{fmt(r['dispatch_ms' + sfx]):>8} {fmt(r['seed_ms' + sfx]):>8} "
                  f"{fmt(r['compile_ms' + sfx]):>8} {fmt(r['cudnn_ms' + sfx]):>8} | "
                  f"{fmt(r['speedup_vs_cudnn' + sfx], '.2f'):>7} "
                  f"{fmt(r['speedup_vs_compile' + sfx], '.2f'):>7} "
                  f"{fmt(r['speedup_vs_seed' + sfx], '.2f'):>7}")
    print("\nerr (rel-L2 vs float64) and design per point: " + ", ".join(
        f"({r['B']},{r['T']},{r['H']}) {r['kernel_err']:.1e} {r['config']['design']}"
        for r in results))
    print("x = other's time / kernel's time (> 1: the kernel is faster)")
    if args.sweep:
        print("\nsweep, best per design (CUDA-graph ms) against cuDNN graph:")
        for r in results:
            for design in ("rows", "split", "wgmma"):
                best = next((c for c in r.get("sweep", []) if c["design"] == design), None)
                if best is None:
                    print(f"{r['B']:>4} {r['T']:>4} {r['H']:>4} {design:>5}: none ran")
                    continue
                knobs = " ".join(f"{k}={v}" for k, v in best.items()
                                 if k not in ("design", "ms", "err"))
                print(f"{r['B']:>4} {r['T']:>4} {r['H']:>4} {design:>5}: {best['ms']:.4f} ms "
                      f"(cudnn {fmt(r['cudnn_ms_graph'])}) {knobs}")
    print(f"streaming B=1 T=1 H=256, eager per step: kernel {stream['kernel_us']:.1f} us, "
          f"seed step {stream['seed_step_us']:.1f} us, cuDNN RNN {stream['cudnn_us']:.1f} us")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "dtype": str(DTYPE)[6:],
                       "points": results, "streaming": stream}, fh, indent=2)


if __name__ == "__main__":
    main()
