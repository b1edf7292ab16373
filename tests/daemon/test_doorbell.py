"""Doorbell pages (cgtree.daemon.doorbell, cgtree.client.doorbell) on the CPU: the policy, the
page protocol between two mappings of one memfd, the kick of a daemon that fell asleep, a dead
or silent daemon, the page handed over at the lane handshake, and a real cgtreed that rings
(``daemon.doorbell = "on"``) answering a bad plan id on the lane while it keeps serving.

A plan run that replays needs CUDA output buffers; that path runs in
tests/gpu/test_daemon_gpu.py (``test_a_tight_plan_loop_rings_the_doorbell...``)."""

from __future__ import annotations

import os
import platform
import threading
import time
import types

import pytest
import torch

from cgtree.client import Client
from cgtree.client.doorbell import ClientDoorbell, DoorbellHangup, DoorbellTimeout, fits_request
from cgtree.client.lane import ClientLane
from cgtree.config import ConfigError, DaemonConfig
from cgtree.daemon.doorbell import (
    ABORTED,
    FEATURES,
    GATE_WAIT_MAX_S,
    MAX_GATED_PLAN_ID,
    ON_LANE,
    REPLAYED,
    SEQ_MASK,
    Doorbell,
    LaunchGate,
    doorbell_policy,
    done_word,
    is_kick,
    next_seq,
)
from cgtree.daemon.lane import LaneHub
from cgtree.daemon.protocol import ProtocolError, decode_reply
from cgtree.errors import LaunchVetoed

CPU = types.SimpleNamespace(is_cuda=False, device=torch.device("cpu"))
x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="doorbells are x86-64 only")


class FakeLane:
    """What the client's waits ask of a lane: kicks (counted, optionally answered) and hang-ups."""

    def __init__(self, on_kick=None, closed: bool = False) -> None:
        self.kicks, self.on_kick, self.closed = 0, on_kick, closed

    def kick(self) -> None:
        self.kicks += 1
        if self.on_kick is not None:
            self.on_kick()

    def peer_closed(self) -> bool:
        return self.closed


@pytest.fixture
def page():
    daemon_end = Doorbell([])
    client_end = ClientDoorbell(os.dup(daemon_end.fd))
    daemon_end.handed_over()
    daemon_end.set_awake(True)
    yield daemon_end, client_end
    client_end.close()
    daemon_end.close()


def test_the_policy_rings_only_where_it_is_safe_and_useful():
    assert doorbell_policy("auto", serves_cuda=True, spins=True, machine="x86_64")[0]
    assert not doorbell_policy("auto", serves_cuda=False, spins=True, machine="x86_64")[0]  # CPU: lanes
    assert not doorbell_policy("auto", serves_cuda=True, spins=False, machine="x86_64")[0]  # would kick every time
    assert doorbell_policy("on", serves_cuda=False, spins=False, machine="x86_64")[0]
    enabled, why = doorbell_policy("on", serves_cuda=True, spins=True, machine="aarch64")
    assert not enabled and "store order" in why  # the page protocol relies on x86-64's
    assert not doorbell_policy("off", serves_cuda=True, spins=True, machine="x86_64")[0]


def test_the_config_accepts_auto_on_off_only():
    assert DaemonConfig(doorbell="on").doorbell == "on"
    with pytest.raises(ConfigError, match="daemon.doorbell"):
        DaemonConfig(doorbell="yes")


def test_sequence_numbers_never_repeat_the_last_and_skip_zero():
    assert next_seq(0) == 1 and next_seq(1) == 2
    assert next_seq(SEQ_MASK) == 1  # wraps past 0: a fresh page's words never look rung
    assert fits_request(SEQ_MASK) and not fits_request(SEQ_MASK + 1) and not fits_request(0)
    with pytest.raises(ValueError):
        done_word(10_000)


