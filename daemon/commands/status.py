"""The daemon's state: devices, weights, sessions and their trees. ``cgtreectl status``
prints it; ``client.status()`` returns it.

Request: ``{"session_only": bool}``: true restricts ``sessions`` to the caller's own.

Who sees what: a session (its id, name, pid, graph ids, trees) is shown to the uid that opened
it, to root and to the daemon's own user (``cgtreectl`` run by the operator); other users see
only their own sessions, and in ``registered`` and ``daemon.compile.jobs`` only the graphs their
sessions hold, with only their session ids. Device totals (graph and weight counts, pool bytes) count every user.
``daemon.viewer`` says which view this is: the caller's ``uid`` (None when the transport did
not tell, ``cgtree.daemon.tenancy``) and ``sees``: ``"all"`` or ``"own"``.

Reply::

    {"daemon": {"pid", "version", "protocol", "endpoint", "state": "serving" | "stopping",
                "uptime_s", "config_path", "policy": {...}, "log_level", "sessions": int,
                "session_linger_s", "watchdog_s": float | None, "metrics_port": int | None,
                "lane_path": str | None, "spin_us": int, "counters": {...},
                "compile": {"mode", "worker_pid": int | None, "jobs": [{"graph", "name", "device",
                            "state": "queued" | "compiling", "elapsed_s"}],
                            "submitted": int, "compiled": int, "not_compiled": int, "failed": int,
                            "workers_started": int},
                "viewer": {"uid": int | None, "sees": "all" | "own"}},
     "devices": [{"device", "backend", "graphs": int, "weights": {"count", "bytes"},
                  "sessions": int, "pool_bytes": int, "live_blocks": int,
                  "output_buffer_bytes": int, "allocated_bytes": int | None,
                  "reserved_bytes": int | None,
                  "registered": [{"graph", "name": str | None, "short_name", "weights": int,
                                  "weight_bytes": int, "inputs": int | None,
                                  "mutated_inputs": [int], "dynamic": bool,
                                  "kernels": "aten" | "inductor" | "compiling", "kernels_note": str,
                                  "sessions": [int]}]}],
     "sessions": [{"id", "name", "uid": int | None, "pid", "state": "live" | "parked", "idle_s", "submits",
                   "requests": int, "lane": bool, "lane_requests": int,
                   "doorbell": bool, "doorbell_requests": int, "doorbell_kicks": int,
                   "gated": {"requests": int, "vetoed": int, "late": int}, "graphs": [{"device", "graph"}],
                   "devices": {<device>: {"backend", "root_children": [int],
                               "live_blocks": int, "pool_bytes": int, "counters": {...},
                               "output_buffers": int, "output_buffer_bytes": int,
                               "ipc_handles_open": int,
                               "tree": <the tree manager's status(): nodes, pool, skips>}}}]}

``tree`` is ``TreeManager.status()`` as the core reports it (nodes with id, graph, mode,
children, replays; pool bytes; counters: warmups, recordings, replays, checkpoints, skips by
reason). The backend is always named as it runs: ``cpu-replay`` is never reported as CUDA.
``registered`` lists the graphs decoded on the device and the ids of the sessions (live or
parked) holding each. ``allocated_bytes`` / ``reserved_bytes`` are the daemon's CUDA caching allocator totals for the
device (None on CPU): weights, pools, output buffers and workspaces together.

Errors: none of its own.
"""

from __future__ import annotations

from cgtree.daemon.protocol import Reply, field_of, wire_safe
from cgtree.daemon.tenancy import may_inspect, sees_everything

NAME = "status"
NEEDS_SESSION = False


