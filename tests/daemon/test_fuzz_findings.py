"""What fuzzing found (issue 14; ``test_protocol_fuzz.py``, ``benchmarks/soak_fuzz.py``), each
pinned as a regular test: the input that broke the daemon, and the daemon answering it with a
clear error and serving on."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest
import zmq

from cgtree.daemon.lane import LANE_MAGIC, header_of, split_datagram


def _call(sock: zmq.Socket, op: str, body: dict, request_id: int = 1) -> dict:
    sock.send(msgpack.packb({"v": 1, "id": request_id, "op": op, "body": body}, use_bin_type=True))
    assert sock.poll(10_000), f"no reply to {op}"
    return msgpack.unpackb(sock.recv(), raw=False)


@pytest.fixture
def dealer(cgtreed):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cgtreed.endpoint)
    yield sock
    sock.close(0)


def _datagram(sock: socket.socket, frames: list) -> list:
    sock.send(header_of(frames) + b"".join(frames))
    return [bytes(frame) for frame in split_datagram(memoryview(sock.recv(1 << 17)))]


@pytest.fixture
def lane(dealer):
    """A lane attached to a fresh session of this process."""
    offer = _call(dealer, "hello", {"pid": os.getpid()})["body"]["lane"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(offer["path"])
    assert _datagram(sock, [LANE_MAGIC, offer["token"]])[0] == b"ok"
    yield sock
    sock.close()


def _assert_refused_and_still_served(sock: socket.socket, reply: bytes, words: str) -> None:
    envelope = msgpack.unpackb(reply, raw=False)
    assert envelope["id"] is None and envelope["error"]["code"] == "bad_request"
    assert words in envelope["error"]["message"]
    (pong,) = _datagram(sock, [msgpack.packb({"v": 1, "id": 2, "op": "ping", "body": {}})])
    assert msgpack.unpackb(pong, raw=False)["body"]["pong"] is True  # the lane stays attached


def test_a_lane_datagram_of_zero_frames_is_a_bad_request_not_a_dead_daemon(cgtreed, lane):
    """Found by the lane fuzzer: a well-framed datagram announcing no frames reached the decoder,
    which took frame 0 of an empty list; the IndexError escaped the loop and the daemon exited."""
    (reply,) = _datagram(lane, [])
    _assert_refused_and_still_served(lane, reply, "no frames")
    assert cgtreed.alive()


def test_a_zero_byte_lane_datagram_is_a_bad_request_not_a_hang_up(cgtreed, lane):
    """Found by the lane fuzzer: a 0-byte datagram reads like the peer's close (recv returns 0
    bytes either way), so the daemon closed the lane unanswered; the protocol says a datagram
    with a bad header gets ``bad_request`` and the lane stays attached."""
    lane.send(b"")
    (reply,) = [bytes(f) for f in split_datagram(memoryview(lane.recv(1 << 17)))]
    _assert_refused_and_still_served(lane, reply, "0-byte datagram")


@pytest.mark.parametrize("pid", [-1, -(2**31), -(2**63), 0])
def test_hello_with_a_pid_that_is_not_positive_is_a_bad_request(dealer, pid):
    """Found by the body fuzzer: psutil raises ValueError for a negative pid, which the daemon
    answered as ``internal`` (a daemon bug) instead of naming the field."""
    error = _call(dealer, "hello", {"pid": pid})["error"]
    assert error["code"] == "bad_request" and "pid" in error["message"] and str(pid) in error["message"]
    assert _call(dealer, "ping", {})["body"]["pong"] is True
