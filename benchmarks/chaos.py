#!/usr/bin/env python3
"""Chaos: client processes in a submit loop while cgtreed is SIGKILLed and started again.

What systemd does to a crashed daemon, measured from the clients' side (issue 14):

1. Start ``cgtreed`` with ``$NOTIFY_SOCKET`` pointing at a socket of this process, so its
   ``READY=1`` (sd_notify, sent once the endpoint is bound) is timed exactly as systemd sees
   it: "READY" below is exec to that datagram.
2. Start ``--clients`` processes (this file, ``--child``). Each builds the ``tiny`` benchmark
   model (2 x Linear(64) + GELU, batch 16) on ``--device``, registers it, and loops: new
   values into the same input buffer (on CUDA a steady loop: plans, and the doorbell where the
   daemon offers one), an eager reference computed in the client, ``client.submit``, the
   output compared with the reference. Every wrong result is counted (there must be none);
   errors are counted by type; the first correct result from each daemon (by pid) is reported.
3. After every client got a result, wait ``--kill-after`` seconds, SIGKILL the daemon, wait
   until it is reaped (its exit can take a while on CUDA: reported), ``--restart-delay``
   seconds later (systemd's ``RestartSec``) start it again on the same endpoint, and wait
   until every client got a correct result from the new daemon (or ``--recovery-timeout``),
   then ``--settle`` seconds more. ``--kills`` times.

Reported per kill: the daemon's exit after SIGKILL, READY of the new daemon, and per client
its *recovery* (first correct result from the new daemon, counted from that daemon's READY),
its *outage* (the same, from the kill), and the errors it saw in between. Target (issue 14, an
H200 with 8 clients): 0 wrong results, every client recovered within 2 s of READY with the
default client settings.

Options: ``--device`` (cuda, cuda:N or cpu), ``--clients`` (8), ``--kill-after`` (30 s),
``--kills`` (1), ``--restart-from`` (``exit``, as systemd; ``kill``: the restart does not wait
for the old daemon's exit), ``--client-timeout`` (the ``Client`` default when left out),
``--no-lanes`` (clients on ZeroMQ only), ``--doorbell`` and ``--compile`` (the daemon's
``daemon.doorbell`` and ``daemon.compile``: with ``auto`` a CUDA daemon compiles with inductor,
and the restarted one loads each graph compiled before it answers its register; ``eager``
leaves that out), ``--smoke`` (CPU CI: 2 clients, 2 s of loop, short settle),
``--keep-workdir``. Writes ``--json`` and ``--md`` (default ``results/chaos.json`` / ``.md``),
prints the tables.

Exit status: 0 when no result was wrong and every client recovered after every kill; 2
otherwise (or a process failed); 3 with ``--fail-on-target`` when a recovery missed the target.

Clocks: every time is ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for all processes of the
host), so client events, the kill and READY compare directly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(REPO_ROOT))  # appended: see bench_daemon.py

import torch  # noqa: E402

from benchmarks.bench_daemon import (  # noqa: E402
    ALLOC_ENV,
    _on_sigterm,
    _tail,
    child_env,
    python_argv,
    spawn,
    stop_all_processes,
    stop_process,
)
from benchmarks.report import exit_status, fmt, write_reports  # noqa: E402

MODEL = "tiny"
TARGET_RECOVERY_S = 2.0  # issue 14: every client served again within this long after READY
MAX_REL_ERR = 1e-3  # ||out - ref|| / ||ref||: a stale or foreign output is off by O(1)
SLOW_CALL_S = 0.25  # calls slower than this are reported one by one (the call the kill hit)
PROGRESS_EVERY_S = 1.0
ERROR_PAUSE_S = 0.005  # after an error: a loop that fails at once must not starve the daemon
LOG_LINES_KEPT = 40  # client log lines around each kill kept in the report
DAEMON_CONFIG = """\
[daemon]
max_message_bytes = 268435456
reap_interval_s = 0.2
shutdown_timeout_s = 15.0
log_level = "INFO"
lanes = true
doorbell = "{doorbell}"
compile = "{compile}"
"""


# ---------------------------------------------------------------------------------------------
# Client processes (``--child JSON``)
# ---------------------------------------------------------------------------------------------


def _emit(event: dict) -> None:
    print("EVENT " + json.dumps(event), flush=True)


class _MonotonicFormatter(logging.Formatter):
    """Log lines stamped with CLOCK_MONOTONIC, comparable with the kill and READY times."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{time.monotonic():.4f} {record.levelname} {record.name}: {record.getMessage()}"