def execute(ctx, session, body, frames) -> Reply:
    session_only = field_of(body, "session_only", bool, False)
    visible = [s for s in ctx.sessions.sessions.values() if may_inspect(ctx.peer_uid, s.owner, ctx.daemon_uid)]
    sessions = [session] if session_only and session is not None else ([] if session_only else visible)
    now = ctx.sessions.clock()
    session_docs = [session_status(s, now) for s in sorted(sessions, key=lambda s: s.session_id)]
    device_docs = []
    for runtime in ctx.devices.values():
        doc = {"device": runtime.name, "backend": runtime.backend, **runtime.graphs.stats(),
               "sessions": 0, "pool_bytes": 0, "live_blocks": 0, "output_buffer_bytes": 0}
        for s in ctx.sessions.sessions.values():
            state = s.devices.get(runtime.name)
            if state is None:
                continue
            doc["sessions"] += 1
            tree = manager_summary(state.manager)
            doc["pool_bytes"] += tree["pool_bytes"]
            doc["live_blocks"] += tree["live_blocks"]
            doc["output_buffer_bytes"] += state.output_bytes()
        doc.update(runtime.memory_stats())
        rows = runtime.graphs.describe(lambda graph_id, device=runtime.name: sorted(
            s.session_id for s in visible if (device, graph_id) in s.graphs))
        # Another user's graph ids stay hidden: a row is shown to whoever sees a session holding it.
        doc["registered"] = [row for row in rows if row["sessions"]]
        device_docs.append(doc)
    everything = sees_everything(ctx.peer_uid, ctx.daemon_uid)
    daemon = {**ctx.daemon_info(), "viewer": {"uid": ctx.peer_uid, "sees": "all" if everything else "own"}}
    compile_doc = daemon.get("compile")
    if not everything and isinstance(compile_doc, dict):  # queued compiles name graphs: the viewer's only
        own = {graph_id for s in visible for (_device, graph_id) in s.graphs}
        daemon["compile"] = {**compile_doc, "jobs": [job for job in compile_doc.get("jobs", []) if job.get("graph") in own]}
    return Reply(wire_safe({"daemon": daemon, "devices": device_docs, "sessions": session_docs}))


def manager_summary(manager) -> dict:
    """The numbers the contract guarantees, read through the public API of the manager."""
    if manager is None:
        return {"root_children": [], "live_blocks": 0, "pool_bytes": 0, "counters": {}, "tree": {}}
    tree = manager.status()
    pool_bytes = _find_pool_bytes(tree)
    return {
        "backend": manager.backend_name,
        "root_children": list(manager.root_children()),
        "live_blocks": manager.live_block_count(),
        "pool_bytes": pool_bytes,
        "counters": dict(manager.counters),
        "tree": tree,
    }


def _find_pool_bytes(tree) -> int:
    # The core reports pool bytes in its status; accept the plausible spellings.
    if isinstance(tree, dict):
        for key in ("pool_bytes", "pool_reserved_bytes"):
            if isinstance(tree.get(key), int):
                return tree[key]
        pool = tree.get("pool")
        if isinstance(pool, dict):
            for key in ("bytes", "reserved_bytes", "pool_bytes", "allocated_bytes"):
                if isinstance(pool.get(key), int):
                    return pool[key]
    return 0


def session_status(session, now: float) -> dict:
    devices = {}
    for name, state in session.devices.items():
        devices[name] = {
            **manager_summary(state.manager),
            "output_buffers": len(state.output_buffers),
            "output_buffer_bytes": state.output_bytes(),
            "ipc_handles_open": len(state.ipc_imports),
        }
    return {
        "id": session.session_id,
        "name": session.name,
        "uid": session.owner,  # who opened it (cgtree.daemon.tenancy); None: an unverified peer
        "pid": session.client.pid,
        "state": session.state,
        "idle_s": round(now - session.last_seen, 3),
        "submits": session.counters["submits"],
        "requests": session.counters["requests"],  # every request it made, whatever its transport
        "lane": session.lane_open,  # requests travel on its submit lane (else ZeroMQ only)
        "lane_requests": session.counters["lane_requests"],
        "doorbell": session.doorbell_open,  # its lane has a doorbell page (cgtree.daemon.doorbell)
        "doorbell_requests": session.counters["doorbell_requests"],  # plan runs rung on its doorbell page
        "doorbell_kicks": session.counters["doorbell_kicks"],  # kick datagrams: requests rung while its loop slept
        # Of those, gated ones (cgtree.daemon.doorbell): launched only on the client's verdict;
        # vetoed by it, or not launched because the verdict came too late.
        "gated": {"requests": session.counters["gated_requests"], "vetoed": session.counters["gate_vetoed"],
                  "late": session.counters["gate_late"]},
        "graphs": [{"device": device, "graph": graph_id} for (device, graph_id) in sorted(session.graphs)],
        "devices": devices,
    }
