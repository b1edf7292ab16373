#!/usr/bin/env python3
"""How fast a doorbell page carries "done" to another process (``cgtree.daemon.doorbell``).

Uses the daemon's own ``Doorbell`` (the page, its CUDA registration, ``signal_done``) and a
child process that maps the same memfd and spins on the done word, as a client does.

Rows:
- ``signal cost``: CPU time of ``Doorbell.signal_done`` per call: on CUDA the fill kernel that
  writes the done word behind the stream's work; on the CPU a store.
- ``seen by the other process``: the child's time of seeing the done word minus this
  process's time of its own completion wait returning (``torch.cuda.Event.synchronize`` after
  the same work; on the CPU, the store itself). Negative: the other process knew first.
- ``page round trip``: this process stores a word, the child answers in another word, this
  process sees the answer (the CPU floor under a rung plan run, no GPU work).

    python3 benchmarks/doorbell_latency.py [--iters 500] [--json results/doorbell.json]

Prints a table (microseconds) and writes JSON (smoke test: tests/test_doorbell_latency_smoke.py). Numbers depend on the host: run it on the
machine you care about. On a machine without CUDA only the CPU rows are measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(REPO_ROOT))  # appended: an installed cgtree wins over the bare folder

import torch  # noqa: E402

from cgtree.daemon.doorbell import AWAKE, MAX_DEVICES, Doorbell, done_word, map_page, unmap_page  # noqa: E402

# The round trip's two words: the done words of devices no host here has.
PING_WORD, ECHO_WORD = done_word(MAX_DEVICES - 2), done_word(MAX_DEVICES - 1)
TIMEOUT_S = 10.0


def _percentiles(samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)  # noqa: E731
    return {"p10_us": pick(0.1), "p50_us": pick(0.5), "p90_us": pick(0.9), "n": len(ordered)}


def _child(fd: int, word: int, iters: int, results) -> None:
    """Spin on ``word`` for 1..iters; stamp each sighting, then echo it.

    The echo is the parent's cue for the next value: without it a busy host that keeps the
    child off a core lets the parent overwrite a value the child never saw."""
    page, words = map_page(fd)
    seen = []
    words[AWAKE] = 1  # "ready"
    for value in range(1, iters + 1):
        deadline = time.perf_counter() + TIMEOUT_S
        while words[word] != value:
            if time.perf_counter() > deadline:
                results.put(("stuck", value))
                return
        seen.append(time.perf_counter())
        words[ECHO_WORD] = value
    results.put(("ok", seen))
    unmap_page(page, words)


def _wait_for_echo(doorbell: Doorbell, value: int) -> None:
    deadline = time.perf_counter() + TIMEOUT_S
    while doorbell.words[ECHO_WORD] != value:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the child never echoed value {value}")


def _run_child(doorbell: Doorbell, fd: int, word: int, iters: int, drive) -> list:
    context = multiprocessing.get_context("fork")  # the child touches no CUDA: only the page
    results = context.Queue()
    child = context.Process(target=_child, args=(fd, word, iters, results), daemon=True)
    doorbell.words[AWAKE] = 0
    doorbell.words[word] = 0
    doorbell.words[ECHO_WORD] = 0
    child.start()
    deadline = time.perf_counter() + TIMEOUT_S
    while doorbell.words[AWAKE] != 1:
        if time.perf_counter() > deadline:
            raise RuntimeError("the child process did not map the page")
    mine = drive()
    status, seen = results.get(timeout=TIMEOUT_S)
    child.join(TIMEOUT_S)
    if status != "ok":
        raise RuntimeError(f"the child never saw value {seen}")
    return [(s - m) * 1e6 for s, m in zip(seen, mine)]


def measure(device: str, iters: int) -> dict:
    cuda = device.startswith("cuda")
    doorbell = Doorbell([device] if cuda else [])
    fd = os.dup(doorbell.fd)
    doorbell.handed_over()
    runtime = types.SimpleNamespace(is_cuda=cuda, device=torch.device(device))
    index = runtime.device.index if cuda else 0
    rows = {}
    try:
        # signal cost
        costs = []
        for value in range(1, iters + 1):
            started = time.perf_counter()
            doorbell.signal_done(runtime, value)
            costs.append((time.perf_counter() - started) * 1e6)
        if cuda:
            torch.cuda.synchronize(device)
        rows["signal cost"] = _percentiles(costs)

        # seen by the other process, behind GPU work (or right after a CPU store)
        work = torch.randn(1024, 1024, device=device) if cuda else None

        def drive_done() -> list:
            mine = []
            for value in range(1, iters + 1):
                if cuda:
                    for _ in range(3):
                        torch.mm(work, work, out=torch.empty_like(work))
                    event = torch.cuda.Event()
                    event.record()
                    doorbell.signal_done(runtime, value)
                    event.synchronize()
                else:
                    doorbell.signal_done(runtime, value)
                mine.append(time.perf_counter())
                deadline = time.perf_counter() + TIMEOUT_S
                while doorbell.words[done_word(index)] != value:  # the next only after this one
                    if time.perf_counter() > deadline:
                        raise RuntimeError("the done word was never written")
                _wait_for_echo(doorbell, value)  # and only once the child has stamped it
            return mine

        rows["seen by the other process"] = _percentiles(_run_child(doorbell, fd, done_word(index), iters, drive_done))

        # page round trip (CPU stores both ways)
        def drive_round_trip() -> list:
            mine, trips = [], []
            for value in range(1, iters + 1):
                started = time.perf_counter()
                doorbell.words[PING_WORD] = value
                _wait_for_echo(doorbell, value)
                trips.append((time.perf_counter() - started) * 1e6)
                mine.append(started)
            rows["page round trip"] = _percentiles(trips)
            return mine

        _run_child(doorbell, fd, PING_WORD, iters, drive_round_trip)
    finally:
        os.close(fd)
        if cuda:
            torch.cuda.synchronize(device)
        doorbell.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 when there is one)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "doorbell_latency.json")
    args = parser.parse_args(argv)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    rows = measure(device, args.iters)
    print(f"doorbell page on {device} ({torch.cuda.get_device_name(device) if device.startswith('cuda') else 'CPU stores'}), "
          f"{args.iters} samples per row, microseconds")
    print("| row | p10 | p50 | p90 |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['p10_us']} | {row['p50_us']} | {row['p90_us']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "doorbell_latency", "device": device, "torch": torch.__version__,
                                     "iters": args.iters, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
