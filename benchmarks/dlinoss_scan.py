"""linoss_scan on the GPU, in one run: the Triton kernel vs the seed's formulation (a step
loop of ``x @ A.T + Bu_t`` with a block-diagonal A of 2x2 blocks) vs PyTorch's compiled
``associative_scan`` of the same recurrence vs the copy-bandwidth ceiling (``y.copy_(x)`` of
the same bytes, measured here, in this run).

    python benchmarks/dlinoss_scan.py [--dtype fp32] [--sweep] [--json out.json]

Bytes moved by the op: b_re, b_im read once, x_re, x_im written once (4 B*T*P elements) plus
the [B, P, 4] fp32 states. The copy reads and writes the same 4 B*T*P elements' bytes.
Targets (issue 16): >= 80% of copy bandwidth at the large size, >= 3x the compiled scan.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from seqdeploy.bench import time_fn
from seqdeploy_dlinoss.kernels import launch_config, triton_linoss_scan
from seqdeploy_dlinoss.ops import naive_linoss_scan, stable_band, transition

#: (B, T, P): the seed's point (chunk kernel with look-back) and >= 1 GB with many rows
#: (rows kernel: 1024 one-warp programs, a single wave at 12 per SM), 2.1 GB in fp32;
#: ``--long`` adds >= 1 GB with few rows and a long T (chunk kernel), 2.1 GB in fp32.
SIZES = [(32, 1024, 128), (256, 4096, 128)]
LONG = (64, 16384, 128)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make(B, T, P, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b_re = torch.randn(B, T, P, device="cuda", generator=g).to(dtype)
    b_im = torch.randn(B, T, P, device="cuda", generator=g).to(dtype)
    dt = torch.sigmoid(torch.empty(P, device="cuda").uniform_(-2.0, 0.0, generator=g))
    G = torch.rand(P, device="cuda", generator=g)
    lo, hi = stable_band(G, dt)
    A = torch.clamp(torch.rand(P, device="cuda", generator=g), lo, hi)
    state0 = torch.randn(B, P, 4, device="cuda", generator=g)
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
    x = torch.cat([out[0].double().flatten(), out[1].double().flatten()]).cpu()
    r = torch.cat([ref[0].flatten(), ref[1].flatten()])
    return float((x - r).norm() / r.norm())


_REFS: dict[int, tuple] = {}


def check_sample(args, out, rows=2):
    """rel-L2 against the float64 loop on the first rows (the loop is slow on the host; it
    runs once per set of inputs)."""
    key = id(args[0])
    if key not in _REFS:
        _REFS.clear()
        sub = [a[:rows].cpu() if a.dim() == 3 else a.cpu() for a in args]
        _REFS[key] = naive_linoss_scan(*sub)
    return rel_err((out[0][:rows], out[1][:rows]), _REFS[key])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sweep", action="store_true", help="also time other tilings")
    parser.add_argument("--no-seed-loop", action="store_true")
    parser.add_argument("--long", action="store_true", help=f"also B, T, P = {LONG}")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"GPU {torch.cuda.get_device_name()}  dtype {args.dtype}", flush=True)
    compiled = torch.compile(torch_parallel_scan, fullgraph=True, dynamic=False)
    results = []
    for B, T, P in SIZES + ([LONG] if args.long else []):
        a = make(B, T, P, dtype)
        elem = a[0].element_size()
        moved = 4 * B * T * P * elem + 2 * B * P * 4 * 4
        row = {"B": B, "T": T, "P": P, "dtype": args.dtype, "bytes": moved,
               "config": launch_config(B, T, P, a[0].device)}
        src = torch.empty(2 * B * T * P * elem, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        row["copy_ms"] = time_fn(lambda: dst.copy_(src), "cuda", cuda_graph=True).median_ms
        row["copy_gb_s"] = 4 * B * T * P * elem / (row["copy_ms"] * 1e6)
        del src, dst
        out = (torch.full_like(a[0], math.nan), torch.full_like(a[0], math.nan),
               torch.full((B, P, 4), math.nan, device="cuda"))
        triton_linoss_scan(*a, out=out)
        torch.cuda.synchronize()
        row["kernel_err"] = check_sample(a, out)
        run = lambda: triton_linoss_scan(*a, out=out)  # noqa: E731
        row["kernel_ms"] = time_fn(run, "cuda", cuda_graph=True).median_ms
        row["kernel_gb_s"] = moved / (row["kernel_ms"] * 1e6)
        row["kernel_pct_copy"] = 100 * row["copy_ms"] / row["kernel_ms"] * (moved / (4 * B * T * P * elem))
        print(f"  B={B} T={T} P={P}: kernel {row['kernel_ms']:.4f} ms "
              f"({row['kernel_pct_copy']:.0f}% of copy), copy {row['copy_ms']:.4f} ms", flush=True)
        for other in ("chunk", "rows"):
            if other != row["config"][0]:
                ms = time_fn(lambda: triton_linoss_scan(*a, out=out, kernel=other), "cuda",
                             cuda_graph=True, budget_s=1.0).median_ms
                row[f"{other}_kernel_ms"] = ms
                print(f"  B={B} T={T} P={P}: the {other} kernel instead: {ms:.4f} ms", flush=True)
        c_out = compiled(*a)
        row["compiled_err"] = check_sample(a, c_out)
        row["compiled_ms"] = time_fn(lambda: compiled(*a), "cuda", cuda_graph=True).median_ms
        del c_out
        torch.cuda.empty_cache()
        if not args.no_seed_loop:
            s_out = seed_step_loop(*a)
            row["seed_err"] = check_sample(a, s_out)
            del s_out
            row["seed_loop_ms"] = time_fn(lambda: seed_step_loop(*a), "cuda", min_repeats=3,
                                          max_repeats=5, warmup=1, budget_s=5.0).median_ms
            row["x_vs_seed"] = row["seed_loop_ms"] / row["kernel_ms"]
        row["x_vs_compiled"] = row["compiled_ms"] / row["kernel_ms"]
        if args.sweep:
            best = []
            for kind in ("chunk", "rows"):
                for bt, bp, nw in [(16, 32, 1), (16, 64, 2), (16, 128, 4), (8, 32, 1),
                                   (32, 32, 2), (32, 64, 4)]:
                    try:
                        f = lambda: triton_linoss_scan(*a, out=out, kernel=kind, block_t=bt,  # noqa: E731
                                                       block_p=bp, num_warps=nw)
                        f()
                        ms = time_fn(f, "cuda", cuda_graph=True, budget_s=0.3).median_ms
                    except Exception as exc:  # noqa: BLE001 - report configs that fail
                        print(f"  {kind} {bt},{bp},{nw} failed: {type(exc).__name__}"[:200])
                        continue
                    best.append((round(ms, 5), kind, bt, bp, nw))
            best.sort()
            row["sweep_top"] = best[:8]
            print(f"  sweep B={B} T={T} P={P}: (ms, kernel, BT, BP, warps) {best[:6]}", flush=True)
        results.append(row)
        print(f"  B={B} T={T} P={P}: compiled scan {row['compiled_ms']:.4f} ms "
              f"(kernel {row['x_vs_compiled']:.1f}x faster), seed loop "
              f"{row.get('seed_loop_ms', float('nan')):.2f} ms "
              f"(kernel {row.get('x_vs_seed', float('nan')):.0f}x faster), errors vs float64: "
              f"kernel {row['kernel_err']:.1e} compiled {row['compiled_err']:.1e}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"gpu": torch.cuda.get_device_name(), "sizes": results}, fh, indent=2)
        del a, out
        torch.cuda.empty_cache()
    print("GPU times are medians of CUDA-graph replays (the seed loop: eager, few repeats)")
    print(f"{'B':>4} {'T':>6} {'P':>4} {'MB':>6} {'kernel':>6} {'copy ms':>8} {'ms':>8} "
          f"{'%copy':>6} {'compiled':>9} {'x':>6} {'seed loop':>10} {'x':>7} {'err':>8}")
    for r in results:
        print(f"{r['B']:>4} {r['T']:>6} {r['P']:>4} {r['bytes'] / 1e6:>6.0f} {r['config'][0]:>6} "
              f"{r['copy_ms']:>8.4f} {r['kernel_ms']:>8.4f} {r['kernel_pct_copy']:>5.0f}% "
              f"{r['compiled_ms']:>9.4f} {r['x_vs_compiled']:>6.1f} "
              f"{r.get('seed_loop_ms', float('nan')):>10.2f} {r.get('x_vs_seed', float('nan')):>7.0f} "
              f"{r['kernel_err']:>8.1e}")
    large = [r for r in results if r["bytes"] >= 1e9]
    print("targets: >= 80% of copy at >= 1 GB:",
          ", ".join(f"B={r['B']} T={r['T']} {r['kernel_pct_copy']:.0f}%" for r in large),
          "| >= 3x compiled scan:", ", ".join(f"{r['x_vs_compiled']:.1f}x" for r in results))


if __name__ == "__main__":
    main()
