"""The client's session with cgtreed (``Session``): hello, re-hello and re-registering after a
restart, and what a call does when its daemon went away.

Invariants (see ``cgtree.client.client``'s docstring for the whole story):
- A request that needs the session says hello first; ``no_session`` -> hello, ``unknown_graph``
  -> register, each retried once per request.
- A request whose daemon went away is sent once more to the next daemon only when that is safe
  (``resend_after_interruption``): it never ran (``DaemonGone``, ``unavailable``), or it is
  idempotent (every command but ``submit``; a ``submit`` of a graph that writes none of its
  inputs). Otherwise ``RequestInterrupted``. Only one re-send per call.
- A new daemon (another pid) means a new session: the old session's registrations, outputs and
  lane are forgotten; when the watch says the daemon is gone for sure they are let go at once.
- Waiting for the next daemon: one ping per socket file, kept queued while the file stays the
  same, a new one on a new socket when the file is replaced; at most ``timeout_s``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

import zmq

from cgtree.client.connection import _decode_reply_for
from cgtree.client.errors import DaemonError, DaemonGone, DaemonUnavailable, RequestInterrupted
from cgtree.client.registration import GraphHandle
from cgtree.client.watch import file_identity
from cgtree.daemon.protocol import encode_request
from cgtree.daemon.runtime_dir import ipc_path

log = logging.getLogger("cgtree.client")

RECONNECT_POLL_S = 0.05  # how often a client waiting for a restarted daemon looks at the socket file
PING_RESEND_S = 1.0  # endpoints without a socket file (tcp://): how often that wait pings again
# Requests that may be sent again when the daemon died before answering: running them twice
# (once on the old daemon, once on the new) ends in the same state. ``submit`` is decided per
# graph (``resend_after_interruption``); ``bye`` is never re-sent (the session is gone anyway).
IDEMPOTENT_OPS = frozenset({"ping", "status", "hello", "register", "mark_step", "release", "reset"})
CLIENT_NAME = "cgtree.client 0.1"


class Session:
    """The session's lifecycle and the recovery from a daemon's restart (state: the ``Client``'s
    ``session_id``, ``daemon_pid``, ``devices``, ``max_message_bytes``)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def call(self, op: str, body: dict, frames: Sequence[Any] = (), *, handle: Optional[GraphHandle] = None) -> tuple[dict, list]:
        """A request that needs the session: say hello first if needed; after a daemon restart
        say hello again (``no_session``) and re-register (``unknown_graph``), once each."""
        self.ensure()
        retried: set[str] = set()
        while True:
            try:
                return self.client.connection.call(op, body, frames)
            except DaemonError as exc:
                if exc.code == "no_session" and "no_session" not in retried:
                    retried.add("no_session")
                    self.forget()
                    self.ensure()
                    if handle is not None:
                        self.client.registration.register_payload(handle)
                    continue
                if exc.code == "unknown_graph" and handle is not None and "unknown_graph" not in retried:
                    retried.add("unknown_graph")
                    self.client.registration.registered.discard((handle.device, handle.graph_id))
                    self.client.registration.register_payload(handle)
                    continue
                raise

    def forget(self) -> None:
        self.client.session_id = None
        self.client.connection.lane.close()
        self.client.connection.lane.offer = None
        self.client.registration.registered.clear()
        self.client.buffers.invalidate_all()  # a new daemon: the old buffers are gone

    def ensure(self) -> None:
        if self.client.session_id is not None:
            return
        reply, _ = self.client.connection.call("hello", {"pid": os.getpid(), "name": self.client.session_name,
                                                          "client": CLIENT_NAME})
        self.client.connection.watch.bind()  # the daemon that just answered: what waits watch from now on
        if self.client.daemon_pid is not None and reply["daemon_pid"] != self.client.daemon_pid:
            self.client.registration.registered.clear()
            self.client.buffers.invalidate_all()
        self.client.session_id = reply["session"]
        self.client.daemon_pid = reply["daemon_pid"]
        self.client.encoder.uuid_map = None
        self.client.encoder.wire_names.clear()
        self.client.devices = reply["devices"]
        self.client.max_message_bytes = reply["max_message_bytes"]
        self.client.connection.lane.spin_now = spin_while_waiting(self.client.spin_s, self.client.devices)
        self.client.connection.lane.close()
        self.client.connection.lane.offer = reply.get("lane") if self.client.connection.lane.enabled else None
        self.client.connection.lane.retry_at = 0.0

    def with_recovery(self, op: str, attempt: Any, *, mutates_inputs: Optional[bool] = False, what: Any = "") -> Any:
        """``attempt()``; if the daemon went away under it, wait for the next daemon and run it
        once more when ``resend_after_interruption`` allows (see the module docstring).
        ``what`` names the subject in messages: text, or the GraphHandle submitted."""
        try:
            return attempt()
        except DaemonGone as exc:
            interrupted, may_have_run = exc, False
        except RequestInterrupted as exc:
            interrupted, may_have_run = exc, True
        except DaemonError as exc:
            if exc.code != "unavailable":
                raise
            interrupted, may_have_run = exc, False
        if isinstance(what, GraphHandle):
            what = f"graph {what.short_name}"
        subject = f"{op} of {what}" if what else op
        if not resend_after_interruption(op, may_have_run=may_have_run, mutates_inputs=mutates_inputs):
            self.client.connection.zmq.reset()
            self.let_go_if_gone()
            raise RequestInterrupted(
                f"cgtreed went away while {subject} was in flight; not sent again because the graph writes its inputs "
                f"(it may have run partly: check them before submitting again). The next call reconnects. ({interrupted})", op,
            ) from interrupted
        log.warning("cgtreed went away during %s (%s); waiting for it to come back, then sending it once more", subject, interrupted)
        self.await_daemon(op, interrupted)
        return attempt()

    def await_daemon(self, op: str, cause: BaseException) -> None:
        """Wait (up to ``timeout_s``) until a daemon answers ping at the endpoint. A new daemon
        (another pid) means a new session: forget ours, its registrations and its outputs."""
        deadline = time.monotonic() + self.client.timeout_s
        self.client.connection.lane.close()
        self.client.connection.zmq.reset()
        self.let_go_if_gone()
        self.client.connection.watch.unbind()
        reply = self.ping_until_answered(deadline)
        if reply is None:
            raise DaemonUnavailable(
                f"cgtreed at {self.client.endpoint} did not come back within {self.client.timeout_s:g} s "
                f"after {op!r} was interrupted") from cause
        self.client.connection.watch.bind()
        if reply.get("daemon_pid") != self.client.daemon_pid:
            log.info("cgtreed restarted (pid %s -> %s): new session, graphs registered again", self.client.daemon_pid,
                     reply.get("daemon_pid"))
            self.forget()

    def let_go_if_gone(self) -> None:
        """When the watch says the daemon is gone for sure (not merely a lane that closed), drop
        the session now, not when the next daemon answers: the mappings of its CUDA output
        buffers (CUDA IPC) and its doorbell page are all that a dead daemon's memory may still
        be held by, and its exit may wait for them."""
        if self.client.session_id is not None and self.client.connection.watch.gone(fresh=True) is not None:
            log.info("cgtreed at %s is gone (%s): session %s forgotten", self.client.endpoint,
                     self.client.connection.watch.gone(), self.client.session_id)
            self.forget()

    def ping_until_answered(self, deadline: float) -> Optional[dict]:
        """The first ping reply from a daemon at the endpoint, or None at ``deadline``.

        One ping per socket file: it stays queued while the file is the same (a daemon that
        bound it answers when its loop starts: no reply is dropped for being late), and a file
        replaced by another daemon's gets a new ping on a new socket (the old connection may
        lead to a daemon that is still exiting). A daemon stopping answers ``unavailable``:
        asked again on the next file."""
        path = ipc_path(self.client.endpoint)
        sent_to: Any = None  # the file the ping in flight went to
        sent_at = request_id = 0
        while time.monotonic() < deadline:
            identity = file_identity(path) if path is not None else "endpoint"
            if identity is None or (path is None and time.monotonic() - sent_at > PING_RESEND_S):
                sent_to = None
            if identity is None:
                self.client.connection.zmq.reset()
                time.sleep(RECONNECT_POLL_S)
                continue
            if identity != sent_to:
                self.client.connection.zmq.reset()
                try:
                    sock = self.client.connection.zmq.connect()
                except DaemonUnavailable:  # the file went away again
                    time.sleep(RECONNECT_POLL_S)
                    continue
                request_id, sent_at = next(self.client.connection.ids), time.monotonic()
                try:
                    sock.send_multipart([encode_request(request_id, "ping", {})], flags=zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(RECONNECT_POLL_S)
                    continue
                sent_to = identity
            if not self.client.connection.zmq.socket.poll(int(RECONNECT_POLL_S * 1000), zmq.POLLIN):
                continue
            try:
                decoded = _decode_reply_for(self.client.connection.zmq.socket.recv_multipart(copy=False), request_id, "ping")
            except DaemonError:  # unavailable: the old daemon is stopping
                sent_to = None
                time.sleep(RECONNECT_POLL_S)
                continue
            if decoded is not None:
                return decoded[0]
        self.client.connection.zmq.reset()
        return None


def spin_while_waiting(spin_s: float, devices: list) -> float:
    """How long to poll for a reply without sleeping: ``spin_s`` when the daemon serves a CUDA
    device (its replies wait on the GPU, not on CPU work); 0 for a daemon of CPU replay
    backends only, whose work needs the CPU cores a spinning client would take."""
    return spin_s if any(isinstance(d, dict) and d.get("backend") == "cuda" for d in devices) else 0.0


def resend_after_interruption(op: str, *, may_have_run: bool, mutates_inputs: Optional[bool]) -> bool:
    """Whether a request whose daemon went away may be sent once more to the next daemon.

    may_have_run: False when the daemon refused it (``unavailable``): it never ran, any request
        may be re-sent. True when the connection dropped before the reply: it may have run.
    mutates_inputs: for ``submit``: whether the graph writes any of its inputs; None (unknown)
        counts as yes. Running a non-mutating inference graph twice gives the same outputs.
    """
    if not may_have_run:
        return True
    if op == "submit":
        return mutates_inputs is False
    return op in IDEMPOTENT_OPS
