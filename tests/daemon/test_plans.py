"""Prepared submits (``cgtree.daemon.plans``): the wire formats, the plan book, expiry, a plan
request on a real lane of a CPU daemon, and plan runs with their in-place recordings on the CPU
backend's tree manager (plans through a daemon need CUDA outputs: tests/gpu)."""

from __future__ import annotations

import collections
import dataclasses
import socket
import types
from typing import Optional

import msgpack
import pytest
import torch

from cgtree.client import Client
from cgtree.daemon.doorbell import VERDICT, Doorbell, LaunchGate, pack_verdict
from cgtree.daemon.lane import LANE_MAGIC, LANE_MAX_BYTES, receive_datagram, send_frames, split_datagram
from cgtree.daemon.metrics import NullMetrics
from cgtree.daemon.plans import (
    PLAN_REQUEST,
    DirectPlanMismatch,
    PlanBook,
    PlanServices,
    attach_direct,
    find_plan,
    is_plan_request,
    pack_plan_reply,
    pack_plan_request,
    parse_plan_reply,
    parse_plan_request,
    PlanReplayed,
    PlanVetoed,
    run_plan,
    writing_into,
)
from cgtree.daemon.protocol import ProtocolError
from cgtree.manager import TreeManager


def test_wire_formats_round_trip_and_never_look_like_msgpack():
    request = pack_plan_request(7, 42)
    assert is_plan_request([request]) and parse_plan_request(request) == (7, 42)
    assert not is_plan_request([request, b""]) and not is_plan_request([request[:-1]])
    assert not is_plan_request([msgpack.packb({"v": 1, "id": 7, "op": "submit", "body": {}})])
    with pytest.raises(Exception):
        msgpack.unpackb(request)  # 0xc1 is never used by msgpack
    assert parse_plan_reply(pack_plan_reply(7, 3, None, 12.5)) == (7, 3, None, 12.5)
    assert parse_plan_reply(pack_plan_reply(7, 3, 0, 1.0)) == (7, 3, 0, 1.0)
    assert parse_plan_reply(b"\xc1PR1" + b"\0" * 3) is None
    assert parse_plan_reply(msgpack.packb({"v": 1})) is None


def _state(fn, buffer):
    return types.SimpleNamespace(plans=PlanBook(), functions={("g", ()): fn}, output_buffers={"g": buffer})


def test_the_same_submit_gets_the_same_plan_and_a_changed_one_expires():
    fn, buffer, inputs = object(), object(), [1]
    state = _state(fn, buffer)
    plan = state.plans.offer("g", b"packed", ("g", ()), fn, [], inputs, buffer)
    assert state.plans.offer("g", b"packed", ("g", ()), fn, [], inputs, buffer) is plan
    assert state.plans.offer("g", b"other", ("g", ()), fn, [], [2], buffer) is not plan
    session = types.SimpleNamespace(devices={"cuda:0": state})
    assert find_plan(session, plan.plan_id) == (state, plan)
    state.output_buffers["g"] = object()  # the graph's outputs moved to another buffer
    with pytest.raises(ProtocolError) as refused:
        find_plan(session, plan.plan_id)
    assert refused.value.code == "plan_expired"
    assert plan.plan_id not in state.plans.by_id
    with pytest.raises(ProtocolError):
        find_plan(types.SimpleNamespace(devices={}), plan.plan_id)  # another session: unknown


def test_a_plan_request_for_an_unknown_plan_gets_plan_expired(cgtreed):
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        client.mark_step_begin()  # a session request: hello done, the lane offer known
        offer = client.connection.lane.offer
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(offer["path"])
        send_frames(sock, [LANE_MAGIC, offer["token"]])
        assert [bytes(f) for f in split_datagram(memoryview(receive_datagram(sock, bytearray(64))))] == [b"ok"]
        send_frames(sock, [pack_plan_request(99, 123456)])
        (frame,) = split_datagram(memoryview(receive_datagram(sock, bytearray(LANE_MAX_BYTES))))
        reply = msgpack.unpackb(bytes(frame), raw=False)
        assert reply["id"] == 99 and reply["error"]["code"] == "plan_expired"
        sock.close()
        assert client.ping()["daemon_pid"] > 0
    assert PLAN_REQUEST.size == 20


# ---------------------------------------------------------------------------------------------
# In-place recordings, on the CPU backend's tree manager (its replays re-run the function into
# the recorded buffers: the decisions and the data flow are the ones CUDA replays follow).


