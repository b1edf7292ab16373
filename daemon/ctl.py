"""``cgtreectl``: ask a running cgtreed what it is doing, or to reload its configuration.

    cgtreectl [--endpoint URL] [--timeout S] [--json] COMMAND [options]

    status     devices, weights, sessions and their trees (tables)
    tree       each device's trees per session: node, mode, replay count, function
    graphs     registered graphs per device: id, name, weights, sessions using it
    sessions   sessions: id, name, pid, devices, graphs, idle time, state
    reload     re-read the daemon's config.toml (the ``reload`` command: no signal permission needed)

Every command takes ``--json`` (before or after its name) and then prints one JSON document on
stdout, errors included (``{"error": {"code", "message"}}``).

Subcommands live in ``SUBCOMMANDS``: each is a function ``(args) -> int`` plus an
``add_arguments(parser)``; add one with ``@subcommand("name", "help")``. They talk to the daemon
with ``request()`` (plain ZeroMQ + msgpack, no torch import, so the tool answers in
milliseconds); what they print comes from ``ctl_render`` (pure functions).

Exit codes (``EXIT_*``): 0 ok; 1 the daemon answered with an error (a rejected reload
included); 2 usage error; 3 the daemon is unreachable (no socket, no permission, no answer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import zmq

from cgtree.daemon import ctl_render
from cgtree.daemon.ctl_render import format_status, table  # noqa: F401  (public: used by tests and scripts)
from cgtree.daemon.protocol import ProtocolError, decode_reply, encode_request
from cgtree.daemon.runtime_dir import default_endpoint, ipc_endpoint_problem

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_UNREACHABLE = 3

EXIT_CODES_HELP = """exit codes:
  0  ok
  1  the daemon answered with an error (for reload: the file was rejected, the running
     configuration is kept)
  2  usage error (bad command line)
  3  the daemon is unreachable: no socket at the endpoint, no permission on it, or no
     answer within --timeout
"""

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


def emit(args: argparse.Namespace, document: Any, text: Callable[[], str]) -> int:
    """Print ``document`` as JSON with ``--json``, else the text rendering."""
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(text())
    return EXIT_OK


def _status(args: argparse.Namespace) -> dict:
    return request(args.endpoint, "status", {}, args.timeout)


# ------------------------------------------------------------------------------- subcommands


@subcommand("status", "devices, weights, sessions and their trees")
def status_command(args: argparse.Namespace) -> int:
    document = _status(args)
    return emit(args, document, lambda: format_status(document))


def _tree_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="only this device (e.g. cuda:0)")
    parser.add_argument("--session", type=int, help="only this session id")


@subcommand("tree", "each device's trees per session: nodes, modes, replay counts", _tree_arguments)
def tree_command(args: argparse.Namespace) -> int:
    document = _status(args)
    trees = [
        {"device": dev.get("device"), "backend": dev.get("backend"), "sessions": [
            {"id": s.get("id"), "name": s.get("name"), "pid": s.get("pid"), "state": s.get("state"),
             "counters": s["devices"][dev.get("device")].get("counters", {}),
             "nodes": (s["devices"][dev.get("device")].get("tree") or {}).get("nodes", [])}
            for s in document.get("sessions", [])
            if dev.get("device") in (s.get("devices") or {}) and args.session in (None, s.get("id"))]}
        for dev in document.get("devices", []) if args.device in (None, dev.get("device"))
    ]
    return emit(args, {"devices": trees}, lambda: ctl_render.format_tree(document, device=args.device, session=args.session))


def _graphs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="only this device (e.g. cuda:0)")


@subcommand("graphs", "registered graphs per device: id, name, weights, sessions using it", _graphs_arguments)
def graphs_command(args: argparse.Namespace) -> int:
    rows = ctl_render.graph_rows(_status(args), args.device)
    return emit(args, {"graphs": rows}, lambda: ctl_render.format_graphs(rows))


@subcommand("sessions", "sessions: id, name, pid, devices, graphs, idle time, state")
def sessions_command(args: argparse.Namespace) -> int:
    rows = ctl_render.session_rows(_status(args))
    return emit(args, {"sessions": rows}, lambda: ctl_render.format_sessions(rows))


@subcommand("reload", "re-read the daemon's config.toml (new policies apply to new recordings)")
def reload_command(args: argparse.Namespace) -> int:
    reply = request(args.endpoint, "reload", {}, args.timeout)
    return emit(args, reply, lambda: ctl_render.format_reload(reply))


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgtreectl", description="Ask a running cgtreed what it is doing, or to reload its configuration.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=os.environ.get("CGTREE_ENDPOINT") or default_endpoint(),
                        help="daemon endpoint (default: $CGTREE_ENDPOINT or the per-user socket)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON (machine-readable), errors included")
    # --json after the command name too; SUPPRESS keeps a --json given before it.
    json_after = argparse.ArgumentParser(add_help=False)
    json_after.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (machine-readable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text, parents=[json_after],
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return SUBCOMMANDS[args.command][2](args)
    except Unreachable as exc:
        return _fail(args, EXIT_UNREACHABLE, "unreachable", str(exc))
    except ProtocolError as exc:
        return _fail(args, EXIT_DAEMON_ERROR, exc.code, f"the daemon refused: {exc}")


def _fail(args: argparse.Namespace, code: int, error_code: str, message: str) -> int:
    print(f"cgtreectl: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"code": error_code, "message": message}}, indent=2, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
