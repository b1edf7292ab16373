"""Round trip of a small message between two processes, by transport: what a submit pays before
any work is done. No torch, no daemon: the floor under ``bench_daemon.py``'s round trips.

Paths (a 200-byte message echoed by a child process, ``--iters`` round trips after a warmup):

- ``zmq``: a ZeroMQ DEALER to a ROUTER over ``ipc://`` (cgtreed's control channel). Each message
  passes through ZeroMQ's I/O thread on both sides.
- ``lane-block/block``: an AF_UNIX SOCK_SEQPACKET pair (cgtreed's submit lanes), both sides
  sleeping in the kernel until the message arrives.
- ``lane-spin/block``, ``lane-block/spin``, ``lane-spin/spin``: the same with the server and/or
  the client polling without sleeping (``daemon.spin_us``, ``Client(spin_us=...)``).

Usage: ``python benchmarks/bench_transport.py [--iters N] [--json out.json]``; prints a table of
p50 / p99 in microseconds. Numbers depend on the host's wake-up latency (large on VMs): run it
on the machine you care about.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import tempfile
import time

MESSAGE = b"x" * 200
STOP = b"q"


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_us": round(ordered[len(ordered) // 2] * 1e6, 1), "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1)}


def _measure(round_trip, iters: int) -> dict:
    for _ in range(min(300, iters)):
        round_trip()
    samples = []
    clock = time.perf_counter
    for _ in range(iters):
        start = clock()
        round_trip()
        samples.append(clock() - start)
    return _percentiles(samples)


def _zmq_server(endpoint: str) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart()
        if frames[1] == STOP:
            os._exit(0)
        sock.send_multipart(frames)


def bench_zmq(workdir: str, iters: int) -> dict:
    import zmq

    endpoint = f"ipc://{workdir}/zmq.sock"
    pid = os.fork()
    if pid == 0:
        _zmq_server(endpoint)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def round_trip() -> None:
        sock.send(MESSAGE)
        sock.recv()

    try:
        return _measure(round_trip, iters)
    finally:
        sock.send(STOP)
        os.waitpid(pid, 0)
        sock.close(0)


def _lane_server(listener: socket.socket, spin: bool) -> None:
    conn, _ = listener.accept()
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    while True:
        if spin:
            while not poller.poll(0):
                pass
        message = conn.recv(65536)
        if message == STOP:
            os._exit(0)
        conn.send(message)


def bench_lane(workdir: str, iters: int, server_spins: bool, client_spins: bool) -> dict:
    path = f"{workdir}/lane-{int(server_spins)}{int(client_spins)}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        _lane_server(listener, server_spins)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(path)

    def round_trip_blocking() -> None:
        client.send(MESSAGE)
        client.recv(65536)

    def round_trip_spinning() -> None:
        client.send(MESSAGE)
        while True:
            try:
                client.recv(65536, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                pass

    try:
        return _measure(round_trip_spinning if client_spins else round_trip_blocking, iters)
    finally:
        client.send(STOP)
        os.waitpid(pid, 0)
        client.close()
        listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cgt-transport-") as workdir:
        try:
            results["zmq"] = bench_zmq(workdir, args.iters)
        except ImportError:
            results["zmq"] = {"p50_us": None, "p99_us": None, "note": "pyzmq missing"}
        for server_spins, client_spins in ((False, False), (True, False), (False, True), (True, True)):
            name = f"lane-{'spin' if server_spins else 'block'}/{'spin' if client_spins else 'block'}"
            results[name] = bench_lane(workdir, args.iters, server_spins, client_spins)
    print(f"{'path (server/client)':24s} {'p50 (us)':>10s} {'p99 (us)':>10s}")
    for name, row in results.items():
        print(f"{name:24s} {row['p50_us']!s:>10s} {row['p99_us']!s:>10s}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"benchmark": "transport", "iters": args.iters, "host_cpus": os.cpu_count(),
                       "results": results}, handle, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