@x86
def test_a_request_rung_on_one_mapping_is_taken_once_and_answered_on_the_other(page):
    daemon_end, client_end = page
    assert daemon_end.take() is None and not daemon_end.rung()
    seq = client_end.ring(7)
    assert daemon_end.rung()
    assert daemon_end.take() == (seq, 7, False)
    assert daemon_end.take() is None and not daemon_end.rung()  # a request runs once
    daemon_end.signal_done(CPU, seq)  # the CPU backend's run is over when it returns
    assert daemon_end.settled()
    daemon_end.answer(seq, REPLAYED, generation=5, node_id=0, daemon_us=12.5, device_index=0)
    lane = FakeLane()
    status, reply = client_end.wait_ack(seq, lane, timeout_s=1.0, spin_s=0.0)
    assert status == REPLAYED and reply == (5, 0, 12.5, 0)
    client_end.wait_done(0, seq, lane, timeout_s=1.0, spin_s=0.0)
    assert lane.kicks == 0
    # The next request has a new number; an answer to the old one is not taken for it.
    second = client_end.ring(7)
    assert second != seq and daemon_end.take() == (second, 7, False)
    with pytest.raises(DoorbellTimeout):
        client_end.wait_ack(second, lane, timeout_s=0.05, spin_s=0.0)
    daemon_end.answer(second, ON_LANE)
    assert client_end.wait_ack(second, lane, timeout_s=1.0, spin_s=0.0)[0] == ON_LANE


@x86
def test_a_gated_request_launches_only_on_its_own_verdict(page):
    daemon_end, client_end = page
    assert client_end.gates(7) and not client_end.gates(MAX_GATED_PLAN_ID + 1)  # that id would not fit
    seq = client_end.ring(7, gated=True)
    assert daemon_end.take() == (seq, 7, True)
    gate = LaunchGate(daemon_end, seq)
    # No verdict yet: the daemon waits at most GATE_WAIT_MAX_S, then does not launch, for good.
    started = time.perf_counter()
    with pytest.raises(LaunchVetoed, match="no verdict"):
        gate()
    assert time.perf_counter() - started >= GATE_WAIT_MAX_S and gate.refusal == "late" and not gate.passed
    client_end.verdict(seq, True)  # too late: a refused gate stays refused
    with pytest.raises(LaunchVetoed):
        gate()
    # The next request: a launch verdict of the previous one does not count for it.
    second = client_end.ring(7, gated=True)
    assert daemon_end.take() == (second, 7, True)
    gate = LaunchGate(daemon_end, second)
    threading.Timer(0.00005, client_end.verdict, (second, True)).start()
    verdict = daemon_end.await_verdict(second, 5.0)
    assert verdict is True
    gate()
    assert gate.passed
    gate()  # passed once: every later call goes through at once
    # A veto.
    third = client_end.ring(9, gated=True)
    assert daemon_end.take() == (third, 9, True)
    client_end.verdict(third, False)
    gate = LaunchGate(daemon_end, third)
    with pytest.raises(LaunchVetoed, match="vetoed"):
        gate()
    assert gate.refusal == "vetoed"
    daemon_end.answer(third, ABORTED)
    assert client_end.wait_ack(third, FakeLane(), timeout_s=1.0, spin_s=0.0)[0] == ABORTED


def test_a_page_without_the_gate_feature_is_never_gated(page):
    """An older daemon's page reads 0 in FEATURES: its client rings ungated requests only."""
    daemon_end, client_end = page
    daemon_end.words[FEATURES] = 0
    assert not client_end.gates(7)


@x86
def test_a_client_waiting_on_a_daemon_that_fell_asleep_kicks_it_once(page):
    daemon_end, client_end = page
    seq = client_end.ring(3)
    daemon_end.set_awake(False)  # asleep before it saw the request

    def woken():  # what the daemon does on a kick: look at the page
        taken = daemon_end.take()
        if taken is not None:
            daemon_end.answer(taken[0], ON_LANE)

    lane = FakeLane(on_kick=woken)
    status, _ = client_end.wait_ack(seq, lane, timeout_s=2.0, spin_s=0.0)
    assert status == ON_LANE and lane.kicks == 1


@x86
def test_a_dead_daemon_is_seen_through_the_lane_not_waited_out(page):
    daemon_end, client_end = page
    seq = client_end.ring(3)
    started = time.monotonic()
    with pytest.raises(DoorbellHangup):
        client_end.wait_ack(seq, FakeLane(closed=True), timeout_s=30.0, spin_s=0.0)
    with pytest.raises(DoorbellHangup):
        client_end.wait_done(0, seq, FakeLane(closed=True), timeout_s=30.0, spin_s=0.0)
    assert time.monotonic() - started < 5.0


