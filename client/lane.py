"""The client's end of its session's submit lane (framing and handshake: ``cgtree.daemon.lane``).

``ClientLane.request(frames, timeout_s)`` sends one request datagram and returns the reply's
frames, ``MOVED`` (the reply is coming over ZeroMQ), or raises:

- ``LaneUnusable`` before anything was sent (the daemon closed the lane while we idled): the
  request did not reach the daemon; send it another way.
- ``LaneClosed`` after it was sent (EOF: the daemon died or dropped the lane; or ``gone``, the
  ``cgtree.client.watch`` check the client passes, says the daemon is no longer there): it may
  or may not have run.
- ``LaneTimeout``: no reply within ``timeout_s``; the lane must be closed (a late reply must
  never be read as the next request's).

Waiting: the reply is polled without sleeping for ``spin_s`` (short GPU calls answer within
it, and a sleeping thread costs a wake-up, tens of microseconds), then waited for in the kernel.

Doorbell: when the handshake's answer brings a page (``cgtree.daemon.doorbell``), ``doorbell``
is its ``ClientDoorbell``; plan runs ring it while the daemon is awake, and the lane then only
carries the replies that do not fit the page, and kicks.

Invariants: one request in flight at a time (the ``Client`` holds its lock); reply frames are
views of a fresh bytearray per reply, never of a reused buffer, so tensors built on them stay
valid; the socket is blocking only during the handshake.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Callable, Optional

from cgtree.client.doorbell import ClientDoorbell
from cgtree.daemon.doorbell import HANDSHAKE_OFFER, KICK_MAGIC
from cgtree.daemon.lane import (
    LANE_MAGIC,
    LANE_MAX_BYTES,
    LaneFramingError,
    receive_datagram,
    send_frames,
    split_datagram,
)

MOVED = "moved"
HANDSHAKE_TIMEOUT_S = 5.0
WATCH_SLICE_S = 0.05  # waiting in the kernel, ask ``gone`` this often


class LaneError(ConnectionError):
    """Base class of lane failures."""


class LaneUnusable(LaneError):
    """The lane could not take the request (nothing was sent)."""


class LaneClosed(LaneError):
    """The daemon's end closed while a request was in flight."""


class LaneTimeout(LaneError, TimeoutError):
    """No reply within the timeout."""


class ClientLane:
    """A connected, attached lane. ``connect`` raises ``LaneError`` when the daemon refuses."""

    def __init__(self, sock: socket.socket, path: str, doorbell: Optional[ClientDoorbell] = None,
                 gone: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.sock = sock
        self.path = path
        self.doorbell = doorbell
        # Why the daemon is no longer there (cgtree.client.watch), or None; rate-limited by its owner.
        self.gone = gone if gone is not None else (lambda: None)
        self._buffer = bytearray(LANE_MAX_BYTES)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    @classmethod
    def connect(cls, path: str, token: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S,
                gone: Optional[Callable[[], Optional[str]]] = None) -> "ClientLane":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
            send_frames(sock, [LANE_MAGIC, token])
            answer, fds, _, _ = socket.recv_fds(sock, 4096, 1)
            doorbell = None
            try:
                if not answer:
                    raise LaneError("the daemon closed the lane during the handshake")
                frames = split_datagram(memoryview(answer))
                if not frames or bytes(frames[0]) != b"ok":
                    reason = bytes(frames[1]).decode("utf-8", "replace") if len(frames) > 1 else "no reason given"
                    raise LaneError(f"the daemon refused the lane: {reason}")
                if len(frames) == 2 and bytes(frames[1]) == HANDSHAKE_OFFER and len(fds) == 1:
                    doorbell = ClientDoorbell(fds.pop())
            finally:
                for fd in fds:
                    os.close(fd)
            sock.setblocking(False)
        except (OSError, LaneFramingError) as exc:
            sock.close()
            if isinstance(exc, LaneError):
                raise
            raise LaneError(f"cannot attach the submit lane at {path}: {exc}") from exc
        return cls(sock, path, doorbell, gone)

    def request(self, frames: list, timeout_s: float, spin_s: float = 0.0):
        """Send ``frames`` as one datagram; the reply's frames, or ``MOVED``. See the module doc."""
        try:
            send_frames(self.sock, frames, socket.MSG_DONTWAIT)
        except OSError as exc:  # EPIPE/ECONNRESET (closed), EAGAIN (the daemon is not reading)
            raise LaneUnusable(f"the submit lane cannot take a request: {exc}") from None
        return self.receive(timeout_s, spin_s)

    def receive(self, timeout_s: float, spin_s: float = 0.0):
        """The next reply's frames (or ``MOVED``); alone, a doorbell request's reply on the lane."""
        try:
            reply = split_datagram(memoryview(self._receive(timeout_s, spin_s)))
        except LaneFramingError as exc:
            raise LaneClosed(f"the daemon sent an unreadable lane datagram: {exc}") from None
        return MOVED if not reply else reply

    def kick(self) -> None:
        """Tell a daemon that fell asleep to look at our doorbell (no reply comes)."""
        try:
            send_frames(self.sock, [KICK_MAGIC], socket.MSG_DONTWAIT)
        except OSError as exc:
            raise LaneClosed(f"the submit lane broke: {exc}") from None

    def peer_closed(self) -> bool:
        """Whether the daemon is gone: its end hung up, or ``gone`` says so; reads nothing."""
        if any(events & (select.POLLHUP | select.POLLERR) for _, events in self._poll.poll(0)):
            return True
        return self.gone() is not None

    def _receive(self, timeout_s: float, spin_s: float) -> bytearray:
        recv = self._receive_now
        if spin_s > 0:
            spin_until = time.perf_counter() + spin_s
            while True:
                data = recv()
                if data is not None:
                    return data
                if time.perf_counter() >= spin_until:
                    break
        deadline = time.monotonic() + timeout_s
        while True:
            data = recv()
            if data is not None:
                return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaneTimeout(f"no reply on the submit lane within {timeout_s:g} s")
            if not self._poll.poll(max(1, int(min(remaining, WATCH_SLICE_S) * 1000))):
                reason = self.gone()
                if reason is not None:
                    raise LaneClosed(f"the daemon is gone ({reason})")

    def _receive_now(self) -> Optional[bytearray]:
        try:
            data = receive_datagram(self.sock, self._buffer, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except LaneFramingError as exc:
            raise LaneClosed(f"the daemon sent an oversized lane datagram: {exc}") from None
        except OSError as exc:
            raise LaneClosed(f"the submit lane broke: {exc}") from None
        if data is None:
            raise LaneClosed("the daemon closed the submit lane")
        return data

    def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()
            self.doorbell = None
        try:
            self._poll.unregister(self.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
