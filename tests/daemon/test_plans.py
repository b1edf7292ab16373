"""Prepared submits (``cgtree.daemon.plans``): the wire formats, the plan book, expiry, and a
plan request on a real lane of a CPU daemon (plans themselves need CUDA outputs: tests/gpu)."""

from __future__ import annotations

import socket
import types

import msgpack
import pytest

from cgtree.client import Client
from cgtree.daemon.lane import LANE_MAGIC, LANE_MAX_BYTES, receive_datagram, send_frames, split_datagram
from cgtree.daemon.plans import (
    PLAN_REQUEST,
    PlanBook,
    find_plan,
    is_plan_request,
    pack_plan_reply,
    pack_plan_request,
    parse_plan_reply,
    parse_plan_request,
)
from cgtree.daemon.protocol import ProtocolError


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
        offer = client._lane_offer
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
