#!/usr/bin/env python3
"""Soak cgtreed with fuzzed messages on every channel while a well-behaved client submits
throughout (issue 14). One run starts its own ``cgtreed`` (doorbells on, so the doorbell page
is fuzzed on a CPU daemon too), a well-behaved client process, and sends ``--messages`` fuzzed
messages from this process with the hostile client of ``benchmarks/hostile.py``: ZeroMQ
envelopes, bodies of every command, lane datagrams (plan requests, kicks), lane handshakes,
doorbell page writes, and floods nobody reads. Prints a table per channel, writes JSON
(``--json``) and markdown (``--md``), and kills every process it started when it ends.

    python3 benchmarks/soak_fuzz.py --messages 100000 --device cpu
    python3 benchmarks/soak_fuzz.py --messages 100000 --device cuda --time-budget 480   # on a GPU host

What it checks (``hostile.py`` has the per-message properties):
- every message the protocol answers is answered in time with a well-formed reply, the
  request id echoed, an error code of the table and never ``internal``;
- the daemon never dies or hangs (a case that gets no answer is a finding; after the run the
  daemon's ``internal_errors`` counter is 0, its log holds no traceback, and a SIGTERM stops it
  cleanly with status 0);
- the well-behaved client (its own process; on CUDA with CUDA inputs in fixed buffers, so its
  steady loop runs prepared submits rung on its doorbell, plan ids the fuzzer's plan requests
  guess at) gets eager's results on every submit, and its latency is reported beside its
  latency before the fuzzing started;
- the hostile client's sessions stay bounded (it speaks from a fixed set of identities), and
  the daemon's memory is reported before and after.

A flood counts as the number of requests it sends; every other case as one message. Exit
status: 0 nothing found, 2 a finding (listed in the report), 1 the run could not start.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: the repository's benchmarks package, appended
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # (never ahead of the installed cgtree)

from benchmarks import hostile  # noqa: E402
from benchmarks.bench_daemon import Daemon, child_env, python_argv, spawn, stop_all_processes, stop_process  # noqa: E402

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DAEMON_CONFIG = f"""\
[policy]
move_cpu_inputs_to_device = true

