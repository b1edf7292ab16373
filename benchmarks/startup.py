#!/usr/bin/env python3
"""cgtreed's start-up: exec to READY, phase by phase, then what its first requests cost.

After a crash, clients wait for the restarted daemon's READY and then for its first answers, so
both count (issue 14). Each of ``--runs`` starts of a fresh ``cgtreed`` on ``--device``:

- READY, timed from outside as systemd sees it: exec to the ``READY=1`` datagram on
  ``$NOTIFY_SOCKET`` (``benchmarks/chaos.py``'s stand-in);
- its phases, from the daemon's own "serving" log line (``cgtree.daemon.startup``):
  ``interpreter`` (exec to cgtreed's first line), ``imports`` (torch, ZeroMQ, the daemon's
  modules), ``config``, ``devices`` (CUDA initialization on a GPU), ``warmup`` (where a device
  compiles: inductor's import and the loader warm-up canary), ``bind`` (sockets; a stale
  socket file replaced: every run but the first starts after a SIGKILL, as a restart does),
  ``ready`` (signals, metrics, READY=1);
- its first requests from a client in this process (imports already paid): ``ping``,
  ``hello+register`` (a small MLP, no lowering), then three submits (``warmup``, ``recorded``,
  ``replayed``; CUDA inputs on a GPU).

``--importtime`` adds one start under ``python -X importtime`` and lists the modules that cost
most before READY (cumulative, the first two levels). Prints the tables, writes ``--json``
and ``--md`` (default ``results/startup.json`` / ``.md``). Exit status 2 when a start failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(REPO_ROOT))  # appended: see bench_daemon.py

import torch  # noqa: E402

from benchmarks.bench_daemon import _on_sigterm, stop_all_processes  # noqa: E402
from benchmarks.chaos import DaemonRuns, ReadyListener, daemon_device  # noqa: E402
from benchmarks.report import fmt, write_reports  # noqa: E402
from cgtree.daemon.startup import PHASES  # noqa: E402

CONFIG = """\
[daemon]
log_format = "json"
log_level = "INFO"
"""
REQUESTS = ("ping", "hello+register", "submit 1", "submit 2", "submit 3")
IMPORTS_SHOWN = 15


def daemon_phases(log_path: str, pid: int, timeout_s: float = 10.0) -> dict[str, float]:
    """The ``startup_s`` of the "serving" line daemon ``pid`` wrote (JSON log format); it comes
    right after READY=1, so it may take a moment to appear."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in Path(log_path).read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "startup_s" in entry and f"pid {pid}," in entry.get("msg", ""):
                return entry["startup_s"]
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


def first_requests(endpoint: str, device: torch.device) -> dict[str, Any]:
    """Milliseconds of a new client's first requests to a daemon that just said READY."""
    from cgtree.client import Client
    from cgtree.client.lowering import encode, lower

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval().to(device)
    x = torch.randn(16, 64, device=device)
    encoded = encode(lower(model, [x]))
    times, modes = {}, []
    client = Client(endpoint, timeout_s=120)
    try:
        started = time.perf_counter()
        client.ping()
        times["ping"], started = (time.perf_counter() - started) * 1e3, time.perf_counter()
        handle = client.register(encoded, [x])
        times["hello+register"] = (time.perf_counter() - started) * 1e3
        for number in (1, 2, 3):
            started = time.perf_counter()
            (out,) = client.submit(handle, [x])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[f"submit {number}"] = (time.perf_counter() - started) * 1e3
            modes.append(client.last_execution["mode"])
        torch.testing.assert_close(out, model(x))
    finally:
        client.close(timeout_s=1.0)
    return {"ms": times, "modes": modes}


def slowest_imports(log_path: str) -> list[dict]:
    """From a ``-X importtime`` log: the packages (top-level names, wherever first imported)
    that cost most before the "serving" line, cumulative (a package's own imports included),
    and the cgtree modules that first imported each."""
    rows = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if '"startup_s"' in line:
            break
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match and ("." not in match.group(4) or match.group(4).startswith("cgtree.")):
            rows.append({"module": match.group(4), "cumulative_ms": int(match.group(2)) / 1e3})
    return sorted(rows, key=lambda row: -row["cumulative_ms"])[:IMPORTS_SHOWN]


def run(args: argparse.Namespace, workdir: str, report: dict) -> None:
    listener = ReadyListener(os.path.join(workdir, "notify"))
    daemons = DaemonRuns(workdir, args.daemon_devices, CONFIG, listener)
    try:
        for number in range(args.runs):
            start = daemons.start(args.start_timeout)
            start["phases"] = daemon_phases(daemons.log_path, start["pid"])
            start["requests"] = first_requests(daemons.endpoint, args.torch_device)
            report["runs"].append(start)
            daemons.kill(wait=True)  # the next start finds a stale socket file, as after a crash
        if args.importtime:
            os.makedirs(os.path.join(workdir, "importtime"))
            traced = DaemonRuns(os.path.join(workdir, "importtime"), args.daemon_devices, CONFIG, listener,
                                python=("-X", "importtime"))
            start = traced.start(args.start_timeout)
            daemon_phases(traced.log_path, start["pid"])  # the whole start-up is in the log
            report["imports"] = slowest_imports(traced.log_path)
            traced.stop()
    finally:
        daemons.stop()
        listener.close()


def render_markdown(report: dict) -> str:
    runs = report["runs"]
    lines = [f"# cgtreed start-up on {report['config']['device']}: exec to READY, then the first requests", "",
             "| run | READY (s) | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for number, run in enumerate(runs, 1):
        phases = run.get("phases", {})
        lines.append(f"| {number} | {fmt(run['ready_s'], 2)} | " + " | ".join(fmt(phases.get(p), 2) for p in PHASES) + " |")
    if runs:
        lines.append(f"| median | {fmt(statistics.median(r['ready_s'] for r in runs), 2)} | " + " | ".join(
            fmt(statistics.median(r.get('phases', {}).get(p, 0.0) for r in runs), 2) for p in PHASES) + " |")
        lines += ["", "First requests of a new client right after READY (ms):", "",
                  "| run | " + " | ".join(REQUESTS) + " | modes |", "|---|" + "---|" * (len(REQUESTS) + 1)]
        for number, run in enumerate(runs, 1):
            requests = run["requests"]
            lines.append(f"| {number} | " + " | ".join(fmt(requests["ms"].get(r), 1) for r in REQUESTS)
                         + f" | {', '.join(requests['modes'])} |")
    if report.get("imports"):
        lines += ["", "Costliest imports before READY (`-X importtime`, cumulative):", "", "| module | ms |", "|---|---|"]
        lines += [f"| {row['module']} | {fmt(row['cumulative_ms'], 1)} |" for row in report["imports"]]
    if report.get("failed"):
        lines += ["", f"FAILED: {report['failed']}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--importtime", action="store_true", help="one more start under -X importtime")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "startup.json")
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = daemon_device(args.device)
    if device is None:
        return 2
    args.torch_device, args.daemon_devices = device, str(device)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = tempfile.mkdtemp(prefix="cgts-", dir="/tmp")
    report: dict[str, Any] = {
        "benchmark": "startup", "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"device": str(device), "runs": args.runs, "importtime": args.importtime},
        "runs": [], "imports": [],
    }
    try:
        run(args, workdir, report)
    except (RuntimeError, OSError) as exc:
        report["failed"] = str(exc)
    finally:
        stop_all_processes()
        shutil.rmtree(workdir, ignore_errors=True)
    write_reports(report, render_markdown(report), args.json, args.md)
    return 2 if report.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
