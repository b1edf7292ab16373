"""Profile cgtree's replay hot path: where the per-call microseconds go, by function.

    python benchmarks/profile_replay.py [--device cuda:0] [--calls 5000]

Prints cProfile's top entries for steady-state replays of the tiny model (parameters as
static inputs, the activation copied), plus the mean call time with and without profiling.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.models import build_model  # noqa: E402
from cgtree.manager import TreeManager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    model = build_model(args.model, torch.device(args.device))
    mgr = TreeManager(args.device)
    static = tuple(range(model.num_static))
    graphed = mgr.cudagraphify(model.forward_flat, [*model.static_tensors, *model.inputs], static_input_idxs=static)
    inputs = [*model.static_tensors, *model.inputs]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for _ in range(10):
            graphed(*inputs)
        sync()
        start = time.perf_counter()
        for _ in range(args.calls):
            graphed(*inputs)
        sync()
        plain = (time.perf_counter() - start) / args.calls * 1e6
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            graphed(*inputs)
        sync()
        profiler.disable()
    print(f"{args.model} on {args.device}: {plain:.1f} us per call (async, no profiler); mode {mgr.last_execution.mode.value}")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
    mgr.close()


if __name__ == "__main__":
    main()
