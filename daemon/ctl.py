"""``cgtreectl``: ask a running cgtreed what it is doing.

    cgtreectl [--endpoint URL] [--timeout S] status [--json]

Subcommands live in ``SUBCOMMANDS``: each is a function ``(args) -> int`` plus an
``add_arguments(parser)``; add one with ``@subcommand("name", "help")``. They talk to the daemon
with ``request()`` (plain ZeroMQ + msgpack, no torch import, so the tool answers in
milliseconds), and print tables by default, the raw document with ``--json``.

Exit codes: 0 ok; 1 the daemon answered with an error; 2 no daemon / no answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import zmq

from cgtree.daemon.protocol import ProtocolError, decode_reply, encode_request
from cgtree.daemon.runtime_dir import default_endpoint, ipc_endpoint_problem

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


class Unreachable(Exception):
    """No daemon at the endpoint, or it did not answer in time."""


def subcommand(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        SUBCOMMANDS[name] = (help_text, add_arguments, fn)
        return fn

    return register


def request(endpoint: str, op: str, body: Optional[dict] = None, timeout_s: float = 5.0) -> dict:
    """One request without a session; returns the reply body. Raises ``Unreachable`` or
    ``ProtocolError`` (an error reply)."""
    problem = ipc_endpoint_problem(endpoint)
    if problem is not None:
        raise Unreachable(f"no cgtreed reachable at {endpoint}: {problem}")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode_request(1, op, body or {}))
        if not sock.poll(int(timeout_s * 1000)):
            raise Unreachable(f"cgtreed at {endpoint} did not answer within {timeout_s:g} s")
        _, reply = decode_reply(sock.recv())
        return reply
    finally:
        sock.close(0)
        context.term()


# ------------------------------------------------------------------------------------ status


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")


@subcommand("status", "devices, weights, sessions and their trees", _status_arguments)
def status_command(args: argparse.Namespace) -> int:
    document = request(args.endpoint, "status", {}, args.timeout)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(format_status(document))
    return 0


def format_status(document: dict) -> str:
    daemon = document.get("daemon", {})
    lines = [
        f"cgtreed pid {daemon.get('pid')}  version {daemon.get('version')}  protocol {daemon.get('protocol')}  "
        f"up {_duration(daemon.get('uptime_s', 0))}  endpoint {daemon.get('endpoint')}",
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
    session_rows = []
    for s in document.get("sessions", []):
        devices = s.get("devices") or {"-": {}}
        for name, dev in devices.items():
            counters = dev.get("counters", {})
            nodes = dev.get("tree", {}).get("nodes", []) if isinstance(dev.get("tree"), dict) else []
            session_rows.append([
                s.get("id"), s.get("name") or "-", s.get("pid"), s.get("state"), _duration(s.get("idle_s", 0)),
                s.get("submits", 0), name, dev.get("root_children", []), len(nodes), counters.get("warmups", 0),
                counters.get("recordings", 0), counters.get("replays", 0), counters.get("skips", 0),
                _bytes(dev.get("pool_bytes", 0)), dev.get("live_blocks", 0),
            ])
    if session_rows:
        lines += table(["SESSION", "NAME", "PID", "STATE", "IDLE", "SUBMITS", "DEVICE", "ROOTS", "NODES", "WARMUPS",
                        "RECORDINGS", "REPLAYS", "SKIPS", "POOL", "LIVE"], session_rows)
    else:
        lines.append("no sessions")
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]


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


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgtreectl", description="Ask a running cgtreed what it is doing.")
    parser.add_argument("--endpoint", default=os.environ.get("CGTREE_ENDPOINT") or default_endpoint(),
                        help="daemon endpoint (default: $CGTREE_ENDPOINT or the per-user socket)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in sorted(SUBCOMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][2](args)
    except Unreachable as exc:
        print(f"cgtreectl: {exc}", file=sys.stderr)
        return 2
    except ProtocolError as exc:
        print(f"cgtreectl: the daemon refused: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
