"""Release the outputs of a graph (or of all graphs): the daemon frees their output buffers.

Outputs stay valid until that graph's next submit in this session or until released; the
client marks its tensors over released buffers as overwritten and closes their mappings
before sending this.

Request: ``{"device": str, "graph": str | None}``: ``graph`` None releases every graph's
outputs on that device.

Reply: ``{"released": int}``: how many output buffers were freed.

Errors: ``no_session``, ``unknown_device``.
"""

from __future__ import annotations

from cgtree.daemon.protocol import Reply, field_of

NAME = "release"
NEEDS_SESSION = True


def execute(ctx, session, body, frames) -> Reply:
    runtime = ctx.device(field_of(body, "device", str))
    graph_id = field_of(body, "graph", str, None)
    state = session.devices.get(runtime.name)
    released = state.release_outputs(graph_id) if state is not None else 0
    return Reply({"released": released})
