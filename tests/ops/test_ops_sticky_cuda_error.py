"""Recovery from a sticky CUDA error, through the daemon's real loop (in a thread, on the CPU
backend, with the error injected): the request gets ``cuda_error``, the requests queued behind
it get the retryable ``unavailable`` (they never ran), systemd hears STOPPING=1 with the reason,
and ``run()`` returns 70 with the socket file removed, so the supervisor restarts a fresh
daemon instead of this one answering errors forever."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import types

import msgpack
import zmq

from cgtree.config import Config
from cgtree.daemon import commands, server


def test_a_sticky_cuda_error_answers_refuses_the_queue_and_exits_70(monkeypatch):
    def boom(ctx, session, body, frames):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(commands.COMMANDS, "boom", types.SimpleNamespace(NAME="boom", NEEDS_SESSION=False, execute=boom))
    monkeypatch.setattr(server, "cuda_context_is_broken", lambda names: True)
    workdir = tempfile.mkdtemp(prefix="cgt-")
    notify_path = os.path.join(workdir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    endpoint = "ipc://" + os.path.join(workdir, "s")
    daemon = server.Daemon(Config(), endpoint=endpoint, device_names=["cpu"])
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=daemon.run()), daemon=True)
    thread.start()
    assert listener.recv(4096).startswith(b"READY=1\nSTATUS=serving")

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb({"v": 1, "id": 1, "op": "boom", "body": {}}))
        sock.send(msgpack.packb({"v": 1, "id": 2, "op": "ping", "body": {}}))
        replies = {}
        deadline = time.monotonic() + 10
        while len(replies) < 2 and time.monotonic() < deadline:
            if sock.poll(500):
                reply = msgpack.unpackb(sock.recv(), raw=False)
                replies[reply["id"]] = reply["error"]["code"], reply["error"]["message"]
    finally:
        sock.close(0)
    thread.join(10)
    assert result.get("code") == server.EXIT_CUDA_ERROR == 70
    assert replies[1][0] == "cuda_error" and "sticky: the daemon restarts" in replies[1][1]
    assert replies[2][0] == "unavailable"  # queued behind it: never ran, safe to retry
    assert not os.path.exists(os.path.join(workdir, "s"))
    listener.settimeout(0.2)
    messages = []
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except socket.timeout:
        pass
    listener.close()
    stopping = [m for m in messages if m.startswith("STOPPING=1")]
    assert stopping and "STATUS=sticky CUDA error: exiting (status 70) for a restart" in stopping[0], messages
