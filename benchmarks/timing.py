"""Per-call latency helpers for the benchmarks: synchronous percentiles and asynchronous mean.

Two views of one call's cost, both measured with ``time.perf_counter_ns`` on the host:

- *sync*: each sample is one call followed by a device synchronize, so it is the latency a
  caller sees when it needs the result right away (host overhead + GPU time + sync). Reported
  as median (p50) and p99 over the samples.
- *async*: ``iters`` calls back to back, then one synchronize; total / iters. When host
  overhead is smaller than GPU time, launches overlap the previous call's kernels and this
  approaches GPU time; when it is larger, this is the host overhead.

The helpers take zero-argument callables and drop whatever they return *before* the next
call: graph replays hand back the same output buffers every time, and a live output from the
previous call can change what a tree manager does next (it must not overwrite live outputs).

On a CPU-only run ``sync`` defaults to doing nothing, so the same code serves smoke runs.
The garbage collector is paused while a loop runs (as ``timeit`` does): a collection landing
in one path's loop and not another's would show up as a difference between paths.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


def default_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` once CUDA is initialized in this process, else a no-op."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an already sorted, non-empty list."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_samples)))
    return sorted_samples[rank - 1]


@dataclass(frozen=True)
class SyncStats:
    """Synchronous per-call latency, in microseconds."""

    p50_us: float
    p99_us: float
    mean_us: float
    min_us: float
    iters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _GcPaused:
    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()


def sync_samples_ns(
    fn: Callable[[], Any],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> list[int]:
    """Nanoseconds of ``iters`` samples of (``fn()`` + ``sync()``), after ``warmup`` untimed calls."""
    if iters < 1:
        raise ValueError("iters must be at least 1")
    sync = sync or default_sync()
    for _ in range(warmup):
        fn()
    sync()
    samples = [0] * iters
    clock = time.perf_counter_ns
    with _GcPaused():
        for i in range(iters):
            start = clock()
            fn()
            sync()
            samples[i] = clock() - start
    return samples


def summarize_ns(samples_ns: list[int]) -> SyncStats:
    """p50 / p99 / mean / min of nanosecond samples, in microseconds."""
    ordered = sorted(s / 1000.0 for s in samples_ns)
    return SyncStats(
        p50_us=statistics.median(ordered),
        p99_us=percentile(ordered, 99),
        mean_us=statistics.fmean(ordered),
        min_us=ordered[0],
        iters=len(ordered),
    )


def sync_stats(
    fn: Callable[[], Any],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> SyncStats:
    """Median, p99, mean and min of (call + synchronize), in microseconds."""
    return summarize_ns(sync_samples_ns(fn, iters, warmup, sync))


def sync_p50(
    fn: Callable[[], Any],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> float:
    """Median over ``iters`` of (call + synchronize), in microseconds."""
    return sync_stats(fn, iters, warmup, sync).p50_us


def sync_p99(
    fn: Callable[[], Any],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> float:
    """99th percentile over ``iters`` of (call + synchronize), in microseconds."""
    return sync_stats(fn, iters, warmup, sync).p99_us


def async_mean(
    fn: Callable[[], Any],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> float:
    """Mean per-call time of ``iters`` back-to-back calls and one final synchronize, in us."""
    if iters < 1:
        raise ValueError("iters must be at least 1")
    sync = sync or default_sync()
    for _ in range(warmup):
        fn()
    # Start from an idle device so that the warmup's queued work is not billed to the loop.
    sync()
    clock = time.perf_counter_ns
    with _GcPaused():
        start = clock()
        for _ in range(iters):
            fn()
        sync()
        elapsed = clock() - start
    return elapsed / iters / 1000.0


def timed_calls_ms(
    fn: Callable[[], Any],
    count: int,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Wall time of each of the first ``count`` calls (each synchronized), in milliseconds.

    Used for cold start: for a tree manager the first calls are warmup, record, first replay;
    for ``torch.compile`` the first call also compiles.
    """
    sync = sync or default_sync()
    sync()
    times: list[float] = []
    for _ in range(count):
        start = time.perf_counter_ns()
        fn()
        sync()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times
