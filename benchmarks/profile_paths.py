#!/usr/bin/env python3
"""Where an in-process call's time goes: ``backend="cgtree"`` against ``mode="reduce-overhead"``
on one of ``benchmarks/real_models.py``'s models, side by side in one process.

For each path: the model compiled with the path's defaults, warmed up (``--warmup`` calls),
then

- **p50**: sync p50 over ``--iters`` calls (``benchmarks/timing.py``'s way: call, synchronize);
- **profiler**: ``torch.profiler`` over ``--profile-calls`` calls, the top host-side entries by
  self CPU time, with their count per call (kernel launches, copies, graph launches), and the
  device time per call with its top kernels;
- **cProfile**: the top Python functions by own time over ``--iters`` calls (per call, in us).

Prints everything and writes ``--out`` (a text file) and ``--json`` (p50s and per-call counts).

    python3 benchmarks/profile_paths.py --model gpt2 --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.real_models import CASES  # noqa: E402


def _compiled(path: str, module: torch.nn.Module):
    if path == "reduce-overhead":
        return torch.compile(module, mode="reduce-overhead")
    import cgtree.compile  # noqa: F401 - registers backend="cgtree"

    return torch.compile(module, backend="cgtree")


def _p50_us(call, sync, iters: int) -> float:
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def profile_path(name: str, path: str, device: torch.device, args: argparse.Namespace, report: io.StringIO) -> dict:
    torch._dynamo.reset()
    built = CASES[name].build(device)
    fn = _compiled(path, built.module)
    inputs, kwargs = built.inputs(0), built.kwargs(0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def call():
        fn(*inputs, **kwargs)

    with torch.no_grad():
        for _ in range(args.warmup):
            call()
        sync()
        p50 = _p50_us(call, sync, args.iters)

        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_calls):
                call()
            sync()
        averages = prof.key_averages()
        rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
        counts = {row.key: row.count / args.profile_calls for row in rows}
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / args.profile_calls
        kernels = sorted((e for e in averages if getattr(e, "self_device_time_total", 0.0) > 0),
                         key=lambda e: e.self_device_time_total, reverse=True)[:args.top]

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.iters):
            call()
        sync()
        profiler.disable()

    print(f"\n=== {name} / {path}: sync p50 {p50:.1f} us", file=report)
    print(f"--- torch.profiler, {args.profile_calls} calls: self CPU us per call, count per call", file=report)
    for row in rows:
        print(f"{row.self_cpu_time_total / args.profile_calls:9.1f} us {row.count / args.profile_calls:7.2f}x  {row.key[:90]}",
              file=report)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"--- device time {device_us:.1f} us per call; top entries by device time (us per call, count per call)",
          file=report)
    for row in kernels:
        print(f"{row.self_device_time_total / args.profile_calls:9.1f} us {row.count / args.profile_calls:7.2f}x  "
              f"{row.key[:90]}", file=report)
    print(f"--- cProfile, {args.iters} calls (seconds in total)", file=report)
    print(text.getvalue(), file=report)
    return {"p50_us": p50, "device_us_per_call": device_us, "profiler_counts_per_call": counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help=f"one of {', '.join(CASES)}")
    parser.add_argument("--models", help="comma-separated; overrides --model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", default="reduce-overhead,cgtree")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--profile-calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="profile_paths.txt")
    parser.add_argument("--json", default="profile_paths.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    report = io.StringIO()
    results = {}
    for name in (args.models or args.model).split(","):
        for path in args.paths.split(","):
            try:
                results[f"{name}/{path}"] = profile_path(name, path, device, args, report)
            except Exception as exc:  # noqa: BLE001 - one path failing still reports the others
                print(f"\n=== {name} / {path}: FAILED {type(exc).__name__}: {exc}", file=report)
    print(report.getvalue())
    with open(args.out, "w") as handle:
        handle.write(report.getvalue())
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    for key, value in results.items():
        print(f"{key:32} p50 {value['p50_us']:8.1f} us, device {value['device_us_per_call']:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
