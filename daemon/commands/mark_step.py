"""Mark an iteration boundary: the next submit starts a new generation of the trees
(``torch.compiler.cudagraph_mark_step_begin()``), on one device or all of the session's.

Request: ``{"device": str | None}``.

Reply: ``{"devices": [str]}``: the devices whose tree manager was told.

Errors: ``no_session``, ``unknown_device``.
"""

from __future__ import annotations

from cgtree.daemon.protocol import Reply, field_of

NAME = "mark_step"
NEEDS_SESSION = True


def execute(ctx, session, body, frames) -> Reply:
    device = field_of(body, "device", str, None)
    names = [ctx.device(device).name] if device is not None else list(session.devices)
    told = []
    for name in names:
        state = session.devices.get(name)
        if state is not None and state.manager is not None:
            state.manager.mark_step_begin()
            told.append(name)
    return Reply({"devices": told})
