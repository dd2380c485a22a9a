"""seqdeploy.bench.time_fn: how many calls a case gets (never how fast anything is)."""
from __future__ import annotations

import time

from seqdeploy.bench import SLOW_MIN_REPEATS, time_fn


class Counted:
    """A callable that sleeps ``seconds`` and counts its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)


def test_fast_calls_get_the_warm_ups_and_rounds_of_ten():
    fn = Counted(0.0)
    timing = time_fn(fn, "cpu", warmup=3, min_repeats=10, budget_s=0.5)
    assert len(timing.samples_ms) >= 10 and len(timing.samples_ms) % 10 == 0
    assert fn.calls == 3 + len(timing.samples_ms)


def test_a_slow_call_is_timed_a_few_times_within_the_budget():
    """A call over budget / min_repeats (50 ms against 0.2 s / 10): one warm-up, then single
    samples until stable or over the budget, at least SLOW_MIN_REPEATS, far fewer than the
    3 + 10 a fast call gets."""
    fn = Counted(0.05)
    timing = time_fn(fn, "cpu", warmup=3, min_repeats=10, budget_s=0.2)
    n = len(timing.samples_ms)
    assert SLOW_MIN_REPEATS <= n <= 8, n
    assert fn.calls == 1 + n
    assert all(s >= 45.0 for s in timing.samples_ms)      # each sample is one whole call
    assert timing.summary()["repeats"] == n
