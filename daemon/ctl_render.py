"""Text that ``cgtreectl`` prints: pure functions from the daemon's ``status`` document (see
``commands/status.py``) to tables and tree drawings. No I/O here, so every rendering is tested
on a literal document.

Invariants:
- Rendering never raises on a document from another daemon version: a missing field is shown
  as ``-`` (or an empty list), never a KeyError.
- Tree drawings are plain ASCII (``|--``, ``` `-- ```): they survive journald, ``less`` and
  terminals without UTF-8.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

__all__ = ["format_status", "format_tree", "format_graphs", "format_sessions", "format_reload",
           "session_rows", "graph_rows", "table"]


# ------------------------------------------------------------------------------------ status


def format_status(document: dict) -> str:
    daemon = document.get("daemon", {})
    lines = [
        f"cgtreed pid {daemon.get('pid')}  version {daemon.get('version')}  protocol {daemon.get('protocol')}  "
        f"up {_duration(daemon.get('uptime_s', 0))}  endpoint {daemon.get('endpoint')}",
        *_viewer_note(daemon),
        "",
    ]
    device_rows = [
        [d.get("device"), d.get("backend"), d.get("graphs", 0), d.get("weights", {}).get("count", 0),
         _bytes(d.get("weights", {}).get("bytes", 0)), d.get("sessions", 0), _bytes(d.get("pool_bytes", 0)),
         d.get("live_blocks", 0), _bytes(d.get("output_buffer_bytes", 0))]
        for d in document.get("devices", [])
    ]
    lines += table(["DEVICE", "BACKEND", "GRAPHS", "WEIGHTS", "WEIGHT BYTES", "SESSIONS", "POOL", "LIVE BLOCKS", "OUTPUT BUFFERS"], device_rows)
    lines.append("")
    lines += compile_lines(daemon.get("compile") or {})
    rows = []
    for s in document.get("sessions", []):
        devices = s.get("devices") or {"-": {}}
        for name, dev in devices.items():
            counters = dev.get("counters", {})
            rows.append([
                s.get("id"), s.get("name") or "-", s.get("pid"), s.get("uid"), s.get("state"), _duration(s.get("idle_s", 0)),
                s.get("submits", 0), name, dev.get("root_children", []), len(_nodes(dev)), counters.get("warmups", 0),
                counters.get("recordings", 0), counters.get("replays", 0), counters.get("skips", 0),
                _bytes(dev.get("pool_bytes", 0)), dev.get("live_blocks", 0),
            ])
    if rows:
        lines += table(["SESSION", "NAME", "PID", "UID", "STATE", "IDLE", "SUBMITS", "DEVICE", "ROOTS", "NODES", "WARMUPS",
                        "RECORDINGS", "REPLAYS", "SKIPS", "POOL", "LIVE"], rows)
    else:
        lines.append("no sessions")
    return "\n".join(lines)


def compile_lines(compile_state: dict) -> list[str]:
    """The compile worker's queue (what a registering client is waiting for), if any."""
    jobs = compile_state.get("jobs") or []
    if not jobs:
        return []
    lines = [f"compiling (daemon.compile {compile_state.get('mode')}, worker pid {compile_state.get('worker_pid') or '-'}):"]
    lines += table(["DEVICE", "GRAPH", "NAME", "STATE", "FOR"],
                   [[j.get("device"), (j.get("graph") or "-")[:16], j.get("name"), j.get("state"), _duration(j.get("elapsed_s", 0))]
                    for j in jobs])
    return lines + [""]


# -------------------------------------------------------------------------------------- tree


def format_tree(document: dict, *, device: Optional[str] = None, session: Optional[int] = None) -> str:
    """Each device's trees, per session: one line per recorded node, children indented.

        cpu (cpu-replay)
          session 3 "job" pid 4242: 1 warmups, 2 recordings, 12 replays, 0 skips
            node 0 [replayed x12] MLP (g1a2b3c4d5e6f)
            `-- node 1 [recorded x0] Head (g9f8e7d6c5b4a)
    """
    lines: list[str] = []
    for dev in document.get("devices", []):
        name = dev.get("device")
        if device is not None and name != device:
            continue
        lines.append(f"{name} ({dev.get('backend', '?')})")
        shown = 0
        for s in document.get("sessions", []):
            state = (s.get("devices") or {}).get(name)
            if state is None or (session is not None and s.get("id") != session):
                continue
            shown += 1
            counters = state.get("counters", {})
            label = f" \"{s['name']}\"" if s.get("name") else ""
            parked = " (parked)" if s.get("state") == "parked" else ""
            lines.append(f"  session {s.get('id')}{label} pid {s.get('pid')}{parked}: "
                         f"{counters.get('warmups', 0)} warmups, {counters.get('recordings', 0)} recordings, "
                         f"{counters.get('replays', 0)} replays, {counters.get('skips', 0)} skips")
            nodes = _nodes(state)
            if not nodes:
                lines.append("    (no recordings)")
            lines += ["    " + line for line in draw_nodes(nodes)]
        if not shown:
            lines.append("  (no sessions)")
    if not lines:
        lines.append(f"no device {device}" if device is not None else "no devices")
    return "\n".join(lines)


