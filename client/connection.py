"""One request, one reply: over the session's submit lane when it can, else ZeroMQ.

``Connection.call`` is the one way a request goes out: it checks that the daemon last heard from
is still there after an idle spell (``check_daemon_before_send``), then sends on the lane
(``LaneChannel``: a unix seqpacket socket, ``cgtree.client.lane``) when the request fits and the
lane is attached, otherwise on the ZeroMQ DEALER socket (``ZmqChannel``). A lane reply too large
for a datagram is moved by the daemon to ZeroMQ and read there.

Invariants:
- No call hangs: every request waits at most ``timeout_s`` for its reply; after a timeout the
  socket (or lane) is replaced, so a late reply can never be taken for the next one
  (``DaemonTimeout``). A missing ipc socket file fails at once (``DaemonUnavailable``).
- A dead daemon is noticed while waiting, whatever the wait is on: the lane's end-of-file, or the
  daemon watch (``cgtree.client.watch``) looked at every ``POLL_SLICE_S``: ``RequestInterrupted``.
  ZeroMQ itself hides a dead peer, so no ZeroMQ event is relied on.
- Every ``Client`` of a process shares one ZeroMQ context that is never terminated
  (``_zmq_context``): closing a client only closes its socket (LINGER 0), which cannot block.
- One request in flight at a time: callers hold the client's lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

import zmq

from cgtree.client.doorbell import DoorbellTimeout
from cgtree.client.errors import ClientError, DaemonError, DaemonGone, DaemonTimeout, DaemonUnavailable, RequestInterrupted
from cgtree.client.lane import MOVED, ClientLane, LaneClosed, LaneError, LaneTimeout, LaneUnusable
from cgtree.client.watch import DaemonWatch
from cgtree.daemon.lane import fits_lane
from cgtree.daemon.protocol import ProtocolError, decode_reply, encode_request, frame_view
from cgtree.daemon.runtime_dir import ipc_endpoint_problem, ipc_path

log = logging.getLogger("cgtree.client")

# A ZeroMQ wait looks at the daemon watch this often (ZeroMQ itself never says the peer died).
POLL_SLICE_S = 0.05
# A request after this long without any reply first checks that the daemon it last heard from
# is still there; requests in a busy loop skip the check (~10 us).
IDLE_CHECK_S = 0.1
LANE_RETRY_S = 5.0  # after a lane failed to attach, requests use ZeroMQ this long before retrying
# Requests that never travel on the lane: hello binds the lane; bye ends the session with it.
ZMQ_ONLY_OPS = frozenset({"hello", "bye"})
_CONTEXT: Optional[zmq.Context] = None
_CONTEXT_PID: Optional[int] = None
_CONTEXT_LOCK = threading.Lock()


class Connection:
    """How a request reaches the daemon (``zmq`` or ``lane``), and the watch on that daemon."""

    def __init__(self, client: Any, lanes: bool) -> None:
        self.client = client
        self.zmq = ZmqChannel(client)
        self.lane = LaneChannel(client, lanes)
        self.ids = itertools.count(1)
        self.watch = DaemonWatch(self.client.endpoint)  # is the daemon that last answered still there?
        self.last_reply_at = 0.0  # perf_counter() of the last reply: see IDLE_CHECK_S

    def call(self, op: str, body: dict, frames: Sequence[Any] = (), *, timeout_s: Optional[float] = None) -> tuple[dict, list]:
        """One request, one reply: (body, frames). Raises DaemonError for an error reply."""
        if self.client._closed:
            raise ClientError("the client is closed")
        if os.getpid() != self.client._pid:
            raise ClientError("a Client cannot be used across fork(); create a new one in the child process")
        timeout = self.client.timeout_s if timeout_s is None else timeout_s
        with self.client._lock:
            request_id = next(self.ids)
            envelope = encode_request(request_id, op, body)
            if self.client.max_message_bytes is not None:
                size = len(envelope) + sum(memoryview(f).nbytes for f in frames)
                if size > self.client.max_message_bytes:
                    raise DaemonError("too_large", f"the {op} request is {size} bytes; the daemon accepts at most {self.client.max_message_bytes}", op)
            message = [envelope, *frames]
            self.check_daemon_before_send(op, time.perf_counter())
            lane = self.lane.for_request(op, message)
            if lane is not None:
                reply = self.lane.call(lane, op, request_id, message, timeout)
                if reply is not None:
                    self.last_reply_at = time.perf_counter()
                    return reply
            reply = self.zmq.call(op, request_id, message, timeout)
            self.last_reply_at = time.perf_counter()
            return reply

    def check_daemon_before_send(self, op: str, now: float) -> None:
        """After an idle spell, do not send to a daemon that died meanwhile (SIGKILL leaves its
        socket file; a lane or ZeroMQ would take the request and nobody would answer): raise
        ``DaemonGone`` (not sent; ``Session.with_recovery`` waits for the next daemon). A missing
        socket file is left to ``ZmqChannel.connect`` (absent daemon: ``DaemonUnavailable`` at once)."""
        if now - self.last_reply_at < IDLE_CHECK_S or self.watch.bound is None:
            return
        reason = self.watch.gone(fresh=True)
        if reason is not None and self.zmq.socket_file_present():
            self.lane.close()
            self.zmq.reset()
            raise DaemonGone(f"cgtreed at {self.client.endpoint} is gone ({reason}); {op!r} was not sent")


class ZmqChannel:
    """The ZeroMQ DEALER socket to the daemon's ROUTER (replaced after a timeout)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.context = _zmq_context()
        self.socket: Optional[zmq.Socket] = None
        # A stable routing id: a socket replaced after a timeout keeps the same session. 128 random
        # bits: whoever connects with it takes over its replies (ROUTER_HANDOVER), so unguessable.
        self.routing_id = b"cgtree-" + str(os.getpid()).encode() + b"-" + os.urandom(16).hex().encode()

    def call(self, op: str, request_id: int, message: list, timeout: float, *, send: bool = True) -> tuple[dict, list]:
        """Send ``message`` on the ZeroMQ socket (unless ``send`` is false: the reply of a lane
        request was moved here) and wait for the reply carrying ``request_id``."""
        sock = self.connect()
        if send:
            try:
                sock.send_multipart(message, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.reset()
                raise DaemonTimeout(f"cgtreed at {self.client.endpoint} is not accepting requests (send queue full)") from None
        deadline = time.monotonic() + timeout
        while True:
            # Wait in slices: ZeroMQ reconnects silently, so a dead daemon shows only on the
            # watch (its socket file gone or replaced, its process exiting or gone).
            remaining = deadline - time.monotonic()
            if remaining > 0 and sock.poll(max(1, int(min(remaining, POLL_SLICE_S) * 1000)), zmq.POLLIN):
                decoded = _decode_reply_for(sock.recv_multipart(copy=False), request_id, op)
                if decoded is not None:
                    return decoded
                continue
            reason = self.client.connection.watch.gone()
            if reason is not None:
                self.reset()
                raise RequestInterrupted(f"cgtreed at {self.client.endpoint} went away while {op!r} was in flight "
                                         f"({reason}); it may or may not have run", op)
            if remaining <= 0:
                self.reset()
                raise DaemonTimeout(
                    f"cgtreed at {self.client.endpoint} did not answer {op!r} within {timeout:g} s "
                    "(is it running? start `cgtreed`, or set CGTREE_ENDPOINT to where it listens)"
                )

    def socket_file_present(self) -> bool:
        path = ipc_path(self.client.endpoint)
        return path is None or os.path.exists(path)

    def connect(self) -> zmq.Socket:
        if not self.socket_file_present():
            self.reset()
        if self.socket is None:
            problem = ipc_endpoint_problem(self.client.endpoint)
            if problem is not None:
                raise DaemonUnavailable(f"no cgtreed reachable at {self.client.endpoint}: {problem}")
            sock = self.context.socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
                sock.setsockopt(zmq.SNDTIMEO, int(self.client.timeout_s * 1000))
                sock.connect(self.client.endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)  # never left open: a socket nobody closes is a leak
                raise
            self.socket = sock
        return self.socket

    def reset(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = None


class LaneChannel:
    """The session's submit lane (``attached`` once connected; ``offer`` from hello)."""

    def __init__(self, client: Any, lanes: bool) -> None:
        self.client = client
        self.enabled = bool(lanes)
        self.attached: Optional[ClientLane] = None
        self.offer: Optional[dict] = None  # {"path", "token"} from hello
        self.retry_at = 0.0
        self.spin_now = 0.0  # spin_s once hello says the daemon runs CUDA (spin_while_waiting)

    def for_request(self, op: str, message: list) -> Optional[ClientLane]:
        """The lane to send ``message`` on, attaching it first if needed; None: use ZeroMQ."""
        if op in ZMQ_ONLY_OPS or self.offer is None or self.client.session_id is None or not fits_lane(message):
            return None
        if self.attached is None:
            if time.monotonic() < self.retry_at:
                return None
            try:
                self.attached = ClientLane.connect(self.offer["path"], self.offer["token"],
                                                   timeout_s=min(self.client.timeout_s, 5.0),
                                                   gone=self.client.connection.watch.gone)
            except (LaneError, KeyError, TypeError) as exc:
                self.retry_at = time.monotonic() + LANE_RETRY_S
                log.info("submit lane not attached (%s); using ZeroMQ for %g s", exc, LANE_RETRY_S)
                return None
        return self.attached

    def call(self, lane: ClientLane, op: str, request_id: int, message: list, timeout: float) -> Optional[tuple[dict, list]]:
        """The reply of ``message`` sent on the lane; None when the lane could not take it (it
        was not sent: the caller sends it over ZeroMQ)."""
        reply = self.exchange(lane, op, message, timeout)
        if reply is None:
            return None
        if reply is MOVED:  # too large for a datagram: the daemon sent it over ZeroMQ
            return self.client.connection.zmq.call(op, request_id, message, timeout, send=False)
        decoded = _decode_reply_for(reply, request_id, op)
        if decoded is None:
            self.close()
            raise ClientError(f"the daemon answered {op!r} on the submit lane with another request's reply")
        return decoded

    def exchange(self, lane: ClientLane, op: str, message: list, timeout: float) -> Any:
        """The raw reply frames of ``message`` on the lane, ``MOVED``, or None when the lane
        could not take it (nothing was sent). A dead or silent daemon raises as ``Connection.call`` does."""
        try:
            return lane.request(message, timeout, self.spin_now)
        except LaneUnusable as exc:
            log.info("%s; sending %s over ZeroMQ", exc, op)
            self.close()
            return None
        except (LaneTimeout, LaneClosed) as exc:
            raise self.failed(exc, op, timeout, "submit lane") from None

    def failed(self, exc: Exception, op: str, timeout: float, via: str) -> Exception:
        """Close the lane after a request on it (or its doorbell) timed out or lost the daemon;
        the error to raise, as ``Connection.call`` would."""
        self.close()  # a late reply must never be read as the next request's
        if isinstance(exc, (LaneTimeout, DoorbellTimeout)):
            return DaemonTimeout(f"cgtreed at {self.client.endpoint} did not answer {op!r} within {timeout:g} s ({via})")
        return RequestInterrupted(f"cgtreed at {self.client.endpoint} closed the submit lane while {op!r} was in flight "
                                  f"({exc}; the daemon died or restarted); it may or may not have run", op)

    def close(self) -> None:
        if self.attached is not None:
            self.attached.close()
            self.attached = None


def _zmq_context() -> zmq.Context:
    """The ZeroMQ context of every ``Client`` in this process, never terminated.

    ``Context.term()`` waits until every socket of the context is closed and its messages sent
    or dropped; with one context per client, ``close()`` had to call it, and it hung now and
    then (the socket monitor the client used to keep is a known source of such hangs in
    libzmq). A shared context leaves ``close()`` only sockets to close (LINGER 0), which never
    blocks, and costs one I/O thread per process instead of one per client. A forked child
    gets its own (a context must not cross ``fork``). Private to this module, so that nobody
    else's ``zmq.Context.instance().term()`` can pull it away from the clients.
    """
    global _CONTEXT, _CONTEXT_PID
    with _CONTEXT_LOCK:
        if _CONTEXT is None or _CONTEXT_PID != os.getpid() or _CONTEXT.closed:
            _CONTEXT, _CONTEXT_PID = zmq.Context(), os.getpid()
        return _CONTEXT


def _decode_reply_for(message: list, request_id: int, op: str) -> Optional[tuple[dict, list]]:
    """(body, data frames) of a reply to ``request_id``; None for a late reply to an earlier
    request (not ours); raises ``DaemonError`` for an error reply to this one."""
    try:
        reply_id, reply_body = decode_reply(frame_view(message[0]))
    except ProtocolError as exc:
        if getattr(exc, "request_id", request_id) not in (request_id, None):
            return None  # a late error reply to an earlier request
        raise DaemonError(exc.code, exc.message, op) from None
    if reply_id != request_id:
        return None
    return reply_body, list(message[1:])
