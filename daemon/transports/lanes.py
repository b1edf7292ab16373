"""Submit lanes on cgtreed's side: the lane listener beside the ipc:// socket file
(``<socket>.lane``, config ``daemon.lanes``), and serving the requests read from each session's
lane (``cgtree.daemon.lane`` holds the hub, the handshake and the datagrams).

Invariants:
- The lane hub is ``Daemon.lanes`` (None when lanes are off or could not be opened: the service
  then works over ZeroMQ alone).
- The listener gets the same access as the ZeroMQ socket file (systemd deployments: a group).
- Only the lanes the poll reported ready are read, one datagram each per turn: a turn costs the
  same with one session or a thousand.
- A request on a lane whose session ended gets ``no_session`` (it did not run) and the lane is
  closed; a reply too large for a datagram goes over ZeroMQ, with a notice on the lane.
- A lane's uid was checked at its handshake: its requests are answered as its session owner's.
- At stop, requests already queued on lanes (doorbell pages included) get ``unavailable``: they
  never ran, so they are safe to re-send.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from cgtree.daemon.dispatch import peek_request_id
from cgtree.daemon.doorbell import is_kick
from cgtree.daemon.lane import MOVED, LaneConnection, LaneHub, fits_lane, lane_path_for
from cgtree.daemon.plans import is_plan_request
from cgtree.daemon.protocol import encode_error
from cgtree.daemon.transports import MAX_REQUESTS_PER_TURN

log = logging.getLogger("cgtree.daemon.server")


class LaneTransport:
    """Serves ``daemon.lanes`` (state of the daemon it serves: ``daemon``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def open(self) -> None:
        """The submit-lane listener beside an ipc:// socket file (config ``daemon.lanes``)."""
        daemon = self.daemon
        socket_path = daemon.zmq_transport.socket_path
        path = lane_path_for(socket_path)
        if not daemon.config.daemon.lanes or path is None:
            return
        try:  # the same access as the ZeroMQ socket file (systemd deployments: a group)
            mode = os.stat(socket_path).st_mode & 0o777
        except OSError:
            mode = 0o600
        hub = LaneHub(path, find_session=daemon.sessions.by_lane_token, mode=mode, watch=daemon.waiting.watch_fd,
                      unwatch=daemon.waiting.unwatch_fd, make_doorbell=daemon.doorbells.make_doorbell, settle=daemon._settle_devices)
        try:
            hub.open()
        except OSError as exc:  # the service still works over ZeroMQ alone
            log.warning("no submit lanes (cannot listen on %s: %s); every request goes over ZeroMQ", path, exc)
            return
        daemon.waiting.watch_fd(hub.listener.fileno())
        daemon.lanes = hub

    def serve(self, ready: Optional[dict]) -> None:
        """New lanes and lane requests (``ready`` from ``wait_for_events`` says which lane fds to
        read; None: every lane)."""
        daemon = self.daemon
        hub = daemon.lanes
        if hub is None:
            return
        if ready is None or hub.listener.fileno() in ready:
            hub.accept()
        # Only the lanes with something to read (the poll said which): a turn costs the same
        # with one session or a thousand.
        connections = list(hub.connections.values()) if ready is None else \
            [c for c in map(hub.connections.get, ready) if c is not None]
        for connection in connections:
            if hub.connections.get(connection.fd) is not connection:
                continue  # closed earlier in this turn (a newer lane of its session replaced it)
            if daemon._pending_signals or daemon.exit_code is not None:
                return
            # One datagram per ready lane and turn: a client has one request in flight, and a
            # second read would only meet EAGAIN (an exception: microseconds on every submit).
            for event in hub.read(connection, 1 if ready is not None else MAX_REQUESTS_PER_TURN):
                if event.closed:
                    hub.close(connection)
                    if connection.session is not None and connection.session.client.alive() is False:
                        daemon._next_housekeeping = 0.0  # a client died: reclaim its session now
                elif event.refused is not None:
                    log.info("lane handshake refused: %s", event.refused)
                elif event.error is not None:
                    daemon.counters["errors"] += 1
                    hub.send(connection, [encode_error(None, "too_large" if "larger" in event.error else "bad_request",
                                                       f"submit lane: {event.error}")])
                elif event.frames is not None:
                    self._answer_on_lane(connection, event.frames)
                if daemon._pending_signals or daemon.exit_code is not None:
                    return

    def _answer_on_lane(self, connection: LaneConnection, frames: list) -> None:
        daemon = self.daemon
        session = connection.session
        if session.state != "live" or session.identity is None:
            # The session ended under the lane (normally its lanes close with it): say so, so
            # the client says hello again, knowing the request did not run.
            daemon.lanes.send(connection, [encode_error(peek_request_id(frames[0]), "no_session", "the session of this lane has ended")])
            daemon.lanes.close(connection)
            return
        if is_plan_request(frames):
            reply = daemon.dispatcher.answer_plan(session, frames[0])
        elif is_kick(frames):
            if connection.doorbell is not None:  # the client rang while the daemon fell asleep
                daemon.doorbells.serve_doorbell(connection)
            return
        else:
            reply = daemon.dispatcher.answer(session.identity, frames, session.owner)  # the lane's uid was checked at its handshake
        self.reply_on_lane(connection, reply)

    def reply_on_lane(self, connection: LaneConnection, reply: list) -> None:
        if fits_lane(reply):
            self.daemon.lanes.send(connection, reply)
        else:  # too large for a datagram: over ZeroMQ, and a notice on the lane
            self.daemon.zmq_transport.send([connection.session.identity, *reply])
            self.daemon.lanes.send(connection, MOVED)

    def refuse_pending(self, until: float) -> int:
        """Requests already queued on lanes get ``unavailable`` (never run: safe to re-send).
        ``until`` is not waited for: what is queued now is refused, doorbell pages included."""
        daemon = self.daemon
        refused = 0
        if daemon.lanes is None:
            return 0
        for connection in list(daemon.lanes.connections.values()):
            taken = connection.doorbell.take() if connection.doorbell is not None else None
            if taken is not None:
                daemon.doorbells.answer_on_lane_instead(connection, taken[0], [encode_error(
                    taken[0], "unavailable", "the daemon is stopping; retry after it restarts")])
                refused += 1
            for event in daemon.lanes.read(connection, MAX_REQUESTS_PER_TURN):
                if event.frames is not None and not is_kick(event.frames):
                    request_id = peek_request_id(event.frames[0])
                    daemon.lanes.send(connection, [encode_error(request_id, "unavailable", "the daemon is stopping; retry after it restarts")])
                    refused += 1
        return refused

    def close_session_lanes(self, session: Any) -> None:
        if self.daemon.lanes is not None:
            self.daemon.lanes.close_session_lanes(session)

    def close(self) -> None:
        if self.daemon.lanes is not None:
            self.daemon.lanes.shutdown()
            self.daemon.lanes = None
