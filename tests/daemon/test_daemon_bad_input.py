"""Bad input from raw ZeroMQ sockets: every malformed message gets a clear error reply (or is
dropped when it cannot be answered) and the daemon keeps serving everyone else."""

from __future__ import annotations

import os
import pickle

import msgpack
import psutil
import pytest
import torch
import zmq

from cgtree.client import Client
from cgtree.client.lowering import encode, lower

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # DEFAULT_TEST_CONFIG in tests/conftest.py


class Raw:
    """A bare DEALER socket speaking the protocol by hand."""

    def __init__(self, endpoint: str, kind: int = zmq.DEALER) -> None:
        self.context = zmq.Context.instance()
        self.sock = self.context.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.kind = kind

    def send(self, *frames) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_s: float = 10.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0], raw=False), frames[1:]

    def request(self, op: str, body: dict, *frames, request_id=7):
        self.send(msgpack.packb({"v": 1, "id": request_id, "op": op, "body": body}, use_bin_type=True), *frames)
        reply = self.recv()
        assert reply is not None, f"no reply to {op}"
        return reply

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw(cgtreed):
    sock = Raw(cgtreed.endpoint)
    yield sock
    sock.close()


def error_of(reply) -> tuple:
    envelope, _ = reply
    assert "error" in envelope, envelope
    return envelope["id"], envelope["error"]["code"], envelope["error"]["message"]