@x86
def test_the_lane_handshake_hands_the_page_to_the_sessions_client(tmp_path):
    session = types.SimpleNamespace(state="live", label="s1", lane_open=False, doorbell_open=False, owner=os.getuid(),
                                    counters={"lane_requests": 0, "doorbell_kicks": 0},
                                    client=types.SimpleNamespace(pid=os.getpid(), create_time=None))
    token = os.urandom(16)
    hub = LaneHub(str(tmp_path / "lane"), find_session=lambda t: session if t == token else None,
                  make_doorbell=lambda: Doorbell([]))
    hub.open()
    attached: dict = {}
    connector = threading.Thread(target=lambda: attached.setdefault("lane", ClientLane.connect(hub.path, token)))
    connector.start()
    deadline = time.monotonic() + 10
    while not hub.connections or not any(c.session for c in hub.connections.values()):
        assert time.monotonic() < deadline, "the handshake did not complete"
        hub.accept()
        for connection in list(hub.connections.values()):
            hub.read(connection, 4)
        time.sleep(0.001)
    connector.join(10)
    lane = attached["lane"]
    try:
        (connection,) = hub.connections.values()
        assert lane.doorbell is not None and connection.doorbell is not None and session.doorbell_open
        assert hub.ringing == [connection]
        assert connection.doorbell.fd is None  # handed over: only the mappings keep the page
        assert lane.doorbell.awake()  # the loop that attached it is running: ring at once
        hub.set_awake(False)
        assert not lane.doorbell.awake()
        seq = lane.doorbell.ring(42)
        assert lane.doorbell.rouse(lane)  # asleep: kicked at once
        assert connection.doorbell.take() == (seq, 42, False)  # one page, two processes' views
        (event,) = hub.read(connection, 4)
        assert is_kick(event.frames)
        assert session.counters == {"lane_requests": 0, "doorbell_kicks": 1}  # a kick is not a request
        hub.set_awake(True)
        assert not lane.doorbell.rouse(lane) and hub.read(connection, 4) == []  # awake: no kick
        hub.close(connection)
        assert not hub.ringing and not session.doorbell_open
        deadline = time.monotonic() + 5
        while not lane.peer_closed():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        lane.close()
        hub.shutdown()


DOORBELL_CONFIG = """
[daemon]
max_message_bytes = 4194304
reap_interval_s = 0.2
doorbell = "on"
"""


@x86
def test_a_ringing_cpu_daemon_answers_a_bad_plan_on_the_lane_and_keeps_serving(daemon_factory):
    daemon = daemon_factory(DOORBELL_CONFIG)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(4, 8)
    with Client(daemon.endpoint, timeout_s=30) as client, torch.no_grad():
        client.submit(model, [x])
        lane = client.connection.lane.attached
        assert lane is not None and lane.doorbell is not None
        session = client.status(session_only=True)["sessions"][0]
        assert session["doorbell"] is True and session["doorbell_requests"] == 0
        assert client.status()["daemon"]["doorbell"]["enabled"] is True
        # Rung while the daemon sleeps (its spin window long over): the client kicks it, and a
        # plan id that is not the session's is refused on the lane, under the request's number.
        time.sleep(0.2)
        assert not lane.doorbell.awake()
        seq = lane.doorbell.ring(987654)
        status, _ = lane.doorbell.wait_ack(seq, lane, timeout_s=10.0, spin_s=0.0)
        assert status == ON_LANE
        reply = lane.receive(10.0)
        with pytest.raises(ProtocolError) as refused:
            decode_reply(reply[0])
        assert refused.value.code == "plan_expired" and refused.value.request_id == seq
        # The daemon keeps serving this client, on every path.
        out = client.submit(model, [x])[0]
        torch.testing.assert_close(out, model(x))
        assert client.status(session_only=True)["sessions"][0]["doorbell_requests"] == 1


@x86
def test_stream_ordered_outputs_leave_cpu_outputs_to_the_host_wait(daemon_factory):
    """``Client(stream_ordered_outputs=True)`` orders only CUDA outputs on a CUDA stream: a
    CPU daemon's doorbell runs still return finished outputs, waited for on the host."""
    daemon = daemon_factory(DOORBELL_CONFIG)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(4, 8)
    with Client(daemon.endpoint, timeout_s=30, stream_ordered_outputs=True) as client, torch.no_grad():
        assert client.stream_order.enabled
        for step in range(40):
            x.normal_()
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
        rung = client.status(session_only=True)["sessions"][0]["doorbell_requests"]
        assert client.stream_order.runs == 0 and client.stream_order.unfinished() == 0, (rung, client.stream_order.describe())

