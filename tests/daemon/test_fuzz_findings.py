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


def test_a_lane_datagram_of_zero_frames_is_a_bad_request_not_a_dead_daemon(cgtreed, dealer):
    """Found by the lane fuzzer: a well-framed datagram announcing no frames reached the decoder,
    which took frame 0 of an empty list; the IndexError escaped the loop and the daemon exited."""
    lane = _call(dealer, "hello", {"pid": os.getpid()})["body"]["lane"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    try:
        sock.connect(lane["path"])
        assert _datagram(sock, [LANE_MAGIC, lane["token"]])[0] == b"ok"
        (reply,) = _datagram(sock, [])
        envelope = msgpack.unpackb(reply, raw=False)
        assert envelope["id"] is None and envelope["error"]["code"] == "bad_request"
        assert "no frames" in envelope["error"]["message"]
        # The lane stays attached and the daemon serves it.
        (pong,) = _datagram(sock, [msgpack.packb({"v": 1, "id": 2, "op": "ping", "body": {}})])
        assert msgpack.unpackb(pong, raw=False)["body"]["pong"] is True
    finally:
        sock.close()
    assert cgtreed.alive()


@pytest.mark.parametrize("pid", [-1, -(2**31), -(2**63), 0])
def test_hello_with_a_pid_that_is_not_positive_is_a_bad_request(dealer, pid):
    """Found by the body fuzzer: psutil raises ValueError for a negative pid, which the daemon
    answered as ``internal`` (a daemon bug) instead of naming the field."""
    error = _call(dealer, "hello", {"pid": pid})["error"]
    assert error["code"] == "bad_request" and "pid" in error["message"] and str(pid) in error["message"]
    assert _call(dealer, "ping", {})["body"]["pong"] is True
