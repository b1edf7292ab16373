"""Close this client's session now: free its trees, pools, output buffers and IPC handles.

A named session is closed too (not parked): saying bye means the client is done. The client
closes its own mappings of the output buffers before sending bye.

Request: ``{}``.

Reply: ``{"closed": int}`` (the session id).

Errors: ``no_session``.
"""

from __future__ import annotations

from cgtree.daemon.protocol import Reply

NAME = "bye"
NEEDS_SESSION = True


def execute(ctx, session, body, frames) -> Reply:
    ctx.sessions.close(session, "the client said bye", client_alive=True)
    return Reply({"closed": session.session_id})
