"""Submit lanes: one AF_UNIX ``SOCK_SEQPACKET`` connection per session beside the ZeroMQ
socket, for the requests on the hot path.

Why a second transport: ZeroMQ hands every message to an I/O thread on both sides, so a round
trip wakes four threads besides the two that do the work. Measured side by side
(``benchmarks/bench_transport.py``): a 200-byte round trip costs ~94-139 us p50 over ZeroMQ
``ipc://`` and ~10 us over a unix seqpacket socket on a 2-core VM; the GPU host's figures are in
``docs/PERFORMANCE.md``. The tiny model's whole budget is ~30 us above its own replay, so
submits cannot go through ZeroMQ. ZeroMQ stays the control channel: ``hello``, large messages,
and every client that does not attach a lane.

Wire: one datagram is one message. Header: ``u32 n`` then ``n`` x ``u32`` frame lengths (little
endian); then the ``n`` frames back to back. The frames are exactly a ZeroMQ message's (the
envelope, then data frames), without the routing id: the lane is bound to one session.

Access: the lane's socket file gets the ZeroMQ socket file's mode (0600 by default; a systemd
deployment that opens the ZeroMQ socket to a group opens the lane to it too).

Handshake: the ``hello`` reply carries ``lane = {"path", "token"}``. The client connects and
sends ``[LANE_MAGIC, token]``; the daemon answers ``[b"ok"]`` (``[b"ok", b"doorbell"]`` with the
lane's doorbell page passed along as a memfd: ``cgtree.daemon.doorbell``) or
``[b"refused", reason]`` and closes. The token is 16 random bytes per session, new on every adoption;
``SO_PEERCRED`` must name the session's owner (uid) and, where the daemon can see the client's
pid, the session's client (``handshake_refusal``).

Invariants:
- A datagram never exceeds ``LANE_MAX_BYTES``. A client sends larger requests over ZeroMQ. The
  daemon sends a reply that does not fit over ZeroMQ, to the session's routing id, and puts a
  zero-frame datagram (``MOVED``) on the lane so the waiting client looks there.
- Frames handed out by ``read`` are private copies, never views of a reused receive buffer:
  tensors built on them may outlive the next datagram.
- The daemon never blocks on a lane: sockets are non-blocking and a reply that does not fit the
  peer's queue is dropped and counted, as ZeroMQ replies are.
- A lane whose peer closed (EOF, reset) is closed and unregistered at once; the session it
  served is untouched (the session's liveness is the pid check's business).
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from cgtree.daemon.doorbell import HANDSHAKE_OFFER, is_kick
from cgtree.daemon.tenancy import may_use, peer_credentials

log = logging.getLogger("cgtree.daemon.lane")

LANE_MAGIC = b"cgtree-lane-1"
LANE_MAX_BYTES = 128 * 1024  # under Linux's default socket buffer (wmem_default 212992)
LANE_MAX_FRAMES = 256
TOKEN_BYTES = 16
MAX_LANES = 4096
MOVED: list = []  # the zero-frame datagram: "your reply went over ZeroMQ"

_COUNT = struct.Struct("<I")


class LaneFramingError(ValueError):
    """A datagram whose header does not describe its contents."""


def lane_path_for(ipc_socket_path: Optional[str]) -> Optional[str]:
    """The lane's socket file beside the ZeroMQ socket file (None: not an ipc:// endpoint)."""
    return None if ipc_socket_path is None else ipc_socket_path + ".lane"


def frame_nbytes(frame: Any) -> int:
    return memoryview(frame).nbytes


def message_nbytes(frames: Iterable[Any]) -> int:
    """Datagram size of ``frames``: header included."""
    count, total = 0, 0
    for frame in frames:
        count += 1
        total += frame_nbytes(frame)
    return _COUNT.size * (1 + count) + total


def fits_lane(frames: list) -> bool:
    return len(frames) <= LANE_MAX_FRAMES and message_nbytes(frames) <= LANE_MAX_BYTES


