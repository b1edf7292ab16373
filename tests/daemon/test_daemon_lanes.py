"""Submit lanes through a real cgtreed (CPU backend): requests travel on the lane, replies too
large for it come over ZeroMQ, a daemon with lanes off serves over ZeroMQ alone, and bad lane
traffic (wrong token, garbage, oversized datagrams) is refused while the daemon keeps serving."""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import pytest
import torch

from cgtree.client import Client
from cgtree.daemon.lane import (
    LANE_MAGIC,
    LANE_MAX_BYTES,
    LaneFramingError,
    header_of,
    receive_datagram,
    send_frames,
    split_datagram,
)


def _model(width: int = 8):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()).eval()


def _session_doc(client: Client) -> dict:
    return client.status(session_only=True)["sessions"][0]


def test_requests_travel_on_the_lane_and_outputs_equal_eager(cgtreed):
    model = _model()
    x = torch.randn(4, 8)
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        before = None
        for _ in range(3):
            out = client.submit(model, [x])[0]
            if before is None:
                before = _session_doc(client)["lane_requests"]
        assert client.lane_attached
        doc = _session_doc(client)
        assert doc["lane"] is True
        assert doc["lane_requests"] >= before + 2  # the later submits (and this status) came by lane
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))


def test_a_reply_too_large_for_the_lane_comes_over_zeromq(cgtreed):
    # 512 x 256 float32 outputs: 512 KiB of CPU copies, four times the lane's datagram limit.
    torch.manual_seed(2)
    model = torch.nn.Linear(256, 256).eval()
    x = torch.randn(512, 256)
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        for _ in range(2):
            out = client.submit(model, [x])[0]
        assert client.lane_attached  # the request went on the lane; the reply was moved
        assert out.numel() * out.element_size() > LANE_MAX_BYTES
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))


def test_a_daemon_with_lanes_off_serves_over_zeromq(daemon_factory):
    daemon = daemon_factory("[daemon]\nlanes = false\nmax_message_bytes = 4194304\n")
    model = _model()
    x = torch.randn(4, 8)
    with Client(daemon.endpoint, timeout_s=30) as client:
        out = client.submit(model, [x])[0]
        out = client.submit(model, [x])[0]
        assert not client.lane_attached
        assert _session_doc(client)["lane"] is False
        assert client.status()["daemon"]["lane_path"] is None
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))


def test_a_client_with_lanes_off_uses_zeromq(cgtreed):
    model = _model()
    x = torch.randn(4, 8)
    with Client(cgtreed.endpoint, timeout_s=30, lanes=False) as client:
        client.submit(model, [x])
        client.submit(model, [x])
        assert not client.lane_attached
        assert _session_doc(client)["lane_requests"] == 0


def _lane_path(client: Client) -> str:
    path = client.status()["daemon"]["lane_path"]
    assert path and os.path.exists(path)
    return path


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def _answer(sock: socket.socket) -> list[bytes]:
    data = receive_datagram(sock, bytearray(LANE_MAX_BYTES))
    assert data is not None, "the daemon closed the lane without answering"
    return [bytes(f) for f in split_datagram(memoryview(data))]


def test_a_lane_with_a_wrong_token_is_refused_and_the_daemon_keeps_serving(cgtreed):
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        path = _lane_path(client)
        sock = _connect(path)
        send_frames(sock, [LANE_MAGIC, b"\0" * 16])
        answer = _answer(sock)
        assert answer[0] == b"refused" and b"token" in answer[1]
        assert receive_datagram(sock, bytearray(64)) is None  # then closed
        sock.close()
        sock = _connect(path)
        send_frames(sock, [b"not the magic"])
        assert _answer(sock)[0] == b"refused"
        sock.close()
        assert client.ping()["daemon_pid"] == cgtreed.proc.pid


def test_garbage_and_oversized_datagrams_on_an_attached_lane_get_errors(cgtreed):
    model = _model()
    x = torch.randn(4, 8)
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        client.submit(model, [x])
        hello = client.connection.lane.offer  # the offer from this client's hello: attach a second lane as it
        sock = _connect(hello["path"])
        send_frames(sock, [LANE_MAGIC, hello["token"]])
        assert _answer(sock) == [b"ok"]
        # A header that lies about its frames.
        sock.send(struct.pack("<II", 1, 999) + b"abc")
        reply = msgpack.unpackb(_answer(sock)[0], raw=False)
        assert reply["error"]["code"] == "bad_request" and "frame lengths" in reply["error"]["message"]
        # Not msgpack.
        send_frames(sock, [b"\xc1\xc1garbage"])
        reply = msgpack.unpackb(_answer(sock)[0], raw=False)
        assert reply["error"]["code"] == "bad_request"
        # Larger than the lane's limit: truncated by the kernel, refused by the daemon.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * LANE_MAX_BYTES)
        big = b"x" * (LANE_MAX_BYTES + 1024)
        try:
            sock.sendmsg([header_of([big]), big])
        except OSError:
            pytest.skip("this kernel's socket buffer cannot hold a datagram over the lane limit")
        reply = msgpack.unpackb(_answer(sock)[0], raw=False)
        assert reply["error"]["code"] == "too_large"
        sock.close()
        # The newest lane replaced the client's own; the client reattaches and goes on.
        out = client.submit(model, [x])[0]
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))


def test_split_datagram_rejects_inconsistent_headers():
    frames = [b"ab", b"", b"cde"]
    data = header_of(frames) + b"".join(frames)
    assert [bytes(f) for f in split_datagram(memoryview(data))] == frames
    with pytest.raises(LaneFramingError):
        split_datagram(memoryview(data[:-1]))
    with pytest.raises(LaneFramingError):
        split_datagram(memoryview(struct.pack("<I", 10_000)))
    with pytest.raises(LaneFramingError):
        split_datagram(memoryview(b"\x01"))


def test_the_lane_socket_has_the_zeromq_sockets_access(cgtreed):
    """Whoever may use the daemon's ZeroMQ socket may attach a lane (a group in systemd
    deployments), and nobody else."""
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        path = _lane_path(client)
    assert os.stat(path).st_mode & 0o777 == os.stat(cgtreed.socket_path).st_mode & 0o777


def test_many_sessions_each_on_its_own_lane_are_all_answered(cgtreed):
    """The loop reads only the lanes the poll named: with several attached, each request is
    answered on its own lane, to its own session."""
    model = _model()
    clients = [Client(cgtreed.endpoint, timeout_s=30) for _ in range(8)]
    try:
        for round_ in range(3):
            for i, client in enumerate(clients):
                x = torch.full((2, 8), float(i + round_))
                (out,) = client.submit(model, [x])
                with torch.no_grad():
                    torch.testing.assert_close(out, model(x))
        assert all(client.lane_attached for client in clients)
        sessions = {client.session_id for client in clients}
        assert len(sessions) == len(clients)
    finally:
        for client in clients:
            client.close()
