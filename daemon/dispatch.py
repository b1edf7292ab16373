"""cgtreed's dispatcher: one request's frames -> its command -> the reply's frames, whichever
transport brought it (ZeroMQ, a submit lane, a doorbell page).

``Dispatcher`` decodes the envelope, checks the tenancy (``cgtree.daemon.tenancy``), runs the
command (``cgtree.daemon.commands``) or the prepared submit plan (``cgtree.daemon.plans``), and
turns every failure into its error reply.

Invariants:
- One bad request never takes the loop down: protocol errors get their error reply, any other
  exception in a handler becomes ``internal`` with the request id logged. Unanswerable messages
  (no routing id, nothing after it) are dropped and counted.
- A routing id bound to another user's session is refused (``forbidden``) before the command
  runs: nothing of that session is touched.
- Every log line written while a request is handled, its refusal included, carries the request
  id (``logsetup.request_context``).
- A CUDA error goes to ``Daemon.on_cuda_error`` (the fatal exit when the context is poisoned);
  the request still gets its ``cuda_error`` reply.
- Requests and errors are counted in the daemon's ``counters``.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Callable, Optional

from cgtree.daemon import commands as command_registry
from cgtree.daemon.commands import CommandContext
from cgtree.daemon.logsetup import request_context
from cgtree.daemon.plans import PlanReplayed, PlanServices, pack_plan_reply, parse_plan_request, run_plan
from cgtree.daemon.protocol import (
    ProtocolError,
    Request,
    decode_request,
    encode_error,
    encode_reply,
    frame_view,
    request_id_of,
    unpack,
)
from cgtree.daemon.tenancy import UNVERIFIED, may_use, peer_uid_of_frame
from cgtree.daemon.tenancy import describe as describe_uid

log = logging.getLogger("cgtree.daemon.server")


def looks_like_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA error" in text or "cudaError" in text or type(exc).__name__ == "AcceleratorError"


def peek_request_id(frame: Any) -> Any:
    """The request id of an envelope, if cheaply readable (before decoding it properly)."""
    if len(frame) > 64 * 1024:
        return None
    try:
        return request_id_of(unpack(frame_view(frame)))
    except Exception:
        return None


class Dispatcher:
    """Requests -> replies for ``daemon`` (its config, sessions, devices, counters)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self._plan_services: Optional[PlanServices] = None  # built on the first plan run

    def handle_message(self, message: list) -> Optional[list]:
        """One multipart message -> the multipart reply (None: unanswerable, dropped)."""
        if len(message) < 2:
            self.daemon.counters["dropped"] += 1
            log.warning("dropped a message with no content after its routing id")
            return None
        identity = message[0].bytes
        # A REQ client puts an empty delimiter frame before the envelope; echo it back.
        head = [identity]
        body_frames = message[1:]
        if len(body_frames) >= 2 and len(body_frames[0]) == 0:
            head.append(b"")
            body_frames = body_frames[1:]
        peer_uid = peer_uid_of_frame(message[0]) if self.daemon._peer_credentials else UNVERIFIED
        return head + self.answer(identity, body_frames, peer_uid)

    def answer(self, identity: bytes, body_frames: list, peer_uid: Optional[int] = UNVERIFIED) -> list:
        """One request's frames (envelope, data) from ``identity``, sent by a process of uid
        ``peer_uid`` (``cgtree.daemon.tenancy``) -> the reply's frames."""
        self.daemon.counters["requests"] += 1
        session = self.daemon.sessions.get(identity)
        request, refusal = self._decode(body_frames)
        request_id = request.request_id if request is not None else getattr(refusal, "request_id", None)
        if refusal is None and session is not None and not may_use(peer_uid, session.owner):
            # A routing id bound to another user's session (handed over, guessed): nothing of that
            # session may be touched, whatever the command.
            refusal = ProtocolError("forbidden", f"this routing id belongs to a session of another user; {describe_uid(peer_uid)} may not use it")
            session = None
        with request_context(request_id if request_id is not None else "?", session.label if session is not None else None):
            if refusal is not None:
                return [self._refuse(request_id, "?" if request is None else request.op, refusal)]
            return self._dispatch(identity, session, request, peer_uid)

    def answer_plan(self, session: Any, frame: Any, *, plan: Optional[tuple[int, int]] = None,
                    settle: Optional[Callable] = None, gate: Any = None) -> Any:
        """A prepared submit (``cgtree.daemon.plans``) on ``session``'s lane -> the reply's frames;
        for a doorbell's (``plan`` = (seq, plan id), ``settle``, a gated request's ``gate``) a
        ``PlanReplayed`` when it replayed, a ``PlanVetoed`` when its gate refused the launch.
        The hot path of a submit loop: no per-request context object; errors are answered as
        ``_guarded`` answers them."""
        daemon = self.daemon
        daemon.counters["requests"] += 1
        request_id, plan_id = parse_plan_request(frame) if plan is None else plan
        session.touch(daemon.clock())
        session.counters["requests"] += 1
        if self._plan_services is None:
            self._plan_services = PlanServices(daemon.devices, daemon.watchdog.keepalive, daemon.metrics)
        with request_context(request_id, session.label):
            try:
                outcome = run_plan(self._plan_services, session, request_id, plan_id, settle=settle, gate=gate,
                                   finish_general=partial(self._general_plan_reply, request_id, plan_id, session))
            except Exception as exc:  # noqa: BLE001 - every failure becomes its error reply
                return [self._error_reply(request_id, "submit (plan)", exc)]
        if isinstance(outcome, PlanReplayed) and plan is None:
            return [pack_plan_reply(request_id, outcome.generation, outcome.node_id, outcome.daemon_us)]
        return outcome

    def _general_plan_reply(self, request_id: Any, plan_id: int, session: Any, state: Any, runtime: Any, graph_id: str,
                            outputs: list, received: float) -> list:
        """The full submit reply to a plan run that did not replay into the same slots; it names
        the plan again while the plan still stands (the same output buffer)."""
        from cgtree.daemon.commands import submit

        reply = submit.finish(self._context_for(session.identity, request_id, session.owner), session, state, runtime, graph_id,
                              outputs, received, to_host=False)
        plan = state.plans.by_id.get(plan_id)
        if plan is not None and submit.plannable(reply, state, graph_id) and state.output_buffers.get(graph_id) is plan.buffer:
            reply.body["plan"] = plan_id
        return [encode_reply(request_id, reply.body), *reply.frames]

    def _decode(self, body_frames: list) -> tuple[Optional[Request], Optional[ProtocolError]]:
        """The request, or the refusal (carrying ``request_id`` when the envelope had one)."""
        size = sum(len(frame) for frame in body_frames)
        config = self.daemon.config
        try:
            if not body_frames:  # a lane datagram of zero frames (a ZeroMQ message always has one)
                raise ProtocolError("bad_request", "the message has no frames: frame 0 must be the envelope")
            if size > config.daemon.max_message_bytes:
                error = ProtocolError("too_large", f"message of {size} bytes exceeds daemon.max_message_bytes = {config.daemon.max_message_bytes}")
                error.request_id = peek_request_id(body_frames[0])
                raise error
            return decode_request(frame_view(body_frames[0]), body_frames[1:]), None
        except ProtocolError as exc:
            return None, exc

    def _dispatch(self, identity: bytes, session: Any, request: Request, peer_uid: Optional[int]) -> list:
        """Run the request's command: [reply envelope, *data frames], or [error envelope]."""
        request_id, op = request.request_id, request.op

        def run() -> list:
            command = command_registry.COMMANDS.get(op)
            if command is None:
                raise ProtocolError("unknown_op", f"no command {op!r} (known: {', '.join(sorted(command_registry.COMMANDS))})")
            if command.NEEDS_SESSION and session is None:
                raise ProtocolError("no_session", f"{op} needs a session: send hello first")
            if session is not None:
                session.touch(self.daemon.clock())
                session.counters["requests"] += 1
            reply = command.execute(self._context_for(identity, request_id, peer_uid), session, request.body, request.frames)
            return [encode_reply(request_id, reply.body), *reply.frames]

        return self._guarded(request_id, op, run)

    def _guarded(self, request_id: Any, op: str, run: Callable[[], list]) -> list:
        """``run()``'s reply frames; a refusal, a CUDA error or a bug becomes its error reply."""
        started = time.perf_counter()
        try:
            log.debug("request %s: %s", request_id, op)
            frames = run()
            log.debug("request %s: %s answered in %.3f ms", request_id, op, (time.perf_counter() - started) * 1e3)
            return frames
        except Exception as exc:  # noqa: BLE001 - every failure becomes its error reply
            return [self._error_reply(request_id, op, exc)]

    def _error_reply(self, request_id: Any, op: str, exc: Exception) -> bytes:
        """The error reply for ``exc`` raised while serving a request (counted and logged)."""
        if isinstance(exc, ProtocolError):
            return self._refuse(request_id, op, exc)
        self.daemon.counters["errors"] += 1
        if looks_like_cuda_error(exc):
            return self.daemon.on_cuda_error(request_id, exc)
        self.daemon.counters["internal_errors"] += 1
        log.error("request %s failed with an internal error (op %s)", request_id, op, exc_info=exc)
        return encode_error(request_id, "internal", f"{type(exc).__name__}: {exc} (request {request_id!r}; see the daemon log)")

    def _refuse(self, request_id: Any, op: str, exc: ProtocolError) -> bytes:
        self.daemon.counters["errors"] += 1
        log.info("request %s refused: %s (op %s)", request_id, exc, op)
        return encode_error(request_id, exc.code, exc.message)

    def _context_for(self, identity: bytes, request_id: Any, peer_uid: Optional[int]) -> CommandContext:
        daemon = self.daemon
        return CommandContext(
            identity=identity, request_id=request_id, config=daemon.config, devices=daemon.devices,
            sessions=daemon.sessions, metrics=daemon.metrics, daemon_info=daemon.info,
            next_buffer_id=daemon._next_buffer_id, reload=daemon._reload_command, keepalive=daemon.watchdog.keepalive,
            lane_path=daemon.lanes.path if daemon.lanes is not None else None, peer_uid=peer_uid, daemon_uid=daemon._uid,
        )
