"""A client waiting on a daemon that died notices at once, on every transport, and is served by
the next daemon (issue 14), with real cgtreed processes on the CPU backend.

The hard case is a daemon that is dead but whose sockets are still open: a SIGKILLed CUDA
process can take a while to exit, so neither the lane nor ZeroMQ sees an end-of-file, and the
clients used to wait out their whole timeout. Here it is played by a daemon held with SIGSTOP
(its sockets open, nothing answered) while a new daemon takes over the endpoint, as systemd's
restart does. Every client uses ``timeout_s=60``; each must be served again well within it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from cgtree.client import Client
from cgtree.client.doorbell import DoorbellHangup
from cgtree.client.watch import DaemonWatch
from cgtree.daemon.protocol import encode_reply, unpack

# Far below the clients' 60 s timeout, far above what recovery takes on a loaded 2-core host.
NOTICED_WITHIN_S = 20.0

DOORBELL_CONFIG = """
[daemon]
max_message_bytes = 4194304
reap_interval_s = 0.2
doorbell = "on"
"""


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def take_over(stuck, daemon_tools):
    """The supervisor's new daemon on the endpoint of ``stuck`` (held with SIGSTOP)."""
    return daemon_tools.DaemonProcess(stuck.workdir, Path(stuck.config_path).read_text()).start()


def finish(stuck) -> None:
    stuck.signal(signal.SIGKILL)
    stuck.wait(timeout_s=10)


@pytest.mark.parametrize("lanes", [True, False], ids=["lane", "zmq"])
def test_a_request_in_flight_to_a_dead_daemon_is_served_by_the_next_one(daemon_factory, daemon_tools, lanes):
    daemon = daemon_factory()
    model, x = tiny_mlp(), torch.randn(2, 8)
    client = Client(daemon.endpoint, timeout_s=60, lanes=lanes)
    successor = None
    try:
        handle = client.register(model, [x])
        client.submit(handle, [x])
        assert client.lane_attached == lanes
        first_pid = client.daemon_pid
        daemon.signal(signal.SIGSTOP)  # dead to its clients, sockets still open
        y = torch.randn(2, 8)
        pending = daemon_tools.in_thread(lambda: client.submit(handle, [y]))
        time.sleep(0.3)  # the request is on its way to the stopped daemon
        successor = take_over(daemon, daemon_tools)
        started = time.monotonic()
        (out,) = pending.join(NOTICED_WITHIN_S)
        assert time.monotonic() - started < NOTICED_WITHIN_S
        torch.testing.assert_close(out, model(y))
        assert client.daemon_pid == successor.proc.pid != first_pid
    finally:
        client.close(timeout_s=0.5)
        finish(daemon)
        if successor is not None:
            successor.kill()


def test_a_doorbell_wait_on_a_dead_daemon_ends_at_once(daemon_factory, daemon_tools):
    """The doorbell: a client spinning on the page of a daemon that will never answer. (A plan
    run that replays needs CUDA; the wait itself is the same on CPU: a plan id that is none.)"""
    daemon = daemon_factory(DOORBELL_CONFIG)
    model, x = tiny_mlp(), torch.randn(2, 8)
    client = Client(daemon.endpoint, timeout_s=60)
    successor = None
    try:
        client.submit(model, [x])
        lane = client.connection.lane.attached
        assert lane is not None and lane.doorbell is not None
        daemon.signal(signal.SIGSTOP)
        seq = lane.doorbell.ring(987654)
        waiting = daemon_tools.in_thread(lambda: lane.doorbell.wait_ack(seq, lane, 60.0, 0.0))
        successor = take_over(daemon, daemon_tools)
        with pytest.raises(DoorbellHangup, match="the daemon is gone"):
            waiting.join(NOTICED_WITHIN_S)
        # ... and the client itself carries on with the new daemon.
        (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        assert client.daemon_pid == successor.proc.pid
    finally:
        client.close(timeout_s=0.5)
        finish(daemon)
        if successor is not None:
            successor.kill()


def test_the_watch_sees_a_sigkilled_daemon_before_anyone_reaps_it(daemon_factory):
    """The process check on its own: the killed daemon is not reaped (a zombie, or still
    exiting), its socket file is still there, and the watch says it is gone."""
    daemon = daemon_factory()
    watch = DaemonWatch(daemon.endpoint)
    watch.bind()
    assert watch.bound.pid == daemon.proc.pid  # the listener's pid, from the kernel
    assert watch.gone(fresh=True) is None
    os.kill(daemon.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (reason := watch.gone(fresh=True)) is None:
        assert time.monotonic() < deadline, "the watch did not see the daemon die"
        time.sleep(0.01)
    assert os.path.exists(daemon.socket_path)  # nothing else would have told
    assert f"its process {daemon.proc.pid}" in reason
    daemon.wait(timeout_s=10)


def test_waiting_for_the_next_daemon_keeps_its_ping_until_a_late_daemon_answers(tmp_path):
    """The socket file appears after the wait began, and the daemon behind it answers 1.5 s
    after the ping arrived (busy starting): one ping, answered, never replaced by another."""
    workdir = os.path.join("/tmp", f"cgt-{os.getpid()}-late")
    os.makedirs(workdir, exist_ok=True)
    endpoint = f"ipc://{workdir}/s"
    pings: list[bytes] = []
    context = zmq.Context.instance()
    stop = threading.Event()

    def late_daemon() -> None:
        time.sleep(0.4)
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        try:
            while not stop.is_set():
                if not router.poll(50):
                    continue
                identity, envelope = router.recv_multipart()
                pings.append(envelope)
                time.sleep(1.5)
                body = {"pong": True, "daemon_pid": 4242, "protocol": 1, "session": None}
                router.send_multipart([identity, encode_reply(unpack(envelope)["id"], body)])
        finally:
            router.close(0)

    server = threading.Thread(target=late_daemon, daemon=True)
    server.start()
    client = Client(endpoint, timeout_s=8)
    try:
        started = time.monotonic()
        client.session.await_daemon("ping", RuntimeError("the test's daemon went away"))
        assert time.monotonic() - started < 6.0
        assert len(pings) == 1 and unpack(pings[0])["op"] == "ping"
    finally:
        stop.set()
        server.join(5)
        client.close(timeout_s=0.2)
        for name in ("s",):
            if os.path.exists(os.path.join(workdir, name)):
                os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
