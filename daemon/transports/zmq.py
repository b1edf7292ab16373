"""The ZeroMQ ROUTER endpoint of cgtreed: bind (refusing an endpoint a live daemon serves,
removing a stale socket file), receive and answer requests, refuse the queued ones at stop,
close and remove the socket file.

Invariants:
- A socket file is removed only when this daemon bound it: a daemon refused at start must not
  remove a live one's socket (``bound``).
- A socket file nobody listens on is stale at once; one with a listener gets half a second to
  answer a ping (a daemon still exiting listens but never answers).
- Sends never block (``NOBLOCK``, ``ROUTER_MANDATORY``): a reply to a client that vanished or
  stopped reading is dropped and counted.
- A signal that arrived during a request is seen before the next one: a stop finishes the
  request in flight, not the queue behind it.
- Peer credentials (SO_PEERCRED) are read only from ipc:// messages (``Daemon._peer_credentials``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import zmq

from cgtree.daemon.lane import lane_path_for
from cgtree.daemon.protocol import encode_error, request_id_of, unpack
from cgtree.daemon.runtime_dir import has_listener, ipc_path
from cgtree.daemon.startup import StartError
from cgtree.daemon.transports import MAX_REQUESTS_PER_TURN

log = logging.getLogger("cgtree.daemon.server")


class ZmqTransport:
    """The ROUTER socket on ``daemon.endpoint`` (state of the daemon it serves: ``daemon``)."""

    def __init__(self, daemon: Any, endpoint: str) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self.context: Optional[zmq.Context] = None
        self.socket: Optional[zmq.Socket] = None
        self.socket_path = ipc_path(endpoint)
        self.bound = False

    def bind(self) -> zmq.Socket:
        """Bind the ROUTER socket (``StartError`` when another daemon serves the endpoint or it
        cannot be bound); the bound socket."""
        self.context = zmq.Context()
        if self.socket_path is not None and os.path.exists(self.socket_path):
            # A file nobody listens on is stale at once; one with a listener gets half a second
            # to answer a ping (a daemon still exiting listens but never answers).
            if has_listener(self.socket_path) and _endpoint_answers(self.context, self.endpoint):
                raise StartError(f"another cgtreed already serves {self.endpoint}")
            log.info("removing stale socket file %s", self.socket_path)
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished client fails loudly, not silently
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client's new socket (same routing id) takes over
        sock.setsockopt(zmq.MAXMSGSIZE, self.daemon.config.daemon.max_message_bytes)  # per frame; totals are checked per request
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise StartError(f"cannot bind {self.endpoint}: {exc}") from exc
        self.bound = True  # from now on the socket file is ours to remove
        self.socket = sock
        return sock

    def serve(self, ready: Optional[dict]) -> None:
        if not (ready is None or self.socket in ready):
            return
        daemon = self.daemon
        for _ in range(MAX_REQUESTS_PER_TURN):
            # A signal that arrived during the last request is seen before the next one: a stop
            # finishes the request in flight, not the queue behind it.
            if daemon._pending_signals:
                return
            try:
                message = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("receive failed: %s", exc)
                return
            reply = daemon.dispatcher.handle_message(message)
            if reply is not None:
                self.send(reply)
            if daemon.exit_code is not None:
                return

    def send(self, frames: list) -> None:
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone) or EAGAIN (not reading)
            self.daemon.counters["dropped"] += 1
            log.info("reply to a client dropped: %s", exc)

    def refuse_pending(self, until: float) -> int:
        """Requests queued on the socket until ``until`` get ``unavailable``; how many."""
        refused = 0
        while self.daemon.clock() < until and self.socket is not None:
            try:
                message = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                time.sleep(0.01)  # a request already on its way still gets its answer
                continue
            except zmq.ZMQError:
                break
            if len(message) < 2:
                continue
            head = [message[0]] + ([b""] if len(message) > 2 and len(message[1]) == 0 else [])
            request_id = None
            try:
                request_id = request_id_of(unpack(message[len(head)].bytes))
            except Exception:
                pass
            self.send(head + [encode_error(request_id, "unavailable", "the daemon is stopping; retry after it restarts")])
            refused += 1
        return refused

    def close(self) -> None:
        if self.socket is not None:
            try:
                self.socket.close(linger=100)  # let the "unavailable" replies out
            except zmq.ZMQError:
                pass
            self.socket = None
        if self.context is not None:
            self.context.term()
            self.context = None
        self.unlink_socket_file()

    def unlink_socket_file(self) -> None:
        # Only files we bound: a daemon refused at start must not remove a live one's socket.
        if self.socket_path is not None and self.bound:
            for path in (self.socket_path, lane_path_for(self.socket_path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)


def _endpoint_answers(context: zmq.Context, endpoint: str, timeout_ms: int = 500) -> bool:
    """Whether a daemon answers a ping on ``endpoint`` (so its socket file is not stale)."""
    from cgtree.daemon.protocol import encode_request, unpack

    probe = context.socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.connect(endpoint)
        probe.send(encode_request(0, "ping", {}))
        if probe.poll(timeout_ms, zmq.POLLIN):
            unpack(probe.recv())
            return True
        return False
    except Exception:
        return False
    finally:
        probe.close(0)