[daemon]
max_message_bytes = {MAX_MESSAGE_BYTES}
reap_interval_s = 0.2
session_timeout_s = 600.0
shutdown_timeout_s = 15.0
log_level = "INFO"
doorbell = "on"
"""
# Cases per channel, relative. A flood is a few hundred requests: rare, so that it is a tenth
# or so of the messages.
WEIGHTS = {"envelope": 20, "body": 30, "lane": 25, "handshake": 8, "doorbell": 12, "flood": 0.12}
MAX_FINDINGS_KEPT = 50
GOOD_BASELINE_SUBMITS = 200


# ------------------------------------------------------------------------- the good client


def good_client_main(endpoint: str, device: str, out_path: str) -> int:
    """Submit until SIGTERM, each result checked against eager; write the figures as JSON."""
    import torch

    from cgtree.client import Client

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).to(device).eval()
    x = torch.randn(8, 64, device=device)  # one buffer, refilled: a steady loop (plans on CUDA)
    figures: dict[str, Any] = {"submits": 0, "mismatches": 0, "errors": 0, "first_problem": None, "modes": collections.Counter(),
                               "baseline_ms": [], "during_ms": []}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # Inductor's kernels (a CUDA daemon compiles) sum in another order than eager: a result from
    # another session or a stale buffer is off by far more.
    rtol, atol = (1e-3, 1e-4) if device.startswith("cuda") else (1e-4, 1e-5)
    with Client(endpoint, session="good", timeout_s=60) as client, torch.no_grad():
        while not stop:
            x.copy_(torch.randn(8, 64, device=device))
            started = time.perf_counter()
            try:
                (out,) = client.submit(model, [x])
                sync()
                elapsed_ms = (time.perf_counter() - started) * 1e3
                expected = model(x)
                if not torch.allclose(out, expected, rtol=rtol, atol=atol):
                    figures["mismatches"] += 1
                    figures["first_problem"] = figures["first_problem"] or f"max abs diff {float((out - expected).abs().max())}"
            except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported
                figures["errors"] += 1
                figures["first_problem"] = figures["first_problem"] or f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)
                continue
            figures["submits"] += 1
            figures["modes"][(client.last_execution or {}).get("plan") and "plan" or (client.last_execution or {}).get("mode")] += 1
            key = "baseline_ms" if figures["submits"] <= GOOD_BASELINE_SUBMITS else "during_ms"
            figures[key].append(elapsed_ms)
            if figures["submits"] == GOOD_BASELINE_SUBMITS:
                Path(out_path + ".ready").write_text("ready")
    figures["modes"] = dict(figures["modes"])
    for key in ("baseline_ms", "during_ms"):
        samples = figures.pop(key)
        figures[key.replace("_ms", "")] = _latency(samples)
    Path(out_path).write_text(json.dumps(figures))
    return 0


def _latency(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(samples), "p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3), "max_ms": round(ordered[-1], 3)}


# ------------------------------------------------------------------------------- the soak


def run_soak(args: argparse.Namespace, workdir: str) -> dict:
    import psutil

    daemon = Daemon(args.daemon_devices, os.path.join(workdir, "daemon"))
    Path(daemon.config_path).write_text(DAEMON_CONFIG)
    daemon.start()
    rss_before = psutil.Process(daemon.pid).memory_info().rss
    good_out = os.path.join(workdir, "good.json")
    good = spawn([*python_argv(), os.path.abspath(__file__), "--child-good", daemon.endpoint, args.good_device, good_out],
                 env=child_env(), cwd=workdir, stdout=subprocess.DEVNULL, stderr=open(good_out + ".log", "wb"))
    deadline = time.monotonic() + 600  # on CUDA its first register compiles the model
    while not os.path.exists(good_out + ".ready"):  # its baseline, before any fuzzing
        if good.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the good client did not start:\n{Path(good_out + '.log').read_text()[-3000:]}")
        time.sleep(0.1)

    client = hostile.Hostile(daemon.endpoint, max_message_bytes=MAX_MESSAGE_BYTES, reply_timeout_s=args.timeout_s,
                             device=args.daemon_devices, big_frames=True)
    target = client.setup()
    rnd = random.Random(args.seed)
    channels = [c for c in args.channels.split(",") if c]
    weights = [WEIGHTS[c] for c in channels]
    stats = {c: {"cases": 0, "messages": 0, "answered": 0, "codes": collections.Counter(), "findings": 0, "max_case_ms": 0.0}
             for c in channels}
    findings: list[dict] = []
    sent, started, next_report = 0, time.perf_counter(), args.messages / 20
    stopped_early = None
    while sent < args.messages:
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            stopped_early = f"time budget of {args.time_budget:.0f} s spent"
            break
        channel = rnd.choices(channels, weights)[0]
        case = hostile.GENERATORS[channel](rnd, target)
        case_started = time.perf_counter()
        try:
            outcome = client.run(case)
        except Exception as exc:  # noqa: BLE001 - the hostile client's own calls failed: a finding
            outcome = hostile.Outcome(channel, problems=[f"{type(exc).__name__}: {exc} (after {case.describe()})"])
        count = len(case.frames) if channel == "flood" else 1
        sent += count
        row = stats[channel]
        row["cases"] += 1
        row["messages"] += count
        row["answered"] += outcome.answered
        row["codes"][outcome.code or "-"] += 1
        row["max_case_ms"] = max(row["max_case_ms"], (time.perf_counter() - case_started) * 1e3)
        if outcome.problems:
            row["findings"] += 1
            if len(findings) < MAX_FINDINGS_KEPT:
                findings.append({"channel": channel, "message": sent, "problems": outcome.problems[:3]})
        if not daemon.proc or daemon.proc.poll() is not None:
            stopped_early = f"the daemon exited with status {daemon.proc.returncode}"
            findings.append({"channel": channel, "message": sent, "problems": [stopped_early + f" after {case.describe()}"]})
            break
        if sent >= next_report:
            rate = sent / (time.perf_counter() - started)
            print(f"  {sent:,} / {args.messages:,} messages ({rate:,.0f}/s), findings: {sum(r['findings'] for r in stats.values())}",
                  file=sys.stderr, flush=True)
            next_report += args.messages / 20
    duration = time.perf_counter() - started

    stop_process(good, grace_s=30.0)
    good_figures = json.loads(Path(good_out).read_text()) if os.path.exists(good_out) else {
        "error": "the good client wrote no figures", "log": Path(good_out + ".log").read_text()[-2000:]}
    daemon_report: dict[str, Any] = {"alive_after": daemon.proc.poll() is None}
    if daemon_report["alive_after"]:
        status = client.call(1, "status", {})["body"]  # a hostile identity, same uid: sees everything
        daemon_report.update({
            "internal_errors": status["daemon"]["counters"].get("internal_errors"),
            "requests": status["daemon"]["counters"].get("requests"),
            "sessions_after": len(status["sessions"]),
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_after_mib": round(psutil.Process(daemon.pid).memory_info().rss / 2**20, 1),
        })
    client.close()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        daemon_report["exit_status"] = daemon.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon_report["exit_status"] = None
    daemon.stop()
    log = Path(daemon.log_path).read_text(errors="replace")
    daemon_report["log_tracebacks"] = log.count("Traceback")

    failed = [f"{f['channel']}: {f['problems'][0]}" for f in findings]
    if good_figures.get("mismatches") or good_figures.get("errors") or "error" in good_figures:
        failed.append(f"the good client: {good_figures.get('mismatches')} mismatches, {good_figures.get('errors')} errors "
                      f"({good_figures.get('first_problem') or good_figures.get('error')})")
    if daemon_report.get("internal_errors"):
        failed.append(f"the daemon counted {daemon_report['internal_errors']} internal errors")
    if daemon_report["log_tracebacks"]:
        failed.append(f"the daemon log holds {daemon_report['log_tracebacks']} tracebacks")
    if daemon_report.get("exit_status") != 0:
        failed.append(f"the daemon's SIGTERM exit status was {daemon_report.get('exit_status')}")
    for row in stats.values():
        row["codes"] = dict(row["codes"].most_common())
        row["max_case_ms"] = round(row["max_case_ms"], 1)
    return {
        "benchmark": "soak_fuzz", "device": args.device, "seed": args.seed, "messages_asked": args.messages,
        "messages_sent": sent, "duration_s": round(duration, 1), "messages_per_s": round(sent / duration, 1) if duration else None,
        "stopped_early": stopped_early, "channels": stats, "good_client": good_figures, "daemon": daemon_report,
        "findings": findings, "failed": failed, "ok": not failed,
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "benchmarks/soak_fuzz.py", *sys.argv[1:]]),
    }


def render_markdown(report: dict) -> str:
    lines = [f"## cgtreed fuzz soak ({report['device']}, seed {report['seed']})", "",
             f"{report['messages_sent']:,} messages in {report['duration_s']:,} s ({report['messages_per_s']:,}/s)"
             + (f"; stopped early: {report['stopped_early']}" if report["stopped_early"] else ""), "",
             "| channel | cases | messages | answered | findings | slowest case ms | answers (most frequent) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, row in report["channels"].items():
        codes = ", ".join(f"{code} {count}" for code, count in list(row["codes"].items())[:6])
        lines.append(f"| {name} | {row['cases']:,} | {row['messages']:,} | {row['answered']:,} | {row['findings']} | "
                     f"{row['max_case_ms']:,} | {codes} |")
    good = report["good_client"]
    lines += ["", "| well-behaved client | submits | mismatches | errors | p50 ms before / during | p99 ms before / during | max ms during | modes |",
              "|---|---:|---:|---:|---|---|---:|---|",
              f"| good | {good.get('submits', 0):,} | {good.get('mismatches')} | {good.get('errors')} | "
              f"{good.get('baseline', {}).get('p50_ms')} / {good.get('during', {}).get('p50_ms')} | "
              f"{good.get('baseline', {}).get('p99_ms')} / {good.get('during', {}).get('p99_ms')} | "
              f"{good.get('during', {}).get('max_ms')} | {good.get('modes')} |"]
    d = report["daemon"]
    lines += ["", f"daemon: alive after {d.get('alive_after')}, internal errors {d.get('internal_errors')}, "
                  f"requests {d.get('requests')}, sessions after {d.get('sessions_after')}, RSS {d.get('rss_before_mib')} -> "
                  f"{d.get('rss_after_mib')} MiB, tracebacks in log {d.get('log_tracebacks')}, SIGTERM exit {d.get('exit_status')}",
              "", "result: " + ("ok, nothing found" if report["ok"] else "FINDINGS:")]
    lines += [f"- {item}" for item in report["failed"][:20]]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="seconds a message may wait for its answer")
    parser.add_argument("--channels", default=",".join(hostile.CHANNELS))
    parser.add_argument("--time-budget", type=float, default=0.0, help="stop sending after this many seconds (0: none)")
    parser.add_argument("--json", type=Path, default=Path("results/soak_fuzz.json"))
    parser.add_argument("--md", type=Path, default=Path("results/soak_fuzz.md"))
    args = parser.parse_args(argv)
    unknown = set(args.channels.split(",")) - set(hostile.CHANNELS)
    if unknown:
        parser.error(f"unknown channels {sorted(unknown)} (known: {', '.join(hostile.CHANNELS)})")
    args.daemon_devices = "cuda:0" if args.device == "cuda" else "cpu"
    args.good_device = args.daemon_devices
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-good"]:
        return good_client_main(*argv[1:4])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    workdir = tempfile.mkdtemp(prefix="cgtf-", dir="/tmp")  # short: ipc paths fit sockaddr_un
    try:
        report = run_soak(args, workdir)
    except RuntimeError as exc:
        print(f"soak_fuzz: cannot run: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all_processes()
    markdown = render_markdown(report)
    for path, text in ((args.json, json.dumps(report, indent=2, sort_keys=True)), (args.md, markdown)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(markdown)
    return 0 if report["ok"] else 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
