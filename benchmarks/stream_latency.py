"""Streaming step latency of the torch engine: one step of an exported model per call,
synchronised, as a real-time caller sees it.

    python benchmarks/stream_latency.py [ARCH] [PRESET] [--steps N]

Exports ARCH/PRESET with its one-step graph into a temporary folder, opens
``seqdeploy.streaming.open_stream(..., engine="torch")`` at B=1 and times ``step`` (each call
followed by a CUDA synchronise), with and without per-step value checks (NaN / range, which
synchronise). Prints the median / p90 / p99 microseconds per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from seqdeploy import pipeline
from seqdeploy.plugins import load_registry
from seqdeploy.streaming import open_stream


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("arch", nargs="?", default="cfc")
    parser.add_argument("preset", nargs="?", default="seed")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()
    registry = load_registry()
    arch = registry.architecture(args.arch)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        artifact = pipeline.export(registry, args.arch, args.preset, root, streaming=True)
        config = artifact.manifest["config"]
        for precision, check in (("fp32", True), ("fp16", True), ("fp32", False), ("fp16", False)):
            stream = open_stream(artifact.dir, engine="torch", precision=precision, registry=registry,
                                 check_values=check)
            inputs = arch.make_inputs(config, 1, args.steps, seed=1)
            dtype = torch.float16 if precision == "fp16" else torch.float32
            frames = [{k: v.select(1, t).to(dtype if v.is_floating_point() else v.dtype).cuda()
                       for k, v in inputs.items() if k not in arch.state_map}
                      for t in range(args.steps)]
            stream.reset(batch=1)
            for f in frames[:50]:
                stream.step(f)
            torch.cuda.synchronize()
            samples = []
            for f in frames:
                t0 = time.perf_counter()
                stream.step(f)
                torch.cuda.synchronize()
                samples.append((time.perf_counter() - t0) * 1e6)
            xs = sorted(samples)
            key = f"{precision}{'' if check else '-nocheck'}"
            results[key] = {"median_us": statistics.median(xs), "p90_us": xs[int(0.9 * len(xs))],
                                  "p99_us": xs[int(0.99 * len(xs))], "steps": len(xs)}
            r = results[key]
            print(f"{args.arch}/{args.preset} torch {precision} B=1 check_values={check}: step median "
                  f"{r['median_us']:.1f} us, p90 {r['p90_us']:.1f} us, p99 {r['p99_us']:.1f} us "
                  f"over {len(xs)} steps", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "arch": args.arch, "preset": args.preset,
                       **results}, fh, indent=2)


if __name__ == "__main__":
    main()