class _Buffer:
    """The part of OutputBuffer a plan uses, over CPU tensors."""

    def __init__(self, buffer_id: int, *shapes: tuple) -> None:
        self.buffer_id, self.generation = buffer_id, 0
        self._views = [torch.full(shape, float("nan")) for shape in shapes]

    def views(self) -> list:
        return self._views

    def fits(self, tensors: list) -> bool:
        return [tuple(t.shape) for t in tensors] == [tuple(v.shape) for v in self._views]

    def copy_in(self, tensors: list) -> None:
        self.generation += 1
        for view, tensor in zip(self._views, tensors):
            view.copy_(tensor)


def _plan_setup(buffer_id: int = 1, policy_changes: Optional[dict] = None):
    manager = TreeManager("cpu")
    if policy_changes:
        manager.set_policy(dataclasses.replace(manager.policy, **policy_changes))
    weight, x = torch.randn(8, 8), torch.randn(4, 8)
    fn = manager.cudagraphify(lambda w, v: (torch.relu(v @ w),), [weight, x], static_input_idxs=[0], name="g")
    for _ in range(3):  # the submits before the plan: warmup, recording, replay
        fn(weight, x)
    buffer = _Buffer(buffer_id, (4, 8))
    state = types.SimpleNamespace(device="dev", manager=manager, plans=PlanBook(), functions={("g", ()): fn},
                                  output_buffers={"g": buffer})
    session = types.SimpleNamespace(devices={"dev": state}, counters=collections.Counter())
    runtime = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), synchronize=lambda: None)
    services = PlanServices({"dev": runtime}, lambda: None, NullMetrics())
    plan = state.plans.offer("g", b"packed", ("g", ()), fn, [weight], [x], buffer)
    return manager, state, session, services, plan, weight, x


def test_a_plan_loop_moves_to_its_in_place_recording_and_reads_fresh_data(monkeypatch):
    monkeypatch.setattr("cgtree.daemon.plans.DIRECT_AFTER_RUNS", 2)
    manager, state, session, services, plan, weight, x = _plan_setup()
    general = []

    def finish_general(state_, runtime, graph_id, outputs, received):
        general.append(manager.last_execution.mode.value)
        state_.output_buffers[graph_id].copy_in(outputs)
        return ["general"]

    kinds = []
    for request_id in range(1, 9):
        x.copy_(torch.randn(4, 8))  # the client writes its buffer between runs
        settled = []
        result = run_plan(services, session, request_id, plan.plan_id, finish_general=finish_general,
                          settle=settled.append)
        fast = result if isinstance(result, PlanReplayed) else None
        kinds.append("fast" if fast else "general")
        if fast:
            assert fast.generation == plan.buffer.generation
            assert settled == [services.devices["dev"]]  # the outputs made readable the caller's way
        else:
            assert result == ["general"] and not settled
        torch.testing.assert_close(plan.buffer.views()[0], torch.relu(x @ weight))
    # Two runs the general way (copies), then the in-place recording warms up and records
    # (full replies saying so), then every run is one replay of it.
    assert kinds == ["fast", "fast", "general", "general", "fast", "fast", "fast", "fast"], kinds
    assert general == ["warmup", "recorded"]
    assert plan.direct is not None and len(state.plans.direct) == 1
    names = {node["function"]: node for node in manager.status()["nodes"]}
    assert names["g [plan]"]["replays"] == 4
    assert plan.buffer.generation >= 8  # every run is a new generation of the buffer


def test_in_place_recordings_are_found_again_and_capped(monkeypatch):
    manager, state, session, services, plan, weight, x = _plan_setup()
    attach_direct(state, plan)
    first = plan.direct
    assert first is not None
    again = state.plans.offer("g", b"packed-again", ("g", ()), plan.fn, [weight], [x], plan.buffer)
    attach_direct(state, again)
    assert again.direct is first  # the same memory: the same recording
    monkeypatch.setattr("cgtree.daemon.plans.MAX_DIRECT_RECORDINGS", 1)
    other = state.plans.offer("g", b"other", ("g", ()), plan.fn, [weight], [torch.randn(4, 8)], plan.buffer)
    attach_direct(state, other)
    assert other.direct is None and other.direct_refused  # over the cap: the general way


