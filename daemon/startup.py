"""How long cgtreed took from exec to READY, phase by phase: logged with the "serving" line
(``startup_s`` in JSON logs) and read by ``benchmarks/startup.py``.

Phases, in order (seconds): ``interpreter`` (exec to cgtreed's first line: the interpreter and
site; from the kernel's start time of the process, so 10 ms resolution), ``imports`` (torch,
ZeroMQ and the daemon's modules), ``config`` (configuration, logging, the ``Daemon`` built),
``devices`` (every device started: CUDA initialization on a GPU), ``warmup`` (where a device
compiles: inductor's import and the loader warm-up canary, ``loader_warmup``, so that compiled
graphs load at once after READY), ``bind`` (the ZeroMQ socket,
a stale socket file replaced, the lane listener), ``ready`` (signal handlers, metrics, then
``READY=1``). ``total`` is exec to READY.

Invariants: a mark is a ``time.monotonic()`` stamp, the latest one per phase wins (a daemon
embedded in a test process starts several times); a phase whose marks are missing is left
out; nothing here can fail the daemon's start (unreadable ``/proc``: no ``interpreter``).
"""

from __future__ import annotations

import os
import time
from typing import Optional

PHASES = ("interpreter", "imports", "config", "devices", "warmup", "bind", "ready")
# The mark that ends each phase; "exec" is the process's start, read from the kernel.
_ENDS = {"interpreter": "main", "imports": "imports", "config": "config", "devices": "devices", "warmup": "warmup",
         "bind": "bind", "ready": "ready"}
_marks: dict[str, float] = {}


class StartError(RuntimeError):
    """The daemon cannot start (endpoint served by another daemon, no usable device, ...)."""


def mark(name: str) -> None:
    _marks[name] = time.monotonic()


def process_started_monotonic() -> Optional[float]:
    """When this process was exec'd, on the monotonic clock (``/proc/self/stat`` field 22 is
    in clock ticks since boot; the boot-time clock maps it onto now)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            data = stat.read()
        ticks = int(data[data.rindex(b")") + 2:].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def phases() -> dict[str, float]:
    """Seconds per phase (see the module docstring) for the marks made so far."""
    stamps = dict(_marks)
    started = process_started_monotonic()
    if started is not None and "main" in stamps:
        stamps["exec"] = min(started, stamps["main"])
    out, previous = {}, stamps.get("exec")
    for phase in PHASES:
        end = stamps.get(_ENDS[phase])
        if end is None:
            continue
        if previous is not None:
            out[phase] = max(0.0, end - previous)
        previous = end
    if "exec" in stamps and "ready" in stamps:
        out["total"] = stamps["ready"] - stamps["exec"]
    return out


def summary(durations: dict[str, float]) -> str:
    """``"2.31 s after exec (interpreter 0.05, imports 1.20, ...)"`` for the log line."""
    parts = ", ".join(f"{phase} {durations[phase]:.2f}" for phase in PHASES if phase in durations)
    head = f"{durations['total']:.2f} s after exec" if "total" in durations else "started"
    return f"{head} ({parts})" if parts else head
