"""Benchmarks timed by the judge: the learner's calls over the channel, the judge's own clock.

A kernel cannot report its own time. :func:`speedup` times two candidates interleaved (warm-up, several
rounds, medians; :func:`course_lib.bench.compare`'s rules) where each candidate is a closure that makes
one channel request, usually a batch of calls on fresh inputs (:meth:`Session.many`), so the channel's
fixed cost is spread over many calls and memoised answers cannot help. Around the measurement it times a
fixed calibration workload in the judge: when that workload's time moved, or the candidates' spreads are
wide, the machine was busy and the measurement is repeated; a verdict that stays unclear is
*inconclusive* (the submission is regraded later), never a lost point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from course_judge.verdict import Inconclusive
from course_lib.bench import Timing, compare, threads


def _calibration() -> float:
    """Seconds of a fixed judge-side workload (a few small matmuls), median of 5."""
    a = torch.randn(192, 192, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(8):
            a = torch.tanh(a @ a)
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[2]


@dataclass
class Speedup:
    ratio: float
    slow: Timing
    fast: Timing
    attempts: int
    quiet: bool

    def __str__(self) -> str:
        return f"{self.ratio:.1f}x ({self.slow}; {self.fast}; {self.attempts} attempt(s){'' if self.quiet else ', busy machine'})"


def speedup(slow: Callable[[], object], fast: Callable[[], object], *, threshold: float, warmup: int = 1, repeats: int = 5,
            attempts: int = 3, max_spread: float = 0.25, max_drift: float = 0.3, n_threads: int = 1) -> Speedup:
    """How many times faster ``fast`` is than ``slow``, decided against ``threshold``.

    Returns when the measurement is conclusive (clearly above, or below on a quiet machine); raises
    :class:`Inconclusive` when every attempt was disturbed and none cleared the threshold.
    """
    last = None
    for attempt in range(1, attempts + 1):
        with threads(n_threads):
            before = _calibration()
            r = compare({"slow": slow, "fast": fast}, warmup=warmup, repeats=repeats)
            after = _calibration()
        drift = abs(after - before) / min(after, before)
        quiet = drift <= max_drift and r["slow"].spread <= max_spread and r["fast"].spread <= max_spread
        last = Speedup(r["slow"].median / r["fast"].median, r["slow"], r["fast"], attempt, quiet)
        if last.ratio >= threshold or quiet:
            return last
    raise Inconclusive(f"the timings were disturbed by other work on the machine in {attempts} attempts "
                       f"(last: {last}); the benchmark will be regraded")