def header_of(frames: list) -> bytes:
    lengths = [frame_nbytes(f) for f in frames]
    return struct.pack(f"<I{len(lengths)}I", len(lengths), *lengths)


def split_datagram(data: memoryview) -> list[memoryview]:
    """The frames of one datagram (views of ``data``). Raises ``LaneFramingError``."""
    if len(data) < _COUNT.size:
        raise LaneFramingError(f"a {len(data)}-byte datagram has no frame count")
    (count,) = _COUNT.unpack_from(data, 0)
    if count > LANE_MAX_FRAMES:
        raise LaneFramingError(f"{count} frames (at most {LANE_MAX_FRAMES})")
    head = _COUNT.size * (1 + count)
    if len(data) < head:
        raise LaneFramingError(f"the header announces {count} frames but the datagram ends inside it")
    lengths = struct.unpack_from(f"<{count}I", data, _COUNT.size)
    if head + sum(lengths) != len(data):
        raise LaneFramingError(f"frame lengths add up to {sum(lengths)} bytes but {len(data) - head} follow the header")
    frames, cursor = [], head
    for length in lengths:
        frames.append(data[cursor:cursor + length])
        cursor += length
    return frames


def send_frames(sock: socket.socket, frames: list, flags: int = 0, fds: tuple = ()) -> None:
    """One datagram (with ``fds`` passed along, SCM_RIGHTS); raises OSError (EAGAIN when the
    peer's queue is full, EMSGSIZE, EPIPE...)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([header_of(frames), *frames], ancillary, flags)


def receive_datagram(sock: socket.socket, buffer: bytearray, flags: int = 0) -> Optional[bytearray]:
    """The next datagram as a fresh bytearray; None at EOF. Raises ``LaneFramingError`` when
    it was larger than ``buffer`` (the kernel truncated it), ``BlockingIOError`` when none is
    queued on a non-blocking socket."""
    nbytes, _, msg_flags, _ = sock.recvmsg_into([buffer], 0, flags)
    if nbytes == 0 and not msg_flags & socket.MSG_TRUNC:
        return None
    if msg_flags & socket.MSG_TRUNC:
        raise LaneFramingError(f"a datagram larger than {len(buffer)} bytes (lane limit)")
    return bytearray(memoryview(buffer)[:nbytes])  # a private copy: see the invariants


def peer_hung_up(sock: socket.socket) -> bool:
    """Whether the peer of a connected socket has closed its end (no read, no wait)."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | getattr(select, "POLLRDHUP", 0))
    return any(events & (select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)) for _, events in poller.poll(0))


def handshake_refusal(connection_pid: Optional[int], connection_uid: Optional[int], session: Any) -> Optional[str]:
    """Why a lane from (pid, uid) may not attach to ``session`` (its token matched), or None.
    The uid must be the session's owner's (``cgtree.daemon.tenancy``): a token that leaked to
    another user is worthless. The pid must be the session's client's where the daemon can see
    that client (same pid namespace): another process of the same user is refused too."""
    if connection_uid is not None and not may_use(connection_uid, session.owner):
        return f"the connecting process (uid {connection_uid}) does not belong to the session's user"
    if connection_pid is not None and session.client.create_time is not None and connection_pid != session.client.pid:
        return f"the connecting process (pid {connection_pid}) is not the session's client (pid {session.client.pid})"
    return None


# ---------------------------------------------------------------------------------------------
# Daemon side


@dataclass(eq=False)
class LaneConnection:
    """One accepted lane. ``session`` is None until the handshake bound it."""

    sock: socket.socket
    fd: int  # kept: a closed socket's fileno() is -1, and the poller knows it by this
    pid: Optional[int]
    uid: Optional[int] = None  # SO_PEERCRED; None where the platform does not say
    session: Any = None
    doorbell: Any = None  # its cgtree.daemon.doorbell.Doorbell, when the session got one


