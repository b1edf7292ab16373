"""What cgtreed tells its supervisor (systemd, ``Type=notify`` with ``WatchdogSec=``): when to
send ``WATCHDOG=1``, and the one-line ``STATUS=`` that ``systemctl status`` shows.

``notify.py`` is the wire (sd_notify datagrams); this module decides *when* and *what*.

Invariants:
- Keep-alives come only from the main thread making progress (the loop, or a command between
  two long steps). Never from a timer thread: a wedged loop must look wedged to systemd, which
  is the whole point of ``WatchdogSec=``.
- Without a watchdog for this process (no ``$WATCHDOG_USEC``, or it names another pid) the
  ``Watchdog`` is disabled: ``next_due`` is infinite and every method is a no-op.
- The main loop pings at half the interval (sd_watchdog_enabled(3)). ``keepalive()``, called
  right before and after a step that may be long (a first call that compiles, a capture),
  pings unless one went out within ``min_gap_s``: the step gets nearly the whole interval, and
  a replay (microseconds) never pays for a datagram.
- ``StatusReporter`` sends ``STATUS=`` only when the text changed: housekeeping runs every
  ``reap_interval_s`` and must not flood systemd with identical lines.
- ``status_text`` is a pure function of the numbers it is given.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

from cgtree.daemon import notify

__all__ = ["Watchdog", "StatusReporter", "status_text", "EXIT_OK", "EXIT_FORCED", "EXIT_CUDA_ERROR", "EXIT_START_FAILED"]

# cgtreed's exit statuses, as its supervisor reads them (re-exported by cgtree.daemon.server).
EXIT_OK = 0
EXIT_FORCED = 1  # second signal or shutdown deadline passed
EXIT_CUDA_ERROR = 70  # EX_SOFTWARE: a sticky CUDA error poisoned the context; restart us
EXIT_START_FAILED = 78  # EX_CONFIG: bad configuration, endpoint in use, unusable device

# keepalive() never pings more often than this (nor more often than an eighth of the interval).
KEEPALIVE_MIN_GAP_S = 1.0


class Watchdog:
    """WATCHDOG=1 pings at half of ``interval_s`` (systemd's ``WatchdogSec=``), or never.

    interval_s: the enforced watchdog timeout (``notify.watchdog_interval_s()``); None disables.
    clock: monotonic seconds (injectable for tests). send: the ping (``notify.watchdog``).
    """

    def __init__(self, interval_s: Optional[float], *, clock: Callable[[], float] = time.monotonic,
                 send: Callable[[], bool] = notify.watchdog) -> None:
        self.interval_s = interval_s if interval_s and interval_s > 0 else None
        self.period_s = self.interval_s / 2 if self.interval_s else math.inf
        self.min_gap_s = min(KEEPALIVE_MIN_GAP_S, self.interval_s / 8) if self.interval_s else math.inf
        self.pings = 0
        self._clock = clock
        self._send = send
        self._last = -math.inf

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    @property
    def next_due(self) -> float:
        """When the main loop must ping next (clock seconds); infinite when disabled."""
        return self._last + self.period_s if self.enabled else math.inf

    def ping_if_due(self) -> None:
        """The main loop's ping: at most every ``interval_s / 2``."""
        if self.enabled and self._clock() >= self.next_due:
            self._ping()

    def keepalive(self) -> None:
        """Before/after a possibly long step: ping unless one went out very recently."""
        if self.enabled and self._clock() - self._last >= self.min_gap_s:
            self._ping()

    def _ping(self) -> None:
        self._last = self._clock()
        self.pings += 1
        self._send()


def status_text(*, endpoint: str, devices: Sequence[str], live_sessions: int, parked_sessions: int,
                graphs: int) -> str:
    """``serving ipc:///run/cgtree/cgtreed.sock on cuda:0, cuda:1: 3 sessions (1 parked), 5 graphs``."""
    parked = f" ({parked_sessions} parked)" if parked_sessions else ""
    sessions = live_sessions + parked_sessions
    return (f"serving {endpoint} on {', '.join(devices)}: "
            f"{sessions} session{'' if sessions == 1 else 's'}{parked}, {graphs} graph{'' if graphs == 1 else 's'}")


class StatusReporter:
    """Sends ``STATUS=<text>`` when the text differs from the last one sent."""

    def __init__(self, send: Callable[[str], bool] = notify.status) -> None:
        self._send = send
        self.last: Optional[str] = None

    def update(self, text: str) -> None:
        if text != self.last:
            self.last = text
            self._send(text)

    def sent(self, text: str) -> None:
        """Record a STATUS that went out with another message (READY=1, STOPPING=1)."""
        self.last = text
