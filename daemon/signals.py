"""cgtreed's signal handling: SIGTERM/SIGINT (graceful stop), SIGHUP (reload), and a second
SIGTERM/SIGINT forcing the exit at once.

``SignalHandlers`` installs the handlers when the daemon starts and restores the previous ones
when it stops. The loop (``Daemon.handle_signals``) acts on what the handlers recorded.

Invariants:
- A handler only records the signal (``Daemon._pending_signals``) and lets the wake-up pipe
  end the loop's poll (``signal.set_wakeup_fd``); everything else happens in the loop, between
  requests.
- The one exception is a second SIGTERM/SIGINT: it leaves at once from the handler (status
  ``EXIT_FORCED``, socket files removed), since the loop it would queue for is what is slow.
  No logging there (the handler may have interrupted a logging call holding its lock).
- A second SIGTERM that arrived during one long C call is never lost: the wake-up pipe holds a
  byte per delivery, and the handler peeks at it.
- Embedded in a thread other than the main one (tests), nothing is installed; the embedder
  stops the daemon with ``Daemon.request_stop()``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from cgtree.daemon.supervision import EXIT_FORCED


class SignalHandlers:
    """The daemon's signal handlers (state of the daemon they act on: ``daemon``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self._previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in a test thread: the embedder stops us with request_stop()
        signal.set_wakeup_fd(self.daemon.waiting.wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and (self._stop_signalled() or self._stop_deliveries() > 1):
            self._force_exit_now(signum)
        # Only record it: the loop acts on it between requests (the wake-up fd ends the poll).
        self.daemon._pending_signals.append(signum)

    def _stop_signalled(self) -> bool:
        daemon = self.daemon
        return daemon._stop_requested or any(s in (signal.SIGTERM, signal.SIGINT) for s in daemon._pending_signals)

    def _stop_deliveries(self) -> int:
        """SIGTERM/SIGINT deliveries since the loop last drained the wake-up pipe. Python runs a
        handler once for every delivery of one signal that arrived during one long C call (a
        matmul of the request in flight), but its C handler writes a byte per delivery to the
        wake-up fd: peeked at here, a second SIGTERM is never lost that way."""
        waiting = self.daemon.waiting
        try:
            pending = waiting.wake_r.recv(4096, socket.MSG_PEEK) if waiting.wake_r is not None else b""
        except OSError:
            return 0
        return sum(1 for number in pending if number in (signal.SIGTERM, signal.SIGINT))

    def _force_exit_now(self, signum: int) -> None:
        """Second SIGTERM/SIGINT: leave now, from the handler. No logging here (the handler may
        have interrupted a logging call holding its lock): one raw line on stderr."""
        message = f"cgtreed: second {signal.Signals(signum).name}: exiting now without freeing sessions\n"
        try:
            os.write(2, message.encode())
        except OSError:
            pass
        self.daemon.zmq_transport.unlink_socket_file()
        os._exit(EXIT_FORCED)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)