@dataclass
class LaneEvent:
    """What ``LaneHub.read`` found: a request's frames, a finished handshake, or a close."""

    connection: LaneConnection
    frames: Optional[list] = None  # a request (session bound)
    closed: bool = False
    error: Optional[str] = None  # a request that cannot be read (too large, bad header)
    refused: Optional[str] = None  # a handshake that was refused
    attached: bool = False


@dataclass
class LaneHub:
    """The daemon's lane listener and connections. The daemon's poller watches ``listener``
    and every connection's fd; the hub does the socket work and says what happened.

    find_session(token) -> the live session holding that lane token, or None. The hub keeps
    that session's ``lane_open`` and ``counters["lane_requests"]`` up to date.
    watch(fd) / unwatch(fd): add a connection's fd to the daemon's poller / take it out.
    make_doorbell() -> a new ``Doorbell`` for an attaching lane (None: lanes only); settle()
    waits until no device may still write a doorbell page that is about to be unmapped.
    ``ringing`` lists the connections with a doorbell, for the daemon's spin loop.
    """

    path: str
    find_session: Callable[[bytes], Any]
    mode: int = 0o600  # the daemon passes its ZeroMQ socket file's: whoever may use one may use both
    watch: Callable[[int], None] = lambda fd: None
    unwatch: Callable[[int], None] = lambda fd: None
    make_doorbell: Optional[Callable[[], Any]] = None
    settle: Callable[[], None] = lambda: None
    listener: Optional[socket.socket] = None
    connections: dict = field(default_factory=dict)  # fd -> LaneConnection
    ringing: list = field(default_factory=list)  # the connections with a doorbell
    dropped: int = 0
    _buffer: bytearray = field(default_factory=lambda: bytearray(LANE_MAX_BYTES))

    def open(self) -> None:
        try:
            os.unlink(self.path)  # ours: the ZeroMQ socket beside it was just bound by us
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        os.chmod(self.path, self.mode)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener

    def accept(self) -> list[LaneConnection]:
        """Every pending connection (non-blocking); over ``MAX_LANES`` they are closed at once."""
        accepted = []
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("lane accept failed: %s", exc)
                break
            if len(self.connections) >= MAX_LANES:
                sock.close()
                self.dropped += 1
                continue
            sock.setblocking(False)
            pid, uid = peer_credentials(sock)
            connection = LaneConnection(sock, sock.fileno(), pid, uid)
            self.connections[connection.fd] = connection
            self.watch(connection.fd)
            accepted.append(connection)
        return accepted

    def read(self, connection: LaneConnection, limit: int) -> list[LaneEvent]:
        """Up to ``limit`` datagrams queued on ``connection``, as events, in order."""
        events = []
        while len(events) < limit:
            try:
                data = receive_datagram(connection.sock, self._buffer, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except LaneFramingError as exc:
                events.append(LaneEvent(connection, error=str(exc)))
                continue
            except OSError:  # reset by a dying peer
                data = None
            if data is None and not peer_hung_up(connection.sock):
                # A 0-byte datagram reads like the peer's close (both return 0 bytes, no flags);
                # only the hang-up tells them apart. It is a datagram with a bad header.
                events.append(LaneEvent(connection, error="a 0-byte datagram has no frame count"))
                continue
            if data is None:
                events.append(LaneEvent(connection, closed=True))
                break
            try:
                frames = split_datagram(memoryview(data))
            except LaneFramingError as exc:
                events.append(LaneEvent(connection, error=str(exc)))
                continue
            if connection.session is None:
                events.append(self._handshake(connection, frames))
                if connection.session is None:
                    break  # refused: closed
                continue
            # A kick is not a request: it asks the loop to look at the lane's doorbell page.
            connection.session.counters["doorbell_kicks" if is_kick(frames) else "lane_requests"] += 1
            events.append(LaneEvent(connection, frames=frames))
        return events

    def _handshake(self, connection: LaneConnection, frames: list) -> LaneEvent:
        refusal = None
        session = None
        if len(frames) != 2 or bytes(frames[0]) != LANE_MAGIC or len(frames[1]) != TOKEN_BYTES:
            refusal = "the first datagram on a lane must be [magic, token]"
        else:
            session = self.find_session(bytes(frames[1]))
            if session is None:
                refusal = "unknown or expired lane token: say hello again"
            else:
                refusal = handshake_refusal(connection.pid, connection.uid, session)
        if refusal is not None:
            self.send(connection, [b"refused", refusal.encode()])
            self.close(connection)
            return LaneEvent(connection, refused=refusal)
        for other in [c for c in self.connections.values() if c.session is session and c is not connection]:
            self.close(other)  # one lane per session: the newest (a reconnecting client) wins
        connection.session = session
        session.lane_open = True
        doorbell = self._doorbell_for(connection)
        if doorbell is None:
            self.send(connection, [b"ok"])
        else:
            try:
                send_frames(connection.sock, [b"ok", HANDSHAKE_OFFER], socket.MSG_DONTWAIT, fds=(doorbell.fd,))
            except OSError as exc:
                log.info("a lane handshake answer was dropped: %s", exc)
            doorbell.handed_over()
        return LaneEvent(connection, attached=True)

    def _doorbell_for(self, connection: LaneConnection) -> Any:
        if self.make_doorbell is None:
            return None
        try:
            doorbell = self.make_doorbell()
        except Exception as exc:  # noqa: BLE001 - the lane serves without one
            log.warning("no doorbell for a lane of session %s (%s): it answers on the lane", connection.session.label, exc)
            return None
        if doorbell is None:
            return None
        # Awake: the loop is running now, and it clears every page's flag before it sleeps. A
        # page left at 0 would send its client to the lane for as long as the loop never sleeps.
        doorbell.set_awake(True)
        connection.doorbell = doorbell
        connection.session.doorbell_open = True
        self.ringing.append(connection)
        return doorbell

    def set_awake(self, awake: bool) -> None:
        for connection in self.ringing:
            connection.doorbell.set_awake(awake)

    def forget_in_flight(self) -> None:
        """Every device was synchronized: no doorbell page can still be written."""
        for connection in self.ringing:
            connection.doorbell.in_flight.clear()

    def all_settled(self) -> bool:
        """Whether every done word signalled on any page has been written (no GPU call)."""
        return all(connection.doorbell.settled() for connection in self.ringing)

    def any_rung(self) -> bool:
        return any(connection.doorbell.rung() for connection in self.ringing)

    def send(self, connection: LaneConnection, frames: list) -> bool:
        """Send without blocking; False (counted) when the peer's queue is full or it is gone."""
        try:
            send_frames(connection.sock, frames, socket.MSG_DONTWAIT)
            return True
        except OSError as exc:
            self.dropped += 1
            log.info("a lane reply was dropped: %s", exc)
            return False

    def close(self, connection: LaneConnection) -> None:
        if self.connections.pop(connection.fd, None) is not None:
            self.unwatch(connection.fd)
            if connection.session is not None:
                connection.session.lane_open = False
        if connection.doorbell is not None:
            self.ringing.remove(connection)
            doorbell, connection.doorbell = connection.doorbell, None
            if connection.session is not None:
                connection.session.doorbell_open = False
            if not doorbell.settled():
                self.settle()  # the GPU may still write the page: never unmap it under a write
            doorbell.close()
        try:
            connection.sock.close()
        except OSError:
            pass

    def close_session_lanes(self, session: Any) -> list[LaneConnection]:
        closing = [c for c in self.connections.values() if c.session is session]
        for connection in closing:
            self.close(connection)
        return closing

    def shutdown(self) -> None:
        for connection in list(self.connections.values()):
            self.close(connection)
        self.connections.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)
