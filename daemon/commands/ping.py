"""Liveness check; also a heartbeat for the caller's session if it has one.

Request: ``{}``.

Reply: ``{"pong": true, "daemon_pid": int, "protocol": int, "session": int | None}``.

Errors: none of its own.
"""

from __future__ import annotations

import os

from cgtree.daemon.protocol import PROTOCOL_VERSION, Reply

NAME = "ping"
NEEDS_SESSION = False


def execute(ctx, session, body, frames) -> Reply:
    return Reply({"pong": True, "daemon_pid": os.getpid(), "protocol": PROTOCOL_VERSION,
                  "session": session.session_id if session is not None else None})