class _ErrorStreaks:
    """Consecutive errors of one type are reported once when they start, once when they end."""

    def __init__(self) -> None:
        self.current: Optional[dict] = None

    def error(self, kind: str, message: str, t0: float, t1: float) -> None:
        if self.current is not None and self.current["type"] == kind:
            self.current["n"] += 1
            self.current["last_t"] = t1
            return
        self.end()
        _emit({"e": "error", "type": kind, "msg": message[:400], "t0": t0, "t1": t1})
        self.current = {"e": "errors", "type": kind, "n": 1, "first_t": t1, "last_t": t1}

    def end(self) -> None:
        if self.current is not None and self.current["n"] > 1:
            _emit(self.current)
        self.current = None


def child_main(opts: dict) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MonotonicFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    from benchmarks.models import build_model
    from cgtree.client import Client

    device = torch.device(opts["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # the eager reference must not take the cores the daemon replays on
    model = build_model(MODEL, device, seed=opts["seed"])
    x = model.inputs[0].clone()  # this client's input buffer, rewritten in place every call
    kwargs = {} if opts["timeout_s"] is None else {"timeout_s": opts["timeout_s"]}
    client = Client(opts["endpoint"], lanes=opts["lanes"], **kwargs)
    handle = client.register(model.module, [x])
    generator = torch.Generator(device="cpu").manual_seed(1000 + opts["index"])
    counts = {"ok": 0, "wrong": 0, "errors": 0}
    streaks = _ErrorStreaks()
    last_pid, next_progress = None, 0.0
    with torch.no_grad():
        while not stop.is_set():
            x.copy_(torch.randn(x.shape, generator=generator))
            ref = model.module(x)
            t0 = time.monotonic()
            try:
                (out,) = client.submit(handle, [x])
                error = (out.double() - ref.double()).norm().item() / (ref.double().norm().item() or 1.0)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by type
                t1 = time.monotonic()
                counts["errors"] += 1
                streaks.error(type(exc).__name__, str(exc), t0, t1)
                time.sleep(ERROR_PAUSE_S)
                continue
            t1 = time.monotonic()
            streaks.end()
            pid = client.daemon_pid
            if not error <= MAX_REL_ERR:
                counts["wrong"] += 1
                _emit({"e": "wrong", "t": t1, "rel_err": error, "pid": pid, "mode": (client.last_execution or {}).get("mode")})
                continue
            counts["ok"] += 1
            if t1 - t0 > SLOW_CALL_S:
                _emit({"e": "slow", "t0": t0, "t1": t1, "pid": pid})
            if pid != last_pid:
                _emit({"e": "first", "t": t1, "pid": pid, "mode": (client.last_execution or {}).get("mode")})
                last_pid = pid
            if t1 >= next_progress:
                _emit({"e": "progress", "t": t1, **counts})
                next_progress = t1 + PROGRESS_EVERY_S
    streaks.end()
    transport = "lane+doorbell" if client.connection.lane.attached is not None and client.connection.lane.attached.doorbell is not None else (
        "lane" if client.lane_attached else "zmq")
    _emit({"e": "done", "t": time.monotonic(), "transport": transport, **counts})
    client.close(timeout_s=1.0)
    return 0


# ---------------------------------------------------------------------------------------------
# The daemon, started as systemd would (READY=1 on $NOTIFY_SOCKET)
# ---------------------------------------------------------------------------------------------


class ReadyListener:
    """A stand-in for systemd's notify socket: the monotonic time each pid said ``READY=1``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd checks it

    def wait_ready(self, proc: subprocess.Popen, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"cgtreed exited with {proc.returncode} before READY")
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            seen = time.monotonic()
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                    sender = struct.unpack("iII", payload[:12])[0]
            if sender in (None, proc.pid) and b"READY=1" in data.split(b"\n"):
                return seen
        raise RuntimeError(f"cgtreed did not say READY=1 within {timeout_s:.0f} s")

    def close(self) -> None:
        self.sock.close()


class DaemonRuns:
    """cgtreed processes on one endpoint, one at a time; each start is timed to READY."""

    def __init__(self, workdir: str, devices: str, config_text: str, listener: ReadyListener,
                 python: tuple[str, ...] = ()) -> None:
        self.workdir, self.devices, self.listener, self.python = workdir, devices, listener, python
        self.endpoint = "ipc://" + os.path.join(workdir, "s")
        self.config_path = os.path.join(workdir, "config.toml")
        self.log_path = os.path.join(workdir, "cgtreed.log")
        Path(self.config_path).write_text(config_text)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float) -> dict:
        with open(self.log_path, "ab") as log:
            exec_t = time.monotonic()
            self.proc = spawn([*python_argv(), *self.python, "-m", "cgtree.daemon.main", "--config", self.config_path,
                               "--endpoint", self.endpoint, "--devices", self.devices],
                              env=child_env({"NOTIFY_SOCKET": self.listener.path}), cwd=self.workdir,
                              stdout=log, stderr=subprocess.STDOUT)
        ready_t = self.listener.wait_ready(self.proc, timeout_s)
        return {"pid": self.proc.pid, "exec_t": exec_t, "ready_t": ready_t, "ready_s": ready_t - exec_t}

    def kill(self, wait: bool) -> dict:
        """SIGKILL. With ``wait``, return once the process is reaped (systemd restarts a unit
        only after its main process exited); else at once, the exit filled in by a thread."""
        assert self.proc is not None
        proc, record = self.proc, {"pid": self.proc.pid, "kill_t": time.monotonic(), "exit_t": None, "exit_s": None}
        proc.send_signal(signal.SIGKILL)

        def reap() -> None:
            proc.wait()
            record["exit_t"] = time.monotonic()
            record["exit_s"] = record["exit_t"] - record["kill_t"]
            stop_process(proc)

        if wait:
            reap()
        else:
            threading.Thread(target=reap, daemon=True).start()
        return record

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=15.0)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Clients:
    """The client processes, their event lines (read by threads) and their log files."""

    def __init__(self, args: argparse.Namespace, endpoint: str, workdir: str) -> None:
        self.lines: "queue.Queue" = queue.Queue()
        self.events: list[list[dict]] = [[] for _ in range(args.clients)]
        self.procs, self.log_paths = [], []
        for index in range(args.clients):
            opts = {"endpoint": endpoint, "device": args.device, "index": index, "seed": 0,
                    "timeout_s": args.client_timeout, "lanes": not args.no_lanes}
            log_path = os.path.join(workdir, f"client-{index}.log")
            with open(log_path, "ab") as err:
                proc = spawn([*python_argv(), str(Path(__file__).resolve()), "--child", json.dumps(opts)],
                             env=child_env(), cwd=workdir, stdout=subprocess.PIPE, stderr=err)
            self.procs.append(proc)
            self.log_paths.append(log_path)
            threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ValueError, OSError):
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith("EVENT "):
                    self.lines.put((index, json.loads(line[len("EVENT "):])))
        self.lines.put((index, {"e": "exit"}))

    def pump(self, until: float) -> None:
        """Take events until the monotonic time ``until``."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                index, event = self.lines.get(timeout=min(remaining, 0.05))
            except queue.Empty:
                continue
            self.events[index].append(event)

    def wait_for(self, predicate, timeout_s: float) -> bool:
        """Pump events until ``predicate(events of one client)`` holds for every client."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(predicate(events) for events in self.events):
                return True
            if any(events and events[-1]["e"] == "exit" for events in self.events):
                return False  # a client died: the report says which
            self.pump(min(deadline, time.monotonic() + 0.1))
        return all(predicate(events) for events in self.events)

    def stop(self, grace_s: float) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        self.wait_for(lambda events: any(e["e"] in ("done", "exit") for e in events), grace_s)
        for proc in self.procs:
            stop_process(proc)
        self.pump(time.monotonic() + 0.2)

    def log_lines(self, index: int, start: float, end: float) -> list[str]:
        kept = []
        with contextlib.suppress(OSError):
            for line in Path(self.log_paths[index]).read_text(errors="replace").splitlines():
                stamp = line.split(" ", 1)[0]
                with contextlib.suppress(ValueError):
                    if start <= float(stamp) <= end:
                        kept.append(line[:500])
        return kept[:LOG_LINES_KEPT]


def recovered_from(pid: int, since: float):
    return lambda events: any(e["e"] == "first" and e["pid"] == pid and e["t"] >= since for e in events)


NOTICED = re.compile(r"^(\d+\.\d+) \S+ cgtree\.client: (cgtreed went away|cgtreed at \S+ is gone)")


def client_recovery(events: list[dict], kill: dict, start: dict, log: list[str]) -> dict:
    """One client across one kill: when it noticed (the client library's own log line, or the
    first error its caller saw), when it was served again, and what it saw meanwhile."""
    first = next((e for e in events if e["e"] == "first" and e["pid"] == start["pid"] and e["t"] >= kill["kill_t"]), None)
    seen = [float(m.group(1)) for m in map(NOTICED.match, log) if m and float(m.group(1)) >= kill["kill_t"]]
    seen += [e["t1"] for e in events if e["e"] == "error" and e["t1"] >= kill["kill_t"]]
    end = first["t"] if first is not None else float("inf")
    errors: dict[str, int] = {}
    messages = []
    for event in events:
        if event["e"] == "error" and kill["kill_t"] <= event["t1"] <= end:
            errors[event["type"]] = errors.get(event["type"], 0) + 1
            messages.append(event["msg"])
        elif event["e"] == "errors" and kill["kill_t"] <= event["last_t"] <= end:
            errors[event["type"]] = errors.get(event["type"], 0) + event["n"] - 1
    slow = [e for e in events if e["e"] == "slow" and e["t0"] <= kill["kill_t"] <= e["t1"] + 1.0]
    return {
        "recovered": first is not None,
        "recovery_s": None if first is None else first["t"] - start["ready_t"],
        "outage_s": None if first is None else first["t"] - kill["kill_t"],
        "noticed_s": min(seen) - kill["kill_t"] if seen else None,
        "first_mode": None if first is None else first.get("mode"),
        "errors": errors,
        "error_messages": messages[:3],
        "call_spanning_kill_s": slow[0]["t1"] - slow[0]["t0"] if slow else None,
    }


def run(args: argparse.Namespace, workdir: str, report: dict) -> None:
    listener = ReadyListener(os.path.join(workdir, "notify"))
    daemons = DaemonRuns(workdir, args.daemon_devices, DAEMON_CONFIG.format(doorbell=args.doorbell, compile=args.compile),
                         listener)
    clients = None
    try:
        first_start = daemons.start(args.start_timeout)
        report["starts"].append(first_start)
        clients = Clients(args, daemons.endpoint, workdir)
        if not clients.wait_for(recovered_from(first_start["pid"], 0.0), args.start_timeout):
            tails = [f"client {i}: " + " | ".join(clients.log_lines(i, 0.0, float("inf"))[-3:]) for i in range(args.clients)]
            raise RuntimeError("not every client got a first result:\n" + "\n".join(tails))
        for number in range(args.kills):
            clients.pump(time.monotonic() + args.kill_after)
            kill = daemons.kill(wait=args.restart_from == "exit")
            clients.pump((kill["exit_t"] or kill["kill_t"]) + args.restart_delay)
            start = daemons.start(args.start_timeout)
            report["starts"].append(start)
            clients.wait_for(recovered_from(start["pid"], kill["kill_t"]), args.recovery_timeout)
            clients.pump(time.monotonic() + args.settle)
            # The record itself: with --restart-from kill, the reaper thread fills in the exit later.
            logs = [clients.log_lines(i, kill["kill_t"] - 0.5, kill["kill_t"] + args.recovery_timeout)
                    for i in range(args.clients)]
            kill.update({"kill": number + 1, "restart": start, "clients": [
                {"client": i, **client_recovery(events, kill, start, logs[i]), "log": logs[i]}
                for i, events in enumerate(clients.events)]})
            report["kills"].append(kill)
    finally:
        if clients is not None:
            clients.stop(grace_s=10.0 + (args.client_timeout or 60.0))
            report["clients"] = summarize_clients(clients)
        daemons.stop()
        listener.close()


def summarize_clients(clients: Clients) -> list[dict]:
    rows = []
    for index, events in enumerate(clients.events):
        done = next((e for e in events if e["e"] == "done"), None)
        progress = [e for e in events if e["e"] == "progress"]
        counts = done or (progress[-1] if progress else {})
        rows.append({"client": index, "finished": done is not None, "transport": (done or {}).get("transport"),
                     "ok": counts.get("ok", 0), "errors": counts.get("errors", 0),
                     # wrong results are counted from their events: a client killed at the end still reports them
                     "wrong": sum(1 for e in events if e["e"] == "wrong"),
                     "exit_code": clients.procs[index].returncode})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def evaluate(report: dict) -> tuple[list[str], list[str]]:
    """(failures, missed targets)."""
    failed, missed = [], []
    wrong = sum(row["wrong"] for row in report["clients"])
    if wrong:
        failed.append(f"{wrong} wrong results")
    if len(report["kills"]) < report["config"]["kills"]:
        failed.append(f"only {len(report['kills'])} of {report['config']['kills']} kills ran")
    for kill in report["kills"]:
        for row in kill["clients"]:
            if not row["recovered"]:
                failed.append(f"kill {kill['kill']}: client {row['client']} not served again")
            elif row["recovery_s"] > TARGET_RECOVERY_S:
                missed.append(f"kill {kill['kill']}: client {row['client']} served {row['recovery_s']:.2f} s after READY")
    return failed, missed


def render_markdown(report: dict) -> str:
    config = report["config"]
    lines = [f"# cgtreed chaos: {config['clients']} clients on {config['device']}, SIGKILL after {config['kill_after_s']:g} s, "
             f"restart {config['restart_delay_s']:g} s after {config['restart_from']}",
             "",
             f"Client timeout: {config['client_timeout_s'] or 'default'}; transport: {'ZeroMQ only' if config['no_lanes'] else 'lanes'}; "
             f"daemon.doorbell = {config['doorbell']!r}, daemon.compile = {config['compile']!r}. Recovery: first correct result from the new daemon, after its READY.",
             "",
             "| daemon start | READY after exec (s) |",
             "|---|---|"]
    for number, start in enumerate(report["starts"]):
        lines.append(f"| {'first' if number == 0 else f'restart {number}'} | {fmt(start['ready_s'], 2)} |")
    for kill in report["kills"]:
        recoveries = [row["recovery_s"] for row in kill["clients"] if row["recovered"]]
        lines += ["", f"## Kill {kill['kill']}: exit {fmt(kill['exit_s'], 2)} s after SIGKILL, new daemon READY "
                  f"{fmt(kill['restart']['ready_s'], 2)} s after exec; recovered {len(recoveries)}/{len(kill['clients'])}, "
                  f"max {fmt(max(recoveries) if recoveries else None, 2)} s after READY", "",
                  "| client | noticed after kill (s) | recovery after READY (s) | outage from kill (s) | call the kill hit (s) | first mode | errors seen |",
                  "|---|---|---|---|---|---|---|"]
        for row in kill["clients"]:
            errors = ", ".join(f"{k} x{v}" for k, v in row["errors"].items()) or "none"
            lines.append(f"| {row['client']} | {fmt(row['noticed_s'], 2)} | "
                         f"{fmt(row['recovery_s'], 2) if row['recovered'] else 'NOT RECOVERED'} | "
                         f"{fmt(row['outage_s'], 2)} | {fmt(row['call_spanning_kill_s'], 2)} | {row['first_mode'] or '-'} | {errors} |")
    lines += ["", "| client | transport | correct results | wrong | errors |", "|---|---|---|---|---|"]
    for row in report["clients"]:
        lines.append(f"| {row['client']} | {row['transport'] or '-'} | {row['ok']:,} | {row['wrong']} | {row['errors']} |")
    lines += ["", f"Verdict: {'OK' if report['ok'] else 'FAILED: ' + '; '.join(report['failed'])}"
              + (f"; target ({TARGET_RECOVERY_S:g} s after READY) missed: {'; '.join(report['missed'])}" if report["missed"] else
                 f"; every recovery within {TARGET_RECOVERY_S:g} s of READY"), ""]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--clients", type=int, default=None, help="client processes (default 8; smoke 2)")
    parser.add_argument("--kill-after", type=float, default=None, help="seconds of loop before each SIGKILL (default 30; smoke 2)")
    parser.add_argument("--kills", type=int, default=1)
    parser.add_argument("--restart-delay", type=float, default=0.5, help="seconds from the daemon's exit (or kill) to its restart")
    parser.add_argument("--restart-from", default="exit", choices=("exit", "kill"),
                        help="time the restart from the old daemon's exit (systemd's RestartSec) or from the SIGKILL")
    parser.add_argument("--settle", type=float, default=None, help="seconds of loop after every client recovered (default 5; smoke 1)")
    parser.add_argument("--recovery-timeout", type=float, default=150.0, help="give up waiting for a client after this long")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds for READY and for every client's first result")
    parser.add_argument("--client-timeout", type=float, default=None, help="Client(timeout_s=) (default: the Client default)")
    parser.add_argument("--no-lanes", action="store_true", help="clients use ZeroMQ only (Client(lanes=False))")
    parser.add_argument("--doorbell", default="auto", choices=("auto", "on", "off"), help="daemon.doorbell")
    parser.add_argument("--compile", default="auto", choices=("auto", "eager", "inductor"),
                        help="daemon.compile (auto: inductor on CUDA; a restarted daemon then loads each graph compiled)")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 clients, 2 s of loop, 1 s of settle")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "chaos.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown (default: --json with .md)")
    parser.add_argument("--fail-on-target", action="store_true", help="exit 3 when a recovery missed the target")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the daemon's and the clients' logs (/tmp/cgtc-*)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.clients = args.clients or (2 if args.smoke else 8)
    args.kill_after = args.kill_after if args.kill_after is not None else (2.0 if args.smoke else 30.0)
    args.settle = args.settle if args.settle is not None else (1.0 if args.smoke else 5.0)
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    if args.clients < 1 or args.kills < 0 or args.kill_after < 0:
        parser.error("--clients must be at least 1, --kills and --kill-after not negative")
    return args


def daemon_device(name: str) -> Optional[torch.device]:
    """The device a benchmark's daemon serves (``cuda`` -> ``cuda:0``), with the classic CUDA
    allocator set for CUDA IPC (inherited by every process started from here); None, said on
    stderr, when it cannot run here."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu", file=sys.stderr)
            return None
        os.environ.update(ALLOC_ENV)
        return torch.device("cuda", device.index or 0)
    if device.type != "cpu":
        print(f"unsupported device {device}", file=sys.stderr)
        return None
    return device


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(json.loads(args.child))
    device = daemon_device(args.device)
    if device is None:
        return 2
    args.device = args.daemon_devices = str(device)
    signal.signal(signal.SIGTERM, _on_sigterm)  # finally blocks stop every process started here
    workdir = tempfile.mkdtemp(prefix="cgtc-", dir="/tmp")  # short: sockaddr_un paths
    report: dict[str, Any] = {
        "benchmark": "chaos", "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"device": args.device, "clients": args.clients, "kill_after_s": args.kill_after, "kills": args.kills,
                   "restart_delay_s": args.restart_delay, "restart_from": args.restart_from, "settle_s": args.settle, "client_timeout_s": args.client_timeout,
                   "no_lanes": args.no_lanes, "doorbell": args.doorbell, "compile": args.compile, "model": MODEL, "max_rel_err": MAX_REL_ERR,
                   "target_recovery_s": TARGET_RECOVERY_S, "workdir": workdir},
        "starts": [], "kills": [], "clients": [],
    }
    error = None
    try:
        run(args, workdir, report)
    except (RuntimeError, OSError) as exc:
        error = str(exc)
    finally:
        stop_all_processes()
        report["daemon_log_tail"] = _tail(os.path.join(workdir, "cgtreed.log"), 30)
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    failed, missed = evaluate(report)
    if error:
        failed.insert(0, error)
    report.update(ok=not failed, failed=failed, missed=missed)
    write_reports(report, render_markdown(report), args.json, args.md)
    return exit_status(failed, missed, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
