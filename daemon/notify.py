"""sd_notify for cgtreed: tell systemd (``Type=notify``) when the daemon is ready, reloading,
stopping, alive, and what it is doing. Standard library only; no libsystemd.

Protocol (sd_notify(3)): one datagram of newline-separated ``KEY=VALUE`` assignments sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET``: a filesystem path (``/run/systemd/notify``)
or, when it starts with ``@``, a Linux abstract socket name.

Invariants:
- Without ``$NOTIFY_SOCKET`` (the daemon started by hand, in tests, under another
  supervisor) every function is a no-op returning False; nothing else changes.
- Sending never raises: a missing socket, a refused datagram or an unsupported address is
  logged at DEBUG and reported as False. Readiness reporting must not be able to take the
  daemon down; systemd's own start timeout and watchdog catch a daemon that cannot report.
- ``$NOTIFY_SOCKET`` is left in the environment. Child processes (inductor compile workers)
  inherit it, but the unit sets ``NotifyAccess=main``, so systemd ignores their messages.
- The watchdog settings apply only to the process they were meant for: when
  ``$WATCHDOG_PID`` names another process, ``watchdog_interval_s()`` is None.

Usage in the daemon: ``ready()`` once the endpoint is bound; on SIGHUP ``reloading()``, re-read
the configuration, then ``ready()`` again; ``stopping()`` when a graceful stop begins;
``watchdog()`` every ``watchdog_interval_s() / 2`` seconds from the main loop, so a wedged
loop (not merely a live process) is what systemd restarts.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = [
    "notify",
    "ready",
    "reloading",
    "stopping",
    "watchdog",
    "status",
    "watchdog_interval_s",
]

_log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, or several ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was handed to the socket, False when there is no
    ``$NOTIFY_SOCKET`` or sending failed (logged at DEBUG, never raised).
    """
    address = _notify_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        _log.debug("sd_notify to %r failed (%s): %r", os.environ.get("NOTIFY_SOCKET"), exc, state)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The daemon accepts requests (startup done, or a reload finished). Optionally sets STATUS."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1\n" + _status_line(status))


def reloading() -> bool:
    """A configuration reload has begun; call ``ready()`` when it is done.

    Carries ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds): systemd >= 253 needs it to
    tell this reload from an earlier one (``Type=notify-reload``); older versions ignore it.
    """
    monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")


def stopping(status: str | None = None) -> bool:
    """A stop has begun: systemd shows "deactivating" instead of a failed unit. Optionally
    says why (``STATUS=``), e.g. a sticky CUDA error."""
    if status is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1\n" + _status_line(status))


def watchdog() -> bool:
    """Keep-alive ping; must arrive within every ``WatchdogSec=`` or systemd kills and restarts."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status`` (e.g. "3 sessions, 12 graphs")."""
    return notify(_status_line(text))


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd enforces on this process, in seconds, or None if none.

    Read from ``$WATCHDOG_USEC``; None when it is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` is set and names another process (the variables were inherited).
    Ping with ``watchdog()`` at half this interval, as sd_watchdog_enabled(3) recommends.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            watchdog_pid = int(pid_text)
        except ValueError:
            _log.debug("ignoring watchdog: WATCHDOG_PID=%r is not a process id", pid_text)
            return None
        if watchdog_pid != os.getpid():
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        _log.debug("ignoring watchdog: WATCHDOG_USEC=%r is not an integer", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def _notify_address() -> str | None:
    """``$NOTIFY_SOCKET`` as an address for ``socket.connect``, or None when unusable."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        # Abstract namespace: the kernel name is a NUL byte followed by the rest.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # systemd >= 253 may also hand out "vsock:CID:PORT" (for VMs); cgtreed runs on the host.
    _log.debug("ignoring unsupported NOTIFY_SOCKET address %r", address)
    return None


def _status_line(text: str) -> str:
    # STATUS is one assignment on one line: a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.splitlines())