def test_writing_into_copies_each_output_and_refuses_outputs_that_do_not_fit():
    weight, x = torch.randn(8, 3), torch.randn(4, 8)
    views = [torch.empty(4, 3), torch.empty(3)]
    run = writing_into(lambda w, v: (v @ w, (v @ w).sum(0)), 2)
    assert run(weight, x, *views) == ()
    torch.testing.assert_close(views[0], x @ weight)
    torch.testing.assert_close(views[1], (x @ weight).sum(0))
    with pytest.raises(DirectPlanMismatch):
        run(weight, x, torch.empty(5, 3), views[1])
    with pytest.raises(DirectPlanMismatch):
        run(weight, x, views[0])  # one output too many for the buffer


def test_a_plan_whose_in_place_recording_cannot_be_made_still_runs(monkeypatch):
    monkeypatch.setattr("cgtree.daemon.plans.DIRECT_AFTER_RUNS", 1)
    manager, state, session, services, plan, weight, x = _plan_setup()

    def broken(*args, **kwargs):
        raise RuntimeError("cannot make it")

    monkeypatch.setattr(manager, "cudagraphify", broken)
    run_plan(services, session, 1, plan.plan_id, finish_general=lambda *a: ["general"])
    result = run_plan(services, session, 2, plan.plan_id, finish_general=lambda *a: ["general"])
    assert isinstance(result, PlanReplayed)  # answered the fast way, by the general recording
    assert plan.direct is None and plan.direct_refused
    torch.testing.assert_close(plan.buffer.views()[0], torch.relu(x @ weight))


def test_no_in_place_recording_for_a_plan_whose_general_runs_do_not_replay(monkeypatch):
    """The policies decide whether a graph runs under graphs (skips, capture sizes, mutation
    support); a plan whose general runs do not replay never gets the all-static recording."""
    monkeypatch.setattr("cgtree.daemon.plans.DIRECT_AFTER_RUNS", 1)
    # Batch 4 is not a capture size: the general variant (x copied) is skipped; an all-static
    # recording would have no leading size to check.
    manager, state, session, services, plan, weight, x = _plan_setup(policy_changes={"capture_sizes": (8,)})
    buffer = plan.buffer

    def finish_general(state_, runtime_, graph_id, outputs, received):
        state_.output_buffers[graph_id].copy_in(outputs)
        return [manager.last_execution.mode.value]

    modes = [run_plan(services, session, i, plan.plan_id, finish_general=finish_general)[0] for i in range(5)]
    assert modes == ["skipped"] * 5 and plan.direct is None and not state.plans.direct
    torch.testing.assert_close(buffer.views()[0], torch.relu(x @ weight))


@pytest.mark.parametrize("in_place", [False, True], ids=["general", "in-place"])
def test_a_gated_plan_run_launches_only_on_the_clients_verdict(monkeypatch, in_place):
    """A gated doorbell request's plan run (``LaunchGate`` over a real page): vetoed, or with
    no verdict in time, nothing ran (the buffer and the tree as they were, ``PlanVetoed``);
    with a launch verdict it replays as an ungated run would, on both kinds of plan run."""
    monkeypatch.setattr("cgtree.daemon.plans.DIRECT_AFTER_RUNS", 0 if in_place else 10**6)
    manager, state, session, services, plan, weight, x = _plan_setup()
    page = Doorbell([])
    try:
        def finish_general(state_, runtime, graph_id, outputs, received):
            state_.output_buffers[graph_id].copy_in(outputs)
            return [manager.last_execution.mode.value]

        for _ in range(6):  # to the steady state: the in-place recording's warmup and recording first
            replayed = isinstance(run_plan(services, session, 0, plan.plan_id, finish_general=finish_general), PlanReplayed)
        assert replayed
        assert (plan.direct is not None) == in_place
        for seq, verdict in enumerate([None, False, True, False, True], start=1):
            x.copy_(torch.randn(4, 8))
            before = (plan.buffer.views()[0].clone(), plan.buffer.generation, dict(manager.counters))
            if verdict is not None:
                page.words[VERDICT] = pack_verdict(seq, verdict)
            result = run_plan(services, session, seq, plan.plan_id, finish_general=finish_general,
                              gate=LaunchGate(page, seq))
            if verdict:
                assert isinstance(result, PlanReplayed)
                torch.testing.assert_close(plan.buffer.views()[0], torch.relu(x @ weight))
                assert manager.counters["replays"] == before[2]["replays"] + 1
            else:
                assert result == PlanVetoed("late" if verdict is None else "vetoed")
                torch.testing.assert_close(plan.buffer.views()[0], before[0])
                assert plan.buffer.generation == before[1] and manager.counters == before[2]
            assert manager.launch_gate is None
        assert session.counters["gate_late"] == 1 and session.counters["gate_vetoed"] == 2
    finally:
        page.close()
