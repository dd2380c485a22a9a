"""cfc_scan on the GPU at the seed's four benchmark points, fp16, in one run:

- the Triton kernel (through the registered op ``seqdeploy::cfc_scan``, which runs the design
  ``launch_config`` picks: ``rows`` or ``split``, printed per point);
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
                                  [--no-wgmma] [--json out.json]

``--no-wgmma`` keeps the registered op off the cluster kernel's wgmma form (``wgmma.py``),
which it otherwise takes where it is the default (``kernels.WGMMA_BY_DEFAULT``,
``kernels.WGMMA_BLOCK_H``), so the Triton cluster kernel is timed instead.

``--sweep`` also times the kernel's launch configurations at every point, both designs:
``rows`` (block_b, num_warps, w_resident, block_k) and ``split`` (block_b, block_n, num_warps,
w_resident, cluster, k_split, wgmma), the defaults first, within ``--sweep-budget`` seconds in
all (configurations past a point's share are listed as skipped). All numbers come from this
run.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from seqdeploy.bench import time_fn
from seqdeploy_cfc import kernels
from seqdeploy_cfc.kernels import (W_RESIDENT_BYTES, launch_config, sm_count, split_grid,
                                   split_tile_defaults, triton_cfc_scan)
from seqdeploy.ops import call
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


def rows_configs(B, H):
    """``rows`` launches to time: the default first, last the default with the exp-based
    tanh."""
    block_h = max(16, 1 << (H - 1).bit_length())
    fits = block_h * block_h * DTYPE.itemsize <= W_RESIDENT_BYTES   # else it cannot compile
    modes = [(True, 32), (False, 32)] if fits else [(False, 32), (False, 64)]
    default = launch_config(B, H, DTYPE, "cuda", method="rows")
    configs = [{"block_b": default["block_b"], "num_warps": default["num_warps"],
                "w_resident": default["w_resident"], "block_k": default["block_k"]}]
    for block_b in (16, 32):
        for num_warps in (4, 8):
            for resident, block_k in modes:
                configs.append({"block_b": block_b, "num_warps": num_warps,
                                "w_resident": resident, "block_k": block_k})
    configs.append({**configs[0], "fast_tanh": False})   # the exp-based tanh
    return unique(configs)


def split_configs(B, H, sms):
    """``split`` launches to time: the default first, then the wgmma form's tilings (where it
    runs) and the Triton kernel's default, then every block_b x block_n of the Triton kernel
    (with the default's rules for num_warps and w_resident) with each exchange that can run
    it (as thread-block clusters where this GPU has them and the column blocks form a
    cluster; cluster-less where the grid fits on the SMs), then the Triton kernel's default
    tiling with other warp counts, with w_rec streamed, with the other dot split and with
    the other exchange, and the default with the exp-based tanh. A block_b above 16 that
    holds the whole batch is left out (fewer programs, same work each)."""
    block_h = max(16, 1 << (H - 1).bit_length())
    keys = ("block_b", "block_n", "num_warps", "w_resident", "cluster", "k_split", "wgmma")
    first = {k: launch_config(B, H, DTYPE, "cuda", method="split")[k] for k in keys}
    clusters = kernels.clusters_available("cuda")
    configs = [first]
    if kernels.wgmma_runs("cuda") and DTYPE != torch.float32 and block_h <= 512:
        for block_n in (64, 128):   # the wgmma form's tilings (its warps follow block_n)
            if block_n <= block_h and -(-H // block_n) <= kernels.MAX_CLUSTER:
                configs.append({"block_b": 16, "block_n": block_n, "num_warps": block_n // 16,
                                "w_resident": True, "cluster": True, "k_split": 1,
                                "wgmma": True})
    # the Triton kernel's default (the base of the variants below)
    base = {k: launch_config(B, H, DTYPE, "cuda", method="split", wgmma=False)[k] for k in keys}
    configs.append(base)
    for block_b in (16, 32, 64):
        if block_b > 16 and block_b >= B:
            continue
        for block_n in (16, 32, 64, 128):
            n_bb, n_nb = split_grid(B, H, block_b, block_n)
            if block_n > block_h or n_nb < 2:
                continue
            tile = {"block_b": block_b, "block_n": block_n, "k_split": 1, "wgmma": False,
                    **split_tile_defaults(block_b, block_n, H, DTYPE)}
            if clusters and n_nb <= kernels.MAX_CLUSTER:
                configs.append({**tile, "cluster": True})
            if n_bb * n_nb <= sms:
                configs.append({**tile, "cluster": False})
    for num_warps in (1, 2, 4, 8):
        configs.append({**base, "num_warps": num_warps})
    configs.append({**base, "w_resident": not base["w_resident"]})
    configs.append({**first, "fast_tanh": False})   # the exp-based tanh
    if base["w_resident"]:   # the dot as one or as two half-K dots
        configs.append({**base, "k_split": 3 - base["k_split"]})
    if base["cluster"]:   # the cluster-less exchange at its own default tiling
        other = kernels._split_config(B, H, DTYPE, sms)
        if math.prod(split_grid(B, H, other["block_b"], other["block_n"])) <= sms:
            configs.append({k: other[k] for k in keys})
    return unique(configs)


def unique(configs):
    seen, out = set(), []
    for c in configs:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def sweep(args_, ref, B, T, H, deadline, designs=("split", "rows")):
    """Time launch configurations of both designs until ``deadline`` (perf_counter): the two
    defaults first, then the split variants (the new design, the one to tune), then rows."""
    xw = args_[0]
    out = torch.empty_like(xw)
    splits = [("split", c) for c in split_configs(B, H, sm_count(xw.device))]
    rows_ = [("rows", c) for c in rows_configs(B, H)] if "rows" in designs else []
    order = splits[:1] + rows_[:1] + splits[1:] + rows_[1:]
    rows, skipped = [], 0
    for method, cfg in order:
        label = f"B={B} T={T} H={H} {method} " + " ".join(f"{k}={v}" for k, v in cfg.items())
        if time.perf_counter() > deadline:
            skipped += 1
            continue
        launch = lambda: triton_cfc_scan(*args_, 1.0, out=out, method=method, **cfg)  # noqa: E731
        try:
            out.fill_(math.nan)
            launch()
            err = rel_err(out, ref)
            ms = time_fn(launch, "cuda", budget_s=0.2, cuda_graph=True).median_ms
        except Exception as exc:  # noqa: BLE001 - report configs that fail, keep sweeping
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a broken context fails every later config too
                pass
            print(f"  {label}: failed {type(exc).__name__}: {exc}"[:240], flush=True)
            continue
        rows.append({"method": method, **cfg, "ms": ms, "err": err})
        print(f"  {label}: {ms:.4f} ms err {err:.1e}", flush=True)
    if skipped:
        print(f"  B={B} T={T} H={H}: {skipped} of {len(order)} configs skipped (sweep budget; "
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
    parser.add_argument("--designs", default="split,rows",
                        help="designs the sweep times (default %(default)s)")
    parser.add_argument("--no-wgmma", action="store_true",
                        help="time the Triton cluster kernel where the registered op would run "
                             "the wgmma form (kernels.WGMMA_BY_DEFAULT off)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    kernels.WGMMA_BY_DEFAULT = kernels.WGMMA_BY_DEFAULT and not args.no_wgmma   # before any launch
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
        row = {"B": B, "T": T, "H": H, "config": launch_config(B, H, DTYPE, xw.device)}
        print(f"  B={B} T={T} H={H} registered op runs method={row['config']['method']} "
              f"{row['config']}", flush=True)

        out = torch.full_like(xw, math.nan)
        triton_cfc_scan(*args_, 1.0, out=out)
        row["kernel_err"] = rel_err(out, ref)
        kernel = lambda: call(CFC_SCAN, *args_, 1.0)  # noqa: E731
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
            row["sweep"] = sweep(args_, ref, B, T, H, t0 + share, args.designs.split(","))
            sweep_left -= time.perf_counter() - t0
            for method in ("split", "rows"):
                best = [r for r in row["sweep"] if r["method"] == method][:3]
                print(f"  sweep B={B} T={T} H={H} best {method}: {best}", flush=True)
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
        f"({r['B']},{r['T']},{r['H']}) {r['kernel_err']:.1e} {r['config']['method']}"
        f"{'/wgmma' if r['config'].get('wgmma') else ''}"
        for r in results))
    print("x = other's time / kernel's time (> 1: the kernel is faster)")
    if args.sweep:
        print("\nsweep, best per design (CUDA-graph ms) against cuDNN graph:")
        for r in results:
            for method in ("split", "rows"):
                best = next((c for c in r.get("sweep", []) if c["method"] == method), None)
                if best is None:
                    print(f"{r['B']:>4} {r['T']:>4} {r['H']:>4} {method:>5}: none ran")
                    continue
                knobs = " ".join(f"{k}={v}" for k, v in best.items()
                                 if k not in ("method", "ms", "err"))
                print(f"{r['B']:>4} {r['T']:>4} {r['H']:>4} {method:>5}: {best['ms']:.4f} ms "
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
