"""Stops and crashes with a request in flight, on a real cgtreed:
- SIGTERM finishes the request in flight (correct result), refuses the queued one with the
  retryable ``unavailable``, exits 0 and removes its socket;
- a second SIGTERM exits at once (status 1), socket removed;
- SIGKILL then a new daemon: a running client finds it by itself; the request in flight during
  the kill is sent once more when the graph writes no inputs (correct result), and raises the
  retryable ``RequestInterrupted`` when it does (never sent twice); later calls work.

A daemon is held mid-request either by a slow graph (8 big matmuls, most of a second on CPU)
or by SIGSTOP (its requests wait unread in the socket: from the client's side a request in
flight).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from cgtree.client import Client
from cgtree.client.client import DaemonUnavailable, RequestInterrupted

DEBUG_CONFIG = """
[daemon]
max_message_bytes = 4194304
reap_interval_s = 0.2
shutdown_timeout_s = 10.0
log_level = "DEBUG"
"""


class Slow(torch.nn.Module):
    """Most of a second of CPU per call, from a 256 KiB input."""

    def forward(self, x):
        big = x.repeat(8, 8)
        y = big
        for _ in range(8):
            y = torch.tanh(y @ big)
        return y.sum(dim=0)


class AddsOneInPlace(torch.nn.Module):
    def forward(self, x):
        x.add_(1.0)
        return x * 2


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def slow_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(256, 256) / 2048 ** 0.5


def wait_for_log(daemon, pattern: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, daemon.log()):
            return
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} not in the daemon log:\n{daemon.log()[-3000:]}")


def raw_ping(endpoint: str, timeout_s: float = 10.0) -> dict:
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "id": "queued-ping", "op": "ping", "body": {}}))
        assert sock.poll(int(timeout_s * 1000)), "no reply"
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


def test_sigterm_finishes_the_request_in_flight_refuses_the_queue_and_exits_0(daemon_factory, daemon_tools):
    daemon = daemon_factory(DEBUG_CONFIG)
    model, x = Slow(), slow_input()
    with Client(daemon.endpoint, timeout_s=60) as client:
        handle = client.register(model, [x])
        pending = daemon_tools.in_thread(lambda: client.submit(handle, [x]))
        wait_for_log(daemon, r"request \d+: submit \[req=")
        daemon.signal(signal.SIGTERM)
        refused = raw_ping(daemon.endpoint)  # queued behind the submit: never runs
        (out,) = pending.join()
    torch.testing.assert_close(out, model(x))
    assert refused["id"] == "queued-ping" and refused["error"]["code"] == "unavailable"
    assert daemon.wait(timeout_s=15) == 0
    assert not os.path.exists(daemon.socket_path)
    assert re.search(r"stopped cleanly \([12] queued requests refused\)", daemon.log())  # the ping (and maybe the bye)


def test_a_second_sigterm_exits_at_once_with_status_1(daemon_factory, daemon_tools):
    daemon = daemon_factory(DEBUG_CONFIG)
    model, x = Slow(), slow_input()
    with Client(daemon.endpoint, timeout_s=2) as client:
        handle = client.register(model, [x])
        pending = daemon_tools.in_thread(lambda: client.submit(handle, [x]))
        wait_for_log(daemon, r"request \d+: submit \[req=")
        daemon.signal(signal.SIGTERM)
        time.sleep(0.1)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout_s=10) == 1
        assert not os.path.exists(daemon.socket_path)
        log = daemon.log()
        assert "second SIGTERM: exiting now" in log
        assert not re.search(r"submit answered in", log)  # it did not wait for the request in flight
        # Documented: the submit is re-sent to the next daemon, which never comes here.
        with pytest.raises(DaemonUnavailable, match="did not come back within 2 s"):
            pending.join()


def test_after_sigkill_a_running_client_finds_the_new_daemon_and_resends_only_safe_requests(daemon_factory, daemon_tools):
    daemon = daemon_factory()
    model, mutating = tiny_mlp(), AddsOneInPlace()
    pure_client = Client(daemon.endpoint, timeout_s=30)
    mutating_client = Client(daemon.endpoint, timeout_s=30)
    idle_client = Client(daemon.endpoint, timeout_s=30)  # nothing in flight during the kill
    restarted = None
    try:
        pure_handle = pure_client.register(model, [torch.randn(2, 8)])
        mutating_handle = mutating_client.register(mutating, [torch.randn(3)])
        idle_handle = idle_client.register(mutating, [torch.randn(3)])
        assert pure_handle.mutated_inputs == () and mutating_handle.mutated_inputs == (0,)
        first_pid = pure_client.daemon_pid

        # Requests in flight: the daemon is stopped, then killed before it reads them.
        daemon.signal(signal.SIGSTOP)
        x, y = torch.randn(2, 8), torch.randn(3)
        pure = daemon_tools.in_thread(lambda: pure_client.submit(pure_handle, [x]))
        interrupted = daemon_tools.in_thread(lambda: mutating_client.submit(mutating_handle, [y.clone()]))
        time.sleep(0.3)
        daemon.signal(signal.SIGKILL)
        assert daemon.wait(timeout_s=10) == -signal.SIGKILL
        with pytest.raises(RequestInterrupted, match="writes its inputs") as caught:
            interrupted.join()
        assert caught.value.retryable and caught.value.op == "submit"

        # systemd would restart it: a new daemon on the same endpoint (stale socket file removed).
        restarted = daemon_tools.DaemonProcess(daemon.workdir, Path(daemon.config_path).read_text()).start()
        (out,) = pure.join()
        torch.testing.assert_close(out, model(x))
        assert pure_client.daemon_pid != first_pid
        assert pure_client.last_execution["mode"] == "warmup"  # a new daemon starts cold

        # Both clients carry on against the new daemon.
        for _ in range(2):
            x = torch.randn(2, 8)
            (out,) = pure_client.submit(pure_handle, [x])
            torch.testing.assert_close(out, model(x))
        (out,) = mutating_client.submit(mutating_handle, [y.clone()])
        torch.testing.assert_close(out, (y + 1) * 2)
        # The connection drop seen while idle is not taken for this request's: no false alarm.
        (out,) = idle_client.submit(idle_handle, [y.clone()])
        torch.testing.assert_close(out, (y + 1) * 2)
        assert pure_client.last_execution["mode"] == "replayed"
    finally:
        pure_client.close(timeout_s=0.5)
        mutating_client.close(timeout_s=0.5)
        idle_client.close(timeout_s=0.5)
        if restarted is not None:
            restarted.kill()
