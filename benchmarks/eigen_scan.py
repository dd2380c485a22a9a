"""eigen_scan on the GPU: Triton kernel vs the step loop (torch-ref) vs PyTorch's compiled
parallel scan (associative_scan under torch.compile) vs the HBM roofline, in one run.

    python benchmarks/eigen_scan.py [--sweep] [--json out.json]

Prints a table and ratios; all numbers come from this run (HBM bandwidth too).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from seqdeploy.bench import hbm_bandwidth_gbs, time_fn
from seqdeploy_ten.kernels import triton_eigen_scan
from seqdeploy_ten.ops import naive_eigen_scan, reference_eigen_scan

SIZES = [(16, 2048, 128), (64, 8192, 128)]   # the second moves 1.07 GB in fp32


def make(B, T, K, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_re = torch.randn(B, T, K, device="cuda", generator=g).to(dtype)
    x_im = torch.randn(B, T, K, device="cuda", generator=g).to(dtype)
    mag = torch.empty(K, device="cuda").uniform_(0.9, 0.999, generator=g)
    nu = torch.log(-torch.log(mag))
    theta = torch.rand(K, device="cuda", generator=g) * math.pi
    h_re = torch.randn(B, K, device="cuda", generator=g).to(dtype)
    h_im = torch.randn(B, K, device="cuda", generator=g).to(dtype)
    return x_re, x_im, nu, theta, h_re, h_im


def _combine(left, right):
    a_re, a_im, b_re, b_im = left
    c_re, c_im, d_re, d_im = right
    return (c_re * a_re - c_im * a_im, c_re * a_im + c_im * a_re,
            c_re * b_re - c_im * b_im + d_re, c_re * b_im + c_im * b_re + d_im)


def torch_parallel_scan(x_re, x_im, nu, theta, h_re, h_im):
    from torch._higher_order_ops.associative_scan import associative_scan

    mag = torch.exp(-torch.exp(nu))
    lam_re = (mag * torch.cos(theta)).expand_as(x_re)
    lam_im = (mag * torch.sin(theta)).expand_as(x_re)
    p_re, p_im, s_re, s_im = associative_scan(_combine, (lam_re, lam_im, x_re, x_im), dim=1,
                                              combine_mode="pointwise")
    y_re = s_re + p_re * h_re[:, None] - p_im * h_im[:, None]
    y_im = s_im + p_re * h_im[:, None] + p_im * h_re[:, None]
    return y_re, y_im


def rel_err(out, ref):
    y = torch.complex(out[0].double(), out[1].double())
    return float((y - ref).abs().norm() / ref.abs().norm())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configs")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    hbm = hbm_bandwidth_gbs("cuda")
    print(f"GPU {torch.cuda.get_device_name()}  measured HBM copy bandwidth {hbm:.0f} GB/s")
    compiled = torch.compile(torch_parallel_scan, fullgraph=True, dynamic=False)
    results = []
    for B, T, K in SIZES:
        args_ = make(B, T, K)
        moved = 4 * B * T * K * 4
        roof_ms = moved / (hbm * 1e9) * 1e3
        ref = naive_eigen_scan(*args_)
        row = {"B": B, "T": T, "K": K, "bytes": moved, "roofline_ms": roof_ms}
        out = (torch.full_like(args_[0], math.nan), torch.full_like(args_[0], math.nan))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        triton_eigen_scan(*args_, out=out)
        torch.cuda.synchronize()
        print(f"  first launch at B={B} T={T} K={K} done", flush=True)
        row["triton_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        row["triton_err"] = rel_err(out, ref)
        row["triton_ms"] = time_fn(lambda: triton_eigen_scan(*args_, out=out), "cuda",
                                  cuda_graph=True).median_ms
        row["triton_ms_eager"] = time_fn(lambda: triton_eigen_scan(*args_, out=out), "cuda").median_ms
        c_out = compiled(*args_)
        row["compiled_err"] = rel_err(c_out, ref)
        row["compiled_ms"] = time_fn(lambda: compiled(*args_), "cuda", cuda_graph=True).median_ms
        row["compiled_ms_eager"] = time_fn(lambda: compiled(*args_), "cuda").median_ms
        row["loop_ms"] = time_fn(lambda: reference_eigen_scan(*args_), "cuda", min_repeats=3,
                                 max_repeats=20, warmup=1).median_ms
        row["triton_hbm_fraction"] = roof_ms / row["triton_ms"]
        row["speedup_vs_compiled"] = row["compiled_ms"] / row["triton_ms"]
        row["speedup_vs_loop"] = row["loop_ms"] / row["triton_ms"]
        if args.sweep:
            best = []
            variants = [(bt, bk, nw) for bt in (16, 32, 64) for bk in (16, 32, 64) for nw in (1, 2)]
            for bt, bk, nw in variants:
                try:
                    out[0].fill_(math.nan)
                    triton_eigen_scan(*args_, out=out, block_t=bt, block_k=bk, num_warps=nw)
                    err = rel_err(out, ref)
                    ms = time_fn(lambda: triton_eigen_scan(*args_, out=out, block_t=bt, block_k=bk, num_warps=nw),
                                 "cuda", budget_s=0.3, cuda_graph=True).median_ms
                except Exception as exc:  # noqa: BLE001 - report configs that fail
                    print(f"  config {bt},{bk},{nw} failed: {type(exc).__name__}: {exc}"[:200])
                    continue
                best.append((round(ms, 5), bt, bk, nw, f"{err:.1e}"))
                print(f"  config B={B} T={T} K={K} BT={bt} BK={bk} warps={nw}: {ms:.4f} ms err {err:.1e}", flush=True)
            best.sort()
            row["sweep_top"] = best[:10]
            print(f"  sweep B={B} T={T} K={K}: best (ms, BT, BK, warps, err) {best[:8]}")
        results.append(row)
        del args_, out, c_out, ref
        torch.cuda.empty_cache()
    print("GPU times from CUDA-graph replays; 'eager' columns include Python launch overhead")
    print(f"{'B':>4} {'T':>6} {'K':>4} {'MB':>7} {'roof ms':>8} {'triton ms':>10} {'%HBM':>6} "
          f"{'compiled ms':>12} {'x':>6} {'loop ms':>9} {'x':>7} {'err':>8} {'eager tri':>10} {'eager cmp':>10}")
    for r in results:
        print(f"{r['B']:>4} {r['T']:>6} {r['K']:>4} {r['bytes'] / 1e6:>7.0f} {r['roofline_ms']:>8.4f} "
              f"{r['triton_ms']:>10.4f} {100 * r['triton_hbm_fraction']:>5.0f}% {r['compiled_ms']:>12.4f} "
              f"{r['speedup_vs_compiled']:>6.1f} {r['loop_ms']:>9.2f} {r['speedup_vs_loop']:>7.0f} "
              f"{r['triton_err']:>8.1e} {r['triton_ms_eager']:>10.4f} {r['compiled_ms_eager']:>10.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "hbm_gb_s": hbm, "sizes": results}, fh, indent=2)


if __name__ == "__main__":
    main()
