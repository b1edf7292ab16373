"""The client's exceptions (re-exported by ``cgtree.client``).

``ClientError`` is the base of all. ``DaemonUnavailable`` (also a ``ConnectionError``): no daemon
answered; its subclasses say how: ``DaemonTimeout`` (no reply within ``timeout_s``; not re-sent,
the request may still be running), ``DaemonGone`` (the daemon last heard from is gone and the
request was not sent: it never ran; the client waits for the next daemon), ``RequestInterrupted``
(the daemon went away with the request in flight and it was not sent again). ``DaemonError``: the
daemon answered with an error reply (``code`` from ``cgtree.daemon.protocol.ERROR_CODES``).

Invariants: only the exceptions live here (no I/O, no state). ``RequestInterrupted`` and
``DaemonError`` say with ``retryable`` whether the same call may simply be made again.
"""

from __future__ import annotations

from cgtree.daemon.protocol import ERROR_CODES


class ClientError(Exception):
    """Base class of the client's errors."""


class DaemonUnavailable(ClientError, ConnectionError):
    """No daemon at the endpoint (socket file missing) or it stopped answering."""


class DaemonTimeout(DaemonUnavailable, TimeoutError):
    """The daemon did not answer within the timeout."""


class DaemonGone(DaemonUnavailable):
    """The daemon this client last heard from is gone and the request was not sent to it (it
    never ran). Inside the client: the call waits for the next daemon and sends it there."""


class RequestInterrupted(DaemonUnavailable):
    """The daemon went away while a request was in flight, and the client did not send it again
    (a submit of a graph that writes its inputs may have run partly). Retryable: the next call
    reconnects to the restarted daemon by itself; check the inputs first."""

    retryable = True

    def __init__(self, message: str, op: str = "") -> None:
        super().__init__(message)
        self.op = op


class DaemonError(ClientError):
    """The daemon answered with an error reply: ``code`` (see ``ERROR_CODES``) and ``message``."""

    def __init__(self, code: str, message: str, op: str = "") -> None:
        super().__init__(f"cgtreed refused {op or 'the request'}: {code}: {message}")
        self.code = code
        self.message = message
        self.op = op

    @property
    def retryable(self) -> bool:
        return ERROR_CODES.get(self.code, (False, ""))[0]