def draw_nodes(nodes: Sequence[dict]) -> list[str]:
    """Roots at the left margin, children under their parent with ``|--`` / ``` `-- ```."""
    by_id = {node.get("id"): node for node in nodes}
    children: dict[Any, list[Any]] = {}
    for node in nodes:
        kids = [kid for kid in node.get("children") or [] if kid in by_id]
        children[node.get("id")] = kids
    reachable: set = set()
    for kids in children.values():
        reachable.update(kids)
    # A node whose parent is not in the document (or a cycle) is drawn as a root: never lost.
    roots = [node.get("id") for node in nodes if node.get("parent") not in by_id or node.get("id") not in reachable]
    lines: list[str] = []
    drawn: set = set()

    def draw(node_id: Any, prefix: str, connector: str, child_prefix: str) -> None:
        if node_id in drawn:
            return
        drawn.add(node_id)
        lines.append(prefix + connector + node_line(by_id[node_id]))
        kids = [kid for kid in children.get(node_id, []) if kid not in drawn]
        for index, kid in enumerate(kids):
            last = index == len(kids) - 1
            draw(kid, prefix + child_prefix, "`-- " if last else "|-- ", "    " if last else "|   ")

    for root in roots:
        draw(root, "", "", "")
    return lines


def node_line(node: dict) -> str:
    """``node 0 [replayed x12] MLP (g1a2b3c4d5e6f)``."""
    return f"node {node.get('id')} [{node.get('mode') or '?'} x{node.get('replays', 0)}] {node.get('function') or '?'}"


# ------------------------------------------------------------------------------------ graphs


def graph_rows(document: dict, device: Optional[str] = None) -> list[dict]:
    """Registered graphs, one dict per (device, graph): what ``graphs --json`` prints."""
    rows = []
    for dev in document.get("devices", []):
        if device is not None and dev.get("device") != device:
            continue
        for graph in dev.get("registered", []):
            rows.append({"device": dev.get("device"), **graph})
    return rows


def format_graphs(rows: Iterable[dict]) -> str:
    rows = list(rows)
    if not rows:
        return "no graphs registered"
    return "\n".join(table(
        ["DEVICE", "GRAPH", "NAME", "KERNELS", "WEIGHTS", "WEIGHT BYTES", "INPUTS", "MUTATES", "SESSIONS"],
        [[r.get("device"), (r.get("graph") or "-")[:16], r.get("name"), r.get("kernels", "-"), r.get("weights"),
          _bytes(r.get("weight_bytes")), r.get("inputs"), r.get("mutated_inputs") or "-", r.get("sessions", [])] for r in rows],
    ))


# ---------------------------------------------------------------------------------- sessions


def session_rows(document: dict) -> list[dict]:
    """One dict per session, without its trees: what ``sessions --json`` prints."""
    rows = []
    for s in document.get("sessions", []):
        devices = s.get("devices") or {}
        rows.append({
            "id": s.get("id"), "name": s.get("name"), "pid": s.get("pid"), "uid": s.get("uid"), "state": s.get("state"),
            "idle_s": s.get("idle_s"), "submits": s.get("submits", 0), "devices": sorted(devices),
            "transport": ("lane+doorbell" if s.get("doorbell") else "lane") if s.get("lane") else "zmq",
            "graphs": [g.get("graph") for g in s.get("graphs", [])],
            "nodes": sum(len(_nodes(state)) for state in devices.values()),
        })
    return rows


def format_sessions(rows: Iterable[dict]) -> str:
    rows = list(rows)
    if not rows:
        return "no sessions"
    return "\n".join(table(
        ["SESSION", "NAME", "PID", "UID", "STATE", "IDLE", "DEVICES", "GRAPHS", "NODES", "SUBMITS", "TRANSPORT"],
        [[r.get("id"), r.get("name"), r.get("pid"), r.get("uid"), r.get("state"), _duration(r.get("idle_s")), r.get("devices", []),
          len(r.get("graphs", [])), r.get("nodes", 0), r.get("submits", 0), r.get("transport", "zmq")] for r in rows],
    ))


# ------------------------------------------------------------------------------------ reload


def format_reload(reply: dict) -> str:
    changed = [key for key in reply.get("changed", []) if key not in reply.get("needs_restart", [])]
    text = f"reloaded {reply.get('config_path')}: " + (f"applied {', '.join(changed)}" if changed else "nothing changed")
    if reply.get("needs_restart"):
        text += f"; restart to apply {', '.join(reply['needs_restart'])}"
    return text


# ----------------------------------------------------------------------------------- helpers


def _viewer_note(daemon: dict) -> list[str]:
    """A line saying the view is the caller's own sessions (``cgtree.daemon.tenancy``)."""
    viewer = daemon.get("viewer")
    if not isinstance(viewer, dict) or viewer.get("sees") != "own":
        return []
    return [f"showing the sessions of uid {viewer.get('uid')} only (root and the daemon's user see every session)"]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]


def _nodes(device_state: dict) -> list[dict]:
    tree = device_state.get("tree")
    return list(tree.get("nodes", [])) if isinstance(tree, dict) else []


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "-" if value is None else str(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
