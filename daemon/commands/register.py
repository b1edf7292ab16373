"""Register a graph on a device for this session (the codec's payload: graph bytes plus
weight blobs named by content hash). Registering a graph the device already knows is free for a user
who sent it before (any of that user's sessions): no decode, no weight transfer.

Request: ``{"device": str, "graph": str | None, "payload": int | None,
"weights": {<hash>: int}, "name": str | None}``. ``payload`` is the index of the data frame holding the encoded
graph (``cgtree.payload.encode_graph``); it may be left out when ``graph`` (the payload hash)
is already known on the device. ``weights`` maps weight hashes to data frames holding their
blobs; send only those the daemon said it lacks. Each blob is re-hashed and must match its
name. Graphs and weights are shared between users only by content: a user (uid) gets a graph
by ``graph`` alone, or a weight without sending its blob, only after sending those bytes
itself once; until then the daemon asks for them (``need_payload``, ``missing_weights``)
exactly as if the device lacked them, then shares its one copy. The payload is decoded with the operator allow-list (``aten``, ``prims``, ``operator``
and ``daemon.allowed_op_namespaces``); it is never unpickled or evaluated. ``name`` is an
optional label (printable, at most 64 characters; e.g. the model's class name) shown by
``cgtreectl`` and in the logs; the first client to name a graph names it for everyone. With
``daemon.compile`` resolving to ``"inductor"`` (the default ``"auto"`` on CUDA devices) a new
graph is compiled by the daemon's compile worker, off the serving loop (seconds, tens for a
large model; once per graph: a restarted daemon loads the compiled graph from disk): the
register that completes it answers ``registered: false`` with ``compiling``, and the client
sends the register again (``graph`` only) until it is ``registered``. Other sessions are served
meanwhile.

Reply: ``{"graph": str, "registered": bool, "need_payload": bool,
"missing_weights": [str], "new": bool, "weights_added": int, "inputs": int | None,
"mutated_inputs": [int] | None, "compiling": {"state": "queued" | "compiling",
"elapsed_s": float, "ahead": int} | None, "kernels": "aten" | "inductor" | None}``.
``registered`` false means the graph is not usable yet: send the request again with the
payload (``need_payload``) and/or the listed weight blobs, in as many messages as
``max_message_bytes`` requires (blobs already received are kept for this session until the
graph is complete or the session ends). ``new`` says this register decoded the
graph; ``weights_added`` how many weights it put on the device. ``mutated_inputs`` (once
registered) lists the user inputs the graph writes in place: a client must not re-send such a
submit blindly when the daemon died before answering it (it may have run). ``compiling`` (with
``registered: false``) says the graph is complete but still being compiled: how long since it
was queued and how many compiles are ahead of it; ``kernels`` (once registered) what runs.

Errors: ``no_session``, ``unknown_device``, ``bad_request`` (frame index out of range, bad
hash), ``payload_rejected`` (the payload does not decode, a weight does not match its hash,
or an operator outside the allow-list, named in the message).
"""

from __future__ import annotations

from cgtree.daemon.graphs import check_graph_id, check_graph_name
from cgtree.daemon.protocol import ProtocolError, Reply, field_of, frame_view

NAME = "register"
NEEDS_SESSION = True


def _frame(frames, index, what):
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(frames):
        raise ProtocolError("bad_request", f"{what}: frame {index!r} does not exist (message has {len(frames)} data frames)")
    return frame_view(frames[index])


def execute(ctx, session, body, frames) -> Reply:
    runtime = ctx.device(field_of(body, "device", str))
    claimed = field_of(body, "graph", str, None)
    if claimed is not None:
        check_graph_id(claimed)
    payload_index = field_of(body, "payload", int, None)
    payload = _frame(frames, payload_index, "payload") if payload_index is not None else None
    blobs = {}
    for weight_hash, index in field_of(body, "weights", dict, {}).items():
        blobs[check_graph_id(weight_hash, "weight")] = _frame(frames, index, f"weight {weight_hash}")
    name = check_graph_name(field_of(body, "name", str, None))
    staged = session.staged_weights.setdefault(runtime.name, {})
    runtime.graphs.settle_compiles()  # a compile that finished since lands before the answer
    # Loading a compiled graph (or compiling it, without a compile worker) takes a moment.
    ctx.keepalive()
    outcome = runtime.graphs.register(payload, claimed, blobs, staged, name=name, uid=session.owner)
    ctx.keepalive()
    entry = outcome.entry
    if entry is not None:
        key = (runtime.name, outcome.graph_id)
        if key not in session.graphs:  # held while it compiles too: the session's end releases it
            session.graphs[key] = runtime.graphs.acquire(entry)
    compiling = runtime.graphs.compile_progress(entry) if entry is not None else None
    registered = entry is not None and compiling is None
    inputs = mutated_inputs = None
    if registered:
        specs = outcome.entry.input_specs
        inputs = len(specs) if specs is not None else None
        mutated_inputs = list(outcome.entry.mutated_inputs)
    return Reply({
        "graph": outcome.graph_id,
        "registered": registered,
        "need_payload": outcome.need_payload,
        "missing_weights": outcome.missing_weights,
        "new": outcome.new,
        "weights_added": outcome.weights_added,
        "inputs": inputs,
        "mutated_inputs": mutated_inputs,
        "compiling": compiling,
        "kernels": entry.kernels if registered else None,
    })