def mlp_payload(seed: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    return model, encode(lower(model, [torch.randn(2, 4)]))


def register_raw(raw: Raw, encoded) -> str:
    frames = [encoded.graph_bytes] + [blob.data for blob in encoded.weights.values()]
    weights = {h: i + 1 for i, h in enumerate(encoded.weights)}
    envelope, _ = raw.request("register", {"device": "cpu", "graph": encoded.graph_id, "payload": 0, "weights": weights}, *frames)
    assert envelope["body"]["registered"], envelope
    return encoded.graph_id


def hello(raw: Raw) -> int:
    envelope, _ = raw.request("hello", {"pid": os.getpid(), "client": "raw test"})
    return envelope["body"]["session"]


# ------------------------------------------------------------------------------- envelopes


def test_garbage_bytes_get_bad_request_without_an_id(raw):
    raw.send(b"\xc1\xff\x00garbage")
    request_id, code, message = error_of(raw.recv())
    assert (request_id, code) == (None, "bad_request")
    assert "msgpack" in message


@pytest.mark.parametrize(
    "envelope, code, echoed",
    [
        ([1, 2, 3], "bad_request", None),
        ({"v": 99, "id": 5, "op": "ping", "body": {}}, "bad_version", 5),
        ({"v": 1, "op": "ping", "body": {}}, "bad_request", None),
        ({"v": 1, "id": 6, "op": "no_such_op", "body": {}}, "unknown_op", 6),
        ({"v": 1, "id": 8, "op": "ping", "body": [1]}, "bad_request", 8),
        ({"v": 1, "id": 9, "op": "ping", "body": {}, "extra": 1}, "bad_request", 9),
        ({"v": 1, "id": "x" * 500, "op": "ping", "body": {}}, "bad_request", None),
        ({"v": 1, "id": 10, "op": 3, "body": {}}, "bad_request", 10),
    ],
)
def test_malformed_envelopes_get_a_coded_error_echoing_the_id(raw, envelope, code, echoed):
    raw.send(msgpack.packb(envelope))
    request_id, got, _ = error_of(raw.recv())
    assert (request_id, got) == (echoed, code)


def test_a_message_larger_than_max_message_bytes_gets_too_large(raw):
    chunk = b"\0" * (MAX_MESSAGE_BYTES // 2)
    raw.send(msgpack.packb({"v": 1, "id": 11, "op": "ping", "body": {}}), chunk, chunk, chunk)
    request_id, code, message = error_of(raw.recv())
    assert (request_id, code) == (11, "too_large")
    assert "max_message_bytes" in message


def test_a_frame_over_the_zmq_limit_is_dropped_and_others_are_still_served(cgtreed):
    rogue = Raw(cgtreed.endpoint)
    try:
        rogue.send(msgpack.packb({"v": 1, "id": 12, "op": "ping", "body": {}}), b"\0" * (MAX_MESSAGE_BYTES + 4096))
        assert rogue.recv(timeout_s=1.0) is None  # ZeroMQ disconnected it: nothing to answer
    finally:
        rogue.close()
    other = Raw(cgtreed.endpoint)
    try:
        envelope, _ = other.request("ping", {})
        assert envelope["body"]["pong"] is True
    finally:
        other.close()


def test_a_req_socket_with_its_delimiter_frame_is_answered(cgtreed):
    req = Raw(cgtreed.endpoint, zmq.REQ)
    try:
        envelope, _ = req.request("ping", {}, request_id=13)
        assert envelope["id"] == 13 and envelope["body"]["pong"]
    finally:
        req.close()


# -------------------------------------------------------------------------------- sessions


def test_session_commands_before_hello_get_no_session(raw):
    for op in ("submit", "register", "release", "mark_step", "reset", "bye"):
        _, code, _ = error_of(raw.request(op, {}))
        assert code == "no_session", op


def test_hello_with_a_pid_that_does_not_exist_is_refused(raw):
    pid = max(psutil.pids()) + 10000
    _, code, message = error_of(raw.request("hello", {"pid": pid}))
    assert code == "bad_request" and str(pid) in message
    _, code, _ = error_of(raw.request("hello", {"pid": "me"}))
    assert code == "bad_request"


def test_submitting_an_unknown_graph_gets_unknown_graph(raw):
    hello(raw)
    _, code, message = error_of(raw.request("submit", {"device": "cpu", "graph": "ab" * 32, "inputs": []}))
    assert code == "unknown_graph" and "register" in message
    _, code, _ = error_of(raw.request("submit", {"device": "cuda:7", "graph": "ab" * 32, "inputs": []}))
    assert code == "unknown_device"


# --------------------------------------------------------------------------------- tensors


def cpu_desc(dtype="float32", shape=(2, 4), frame=0):
    return {"kind": "cpu", "dtype": dtype, "shape": list(shape), "frame": frame}


@pytest.mark.parametrize(
    "descs, frames, expected",
    [
        ([cpu_desc(dtype="float128")], [bytes(32)], "input 0: dtype 'float128' is not allowed"),
        ([cpu_desc(dtype="float64")], [bytes(64)], "input 0: dtype float64, the graph expects float32"),
        ([cpu_desc(shape=(3, 4))], [bytes(48)], "input 0: shape [3, 4], the graph expects [2, 4]"),
        ([cpu_desc()], [bytes(31)], "input 0: frame 0 has 31 bytes"),
        ([cpu_desc(shape=(2, -4))], [bytes(32)], "input 0: shape entries"),
        ([cpu_desc(frame=3)], [bytes(32)], "input 0: frame 3 does not exist"),
        ([cpu_desc(), cpu_desc(frame=1)], [bytes(32), bytes(32)], "takes 1 inputs, got 2"),
        ([{"kind": "cuda", "dtype": "float32", "shape": [2, 4], "stride": [4, 1], "offset": 0, "storage": {}}], [],
         "input 0: a CUDA tensor, but the graph runs on cpu"),
        ([{"kind": "output", "dtype": "float32", "shape": [2, 4], "stride": [4, 1], "byte_offset": 0, "buffer": 99, "generation": 1}], [],
         "input 0: output buffer 99 is not one of this session's"),
        ([{"kind": "pickle", "data": b"x"}], [], "input 0: unknown descriptor kind"),
        (["not a map"], [], "input 0: descriptor must be a map"),
    ],
)
def test_bad_tensor_descriptors_name_the_input_and_what_is_wrong(raw, descs, frames, expected):
    hello(raw)
    _, encoded = mlp_payload()
    graph_id = register_raw(raw, encoded)
    _, code, message = error_of(raw.request("submit", {"device": "cpu", "graph": graph_id, "inputs": descs}, *frames))
    assert code == "bad_tensor"
    assert expected in message


# -------------------------------------------------------------------------------- payloads


def _edit_payload(graph_bytes: bytes, edit) -> bytes:
    document = msgpack.unpackb(graph_bytes, raw=False)
    edit(document)
    return msgpack.packb(document, use_bin_type=True)


def test_a_payload_with_a_disallowed_operator_is_rejected_naming_it(raw):
    hello(raw)
    _, encoded = mlp_payload()

    def swap_relu(document):
        for node in document["nodes"]:
            if "relu" in node[1]:
                node[1] = "evil::launch_missiles.default"

    payload = _edit_payload(encoded.graph_bytes, swap_relu)
    _, code, message = error_of(raw.request("register", {"device": "cpu", "payload": 0, "weights": {}}, payload))
    assert code == "payload_rejected"
    assert "evil::launch_missiles.default" in message and "allowed_op_namespaces" in message


def test_a_pickle_payload_is_rejected_and_never_unpickled(raw, tmp_path):
    hello(raw)
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    _, code, _ = error_of(raw.request("register", {"device": "cpu", "payload": 0, "weights": {}}, pickle.dumps(Exploit())))
    assert code == "payload_rejected"
    assert not sentinel.exists()


def test_weight_bytes_that_do_not_match_their_hash_are_rejected(raw):
    hello(raw)
    _, encoded = mlp_payload(seed=1234)  # weights no other test put on the device
    weights = {h: i + 1 for i, h in enumerate(encoded.weights)}
    zeros = [bytes(len(blob.data)) for blob in encoded.weights.values()]
    _, code, message = error_of(raw.request("register", {"device": "cpu", "payload": 0, "weights": weights}, encoded.graph_bytes, *zeros))
    assert code == "payload_rejected" and "does not match its hash" in message
    # Nothing was kept: the honest blobs are asked for again.
    envelope, _ = raw.request("register", {"device": "cpu", "payload": 0, "weights": {}}, encoded.graph_bytes)
    assert sorted(envelope["body"]["missing_weights"]) == sorted(encoded.weights)


def test_a_graph_failing_at_run_time_is_an_internal_error_with_the_request_id(raw, cgtreed):
    hello(raw)
    encoded = encode(lower(lambda x: (x.reshape(6) * 2,), [torch.randn(2, 3)]))

    def break_view(document):
        for node in document["nodes"]:
            for i, arg in enumerate(node[2]):
                if arg == [6]:
                    node[2][i] = [7]

    payload = _edit_payload(encoded.graph_bytes, break_view)
    envelope, _ = raw.request("register", {"device": "cpu", "payload": 0, "weights": {}}, payload)
    graph_id = envelope["body"]["graph"]
    request = {"device": "cpu", "graph": graph_id, "inputs": [cpu_desc(shape=(2, 3))]}
    request_id, code, message = error_of(raw.request("submit", request, bytes(24), request_id=4242))
    assert (request_id, code) == (4242, "internal")
    assert "4242" in message
    assert "request 4242 failed" in cgtreed.log()


# ---------------------------------------------------------------------------- still serving


def test_after_all_that_a_good_client_is_served_correctly(cgtreed):
    model, _ = mlp_payload()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        for _ in range(3):
            x = torch.randn(2, 4)
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
        assert client.last_execution["mode"] == "replayed"
        assert client.status()["daemon"]["pid"] == cgtreed.proc.pid
    assert cgtreed.alive()


def test_packed_input_descriptors_are_accepted_and_bad_packing_is_named(raw):
    """``inputs`` may be the msgpack bytes of the descriptor list (what clients send for CUDA
    buffers so the daemon can reuse its decoding); bytes that are not such a list are refused."""
    hello(raw)
    model, encoded = mlp_payload(seed=5)
    graph = register_raw(raw, encoded)
    x = torch.randn(2, 4)
    desc = [{"kind": "cpu", "dtype": "float32", "shape": [2, 4], "frame": 0}]
    packed = msgpack.packb(desc, use_bin_type=True)
    for _ in range(2):  # cpu inputs are never remembered: each request decodes its own frame
        envelope, frames = raw.request("submit", {"device": "cpu", "graph": graph, "inputs": packed}, x.numpy().tobytes())
        out = envelope["body"]["outputs"][0]
        result = torch.frombuffer(bytearray(frames[out["frame"]]), dtype=torch.float32).view(out["shape"])
        with torch.no_grad():
            torch.testing.assert_close(result, model(x))
        assert envelope["body"]["execution"]["daemon_us"] > 0
        x = torch.randn(2, 4)
    for bad, words in ((b"\xc1", "msgpack"), (msgpack.packb({"a": 1}), "must encode a list")):
        _, code, message = error_of(raw.request("submit", {"device": "cpu", "graph": graph, "inputs": bad}))
        assert code == "bad_request" and words in message, message
    assert hello(raw) > 0  # still serving
