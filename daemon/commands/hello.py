"""Open (or re-open, or adopt) this client's session. Send it first.

Request: ``{"pid": int, "name": str | None, "client": str}``. ``pid`` is the client's process
id; the daemon records that process's start time itself, so a reused pid is not mistaken for
this client when it dies. ``name`` (optional) names the session: when a named session's client
dies, its recordings are parked (outputs invalidated, IPC handles closed) for a linger period
and adopted, warm, by the next client saying hello with the same name. ``client`` is free text
for logs (e.g. ``"cgtree.client 0.1.0"``). Saying hello again from the same routing id and pid
returns the same session (a reconnect). A session belongs to the uid of the process that said
hello (the kernel's peer credentials, never a field of the request): session names are per
user, so a name adopts only a session of the same user, and every later request on the
session must come from that uid.

Reply: ``{"session": int, "adopted": bool, "protocol": int, "daemon_pid": int,
"devices": [{"device": str, "backend": "cuda" | "cpu-replay", "uuid": str | None}],
"max_message_bytes": int, "lane"?: {"path": str, "token": bytes}}``. ``lane`` (absent when
the daemon offers none) lets the client attach this session's submit lane: a unix seqpacket
socket that carries requests of up to 128 KiB with the same envelope and frames, much faster
than ZeroMQ (see ``cgtree.daemon.lane`` for the framing and the handshake). ``uuid`` identifies a GPU across processes whose
``CUDA_VISIBLE_DEVICES`` number it differently: clients translate their device indices (in
``device`` fields and IPC exports) to the daemon's by it.

Errors: ``bad_request`` (pid missing, not positive or not a live process, name too long),
``session_in_use`` (a live client of the same user holds that name), ``forbidden`` (the routing
id is bound to another user's session).
"""

from __future__ import annotations

import os

from cgtree.daemon.protocol import PROTOCOL_VERSION, ProtocolError, Reply, field_of
from cgtree.daemon.sessions import MAX_SESSION_NAME_CHARS, ClientProcess, Forbidden, SessionInUse

NAME = "hello"
NEEDS_SESSION = False


def execute(ctx, session, body, frames) -> Reply:
    pid = field_of(body, "pid", int)
    if pid <= 0:  # psutil would raise ValueError: a bug's "internal" for a bad field
        raise ProtocolError("bad_request", f"pid must be a positive process id, got {pid}")
    name = field_of(body, "name", str, None)
    field_of(body, "client", str, "")
    if name is not None and not 0 < len(name) <= MAX_SESSION_NAME_CHARS:
        raise ProtocolError("bad_request", f"session name must be 1 to {MAX_SESSION_NAME_CHARS} characters")
    try:
        client = ClientProcess.lookup(pid)
    except ProcessLookupError:
        raise ProtocolError("bad_request", f"pid {pid} is not a running process") from None
    try:
        opened, adopted = ctx.sessions.open(ctx.identity, client, name, owner=ctx.peer_uid)
    except SessionInUse as exc:
        raise ProtocolError("session_in_use", str(exc)) from None
    except Forbidden as exc:
        raise ProtocolError("forbidden", str(exc)) from None
    body = {
        "session": opened.session_id,
        "adopted": adopted,
        "protocol": PROTOCOL_VERSION,
        "daemon_pid": os.getpid(),
        "devices": [{"device": rt.name, "backend": rt.backend, "uuid": rt.uuid} for rt in ctx.devices.values()],
        "max_message_bytes": ctx.config.daemon.max_message_bytes,
    }
    if ctx.lane_path is not None:
        body["lane"] = {"path": ctx.lane_path, "token": opened.lane_token}
    return Reply(body)
