"""One side of a before/after comparison of ``cfc_scan`` on the GPU: whichever
``seqdeploy_cfc`` is first on ``sys.path`` (benchmarks/cfc_gpu.sh puts an extracted copy of
an older tree there for "before").

    python benchmarks/cfc_ab.py LABEL OUTDIR [--compare OTHER_OUTDIR]

Times the op as models call it (``seqdeploy.ops.call``) at the seed's four points in fp16
and at one streaming step (B=1, T=1, H=256): ``eager`` (one call between two CUDA events,
synchronised: latency, host overhead included) and ``graph`` (one CUDA-graph replay: GPU
time), the median of ``REPEATS`` samples each. Saves the op's outputs at those points and
at ``CHECKS`` (fp32 / fp16 / bf16, odd shapes) under OUTDIR, and with ``--compare`` reports
which are bit for bit equal to OTHER_OUTDIR's. Inputs are the same on every run (seeded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

POINTS = [(32, 10, 256), (64, 50, 256), (128, 100, 256), (256, 50, 512), (1, 1, 256)]
#: outputs compared: every point in fp16 and bf16 (wgmma; split for one step), fp32 at the
#: H=256 points (the Triton cluster split) and odd shapes (partial blocks: rows, split)
CHECKS = [(B, T, H, dtype) for (B, T, H) in POINTS for dtype in ("float16", "bfloat16")] + \
    [(B, T, H, "float32") for (B, T, H) in POINTS[:3] + [(1, 1, 256)]] + \
    [(B, T, H, dtype) for (B, T, H) in [(20, 33, 200), (5, 9, 40), (3, 1, 512)]
     for dtype in ("float32", "float16")]
REPEATS = 300


def make(B, T, H, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xw = torch.randn(B, T, H, device="cuda", generator=g).to(dtype)
    h0 = (0.5 * torch.randn(B, H, device="cuda", generator=g)).to(dtype)
    w_rec = (torch.randn(H, H, device="cuda", generator=g) / math.sqrt(H)).to(dtype)
    tau = F.softplus(2.0 * torch.randn(H, device="cuda", generator=g)) + 0.01
    return xw, h0, w_rec, tau


def median_ms(fn, graph: bool) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    if graph:
        g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            with torch.cuda.graph(g):
                fn()
        torch.cuda.synchronize()
        fn = g.replay
    samples = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("label")
    parser.add_argument("outdir")
    parser.add_argument("--compare", help="another run's OUTDIR: report bit-for-bit equality")
    args = parser.parse_args()
    import seqdeploy_cfc
    from seqdeploy.ops import call
    from seqdeploy_cfc.model import CFC_SCAN

    os.makedirs(args.outdir, exist_ok=True)
    where = os.path.dirname(seqdeploy_cfc.__file__)
    print(f"[{args.label}] {torch.cuda.get_device_name()} seqdeploy_cfc from {where}",
          flush=True)
    expect = os.environ.get("CFC_AB_EXPECT")   # the tree this side must import from
    if expect and not os.path.realpath(where).startswith(os.path.realpath(expect)):
        raise SystemExit(f"[{args.label}] seqdeploy_cfc is not from {expect}")
    result = {"label": args.label, "gpu": torch.cuda.get_device_name(), "plugin": where,
              "points": [], "equal": {}}
    for B, T, H, dtype in CHECKS:
        inputs = make(B, T, H, getattr(torch, dtype))
        y = call(CFC_SCAN, *inputs, 1.0)
        torch.save(y.cpu(), os.path.join(args.outdir, f"y_{B}_{T}_{H}_{dtype}.pt"))
    for B, T, H in POINTS:
        inputs = make(B, T, H, torch.float16)
        fn = lambda: call(CFC_SCAN, *inputs, 1.0)  # noqa: E731
        row = {"B": B, "T": T, "H": H, "eager_ms": median_ms(fn, False),
               "graph_ms": median_ms(fn, True)}
        result["points"].append(row)
        print(f"[{args.label}] B={B} T={T} H={H} fp16: eager {row['eager_ms'] * 1e3:.1f} us, "
              f"graph {row['graph_ms'] * 1e3:.1f} us", flush=True)
    if args.compare:
        for B, T, H, dtype in CHECKS:
            name = f"y_{B}_{T}_{H}_{dtype}.pt"
            mine = torch.load(os.path.join(args.outdir, name))
            if not os.path.exists(os.path.join(args.compare, name)):
                print(f"[{args.label}] {name}: nothing to compare with", flush=True)
                continue
            other = torch.load(os.path.join(args.compare, name))
            same = torch.equal(mine.view(torch.uint8), other.view(torch.uint8))   # NaNs too
            result["equal"][name] = same
            gap = float((mine.double() - other.double()).abs().max())
            diff = "" if same else f" max abs diff {gap:.3g}"
            print(f"[{args.label}] {name}: {'bit for bit equal' if same else 'DIFFERS'}{diff}",
                  flush=True)
    with open(os.path.join(args.outdir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
