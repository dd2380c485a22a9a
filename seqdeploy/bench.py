"""Timing: CUDA events on the GPU, ``perf_counter`` on the CPU; warm-up, repeat until the
median is stable, then median / p90 / p99. Plus the HBM copy bandwidth measured in the same
run, the yardstick for each recurrence op's achieved GB/s."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SPREAD_WARN = 1.25  # p90 / median above this: the run says its timing is noisy


@dataclass
class Timing:
    samples_ms: list[float] = field(repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def percentile(self, q: float) -> float:
        xs = sorted(self.samples_ms)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    @property
    def spread(self) -> float:
        return self.percentile(90) / self.median_ms if self.median_ms > 0 else 1.0

    def summary(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p90_ms": self.percentile(90),
                "p99_ms": self.percentile(99), "repeats": len(self.samples_ms),
                "spread": self.spread, "noisy": self.spread > SPREAD_WARN}


#: samples a slow call (see :func:`time_fn`) is timed with at the least
SLOW_MIN_REPEATS = 3


def time_fn(fn: Callable[[], Any], device: str, warmup: int = 3, min_repeats: int = 10,
            max_repeats: int = 500, budget_s: float = 3.0, cuda_graph: bool = False) -> Timing:
    """Time ``fn`` until the running median moves less than 2% between rounds of 10
    (or ``max_repeats`` / ``budget_s`` run out). Each sample is one call, synchronised.

    A call slower than ``budget_s / min_repeats`` (the first warm-up call says; a fallback
    engine walking a long recurrence step by step takes seconds) gets no more warm-ups and
    rounds of one sample, at least ``SLOW_MIN_REPEATS`` of them, until stable or over the
    budget: "until stable" in rounds of 10 would take minutes a case there, and the
    result's ``repeats`` says how few it has.

    ``cuda_graph=True`` captures ``fn`` once and times graph replays: GPU time without the
    Python launch overhead, which otherwise dominates kernels of a few microseconds."""
    cuda = device == "cuda"
    rounds = 10
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:     # the first call, synchronised, says whether the call is slow
            if cuda:
                torch.cuda.synchronize()
            if time.perf_counter() - t0 > budget_s / min_repeats:
                rounds, min_repeats = 1, min(min_repeats, SLOW_MIN_REPEATS)
                break
    if cuda:
        torch.cuda.synchronize()
    if cuda and cuda_graph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()                                  # allocations settle outside the capture
            with torch.cuda.graph(graph):
                fn()
        torch.cuda.synchronize()
        fn = graph.replay
    samples: list[float] = []
    start_all = time.perf_counter()
    last_median = None
    while len(samples) < max_repeats:
        for _ in range(rounds):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        median = statistics.median(samples)
        if len(samples) >= min_repeats and last_median is not None and \
                abs(median - last_median) <= 0.02 * last_median:
            break
        if time.perf_counter() - start_all > budget_s and len(samples) >= min_repeats:
            break
        last_median = median
    return Timing(samples)


def hbm_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write), measured now. None on CPU."""
    if device != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), "cuda", warmup=5, min_repeats=20)
    del src, dst
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


@dataclass
class OpBenchmark:
    """One recurrence op alone at the model's shapes: ``call()`` runs it, ``bytes_moved`` is
    its minimum HBM traffic (inputs read once, outputs written once)."""

    op: str
    call: Callable[[], Any]
    bytes_moved: int
    shape: str


def bench_op(case: OpBenchmark, device: str, hbm_gbs: float | None) -> dict[str, Any]:
    timing = time_fn(case.call, device, cuda_graph=True)
    gbs = case.bytes_moved / (timing.median_ms * 1e-3) / 1e9
    result = {"op": case.op, "shape": case.shape, "bytes": case.bytes_moved,
              **timing.summary(), "gb_s": gbs}
    if hbm_gbs:
        result["hbm_fraction"] = gbs / hbm_gbs
        result["roofline_ms"] = case.bytes_moved / (hbm_gbs * 1e9) * 1e3
    return result
