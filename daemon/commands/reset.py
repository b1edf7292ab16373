"""Drop this session's trees (all recordings and their pool) on one device or all; graphs
stay registered, so the next submit warms up and records again.

Request: ``{"device": str | None}``.

Reply: ``{"devices": [str]}``: the devices whose trees were dropped.

Errors: ``no_session``, ``unknown_device``.
"""

from __future__ import annotations

from cgtree.daemon.protocol import Reply, field_of

NAME = "reset"
NEEDS_SESSION = True


def execute(ctx, session, body, frames) -> Reply:
    device = field_of(body, "device", str, None)
    names = [ctx.device(device).name] if device is not None else list(session.devices)
    dropped = []
    for name in names:
        state = session.devices.pop(name, None)
        if state is not None:
            state.close(client_alive=True)
            dropped.append(name)
    return Reply({"devices": dropped})
