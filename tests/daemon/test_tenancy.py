"""Tenancy without processes of other users: the pure policy (``cgtree.daemon.tenancy``), where
the uid comes from (libzmq's ``Peer-Address`` on ipc://, ``SO_PEERCRED`` on lanes), and how the
session registry, the graph store, the lane handshake and ``status`` apply it. The same rules
against a real daemon with two real uids: ``test_tenants_uids.py``."""

from __future__ import annotations

import os
import socket
import types

import msgpack
import pytest
import torch
import zmq

from cgtree.client.lowering import encode, lower
from cgtree.daemon import tenancy
from cgtree.daemon.commands import CommandContext
from cgtree.daemon.commands import status as status_command
from cgtree.daemon.graphs import DeviceRuntime
from cgtree.daemon.lane import handshake_refusal
from cgtree.daemon.protocol import ProtocolError
from cgtree.daemon.sessions import ClientProcess, Forbidden, SessionInUse, SessionRegistry

ALICE, BOB, DAEMON = 1000, 1001, 999


# ------------------------------------------------------------------------------------ policy


def test_a_session_is_used_only_by_its_owner():
    assert tenancy.may_use(ALICE, ALICE)
    assert not tenancy.may_use(BOB, ALICE)
    assert not tenancy.may_use(tenancy.UNVERIFIED, ALICE)  # an unknown peer is nobody's uid
    assert not tenancy.may_use(ALICE, tenancy.UNVERIFIED)
    assert tenancy.may_use(tenancy.UNVERIFIED, tenancy.UNVERIFIED)  # no credentials: one tenant


@pytest.mark.parametrize("viewer, owner, allowed", [
    (ALICE, ALICE, True), (BOB, ALICE, False), (0, ALICE, True), (DAEMON, ALICE, True),
    (tenancy.UNVERIFIED, ALICE, False), (tenancy.UNVERIFIED, tenancy.UNVERIFIED, True), (0, tenancy.UNVERIFIED, True),
])
def test_sessions_are_inspected_by_their_owner_root_and_the_daemon_user(viewer, owner, allowed):
    assert tenancy.may_inspect(viewer, owner, DAEMON) is allowed
    assert tenancy.sees_everything(viewer, DAEMON) is (viewer in (0, DAEMON))


def test_shared_content_is_used_only_by_uids_that_sent_it():
    assert tenancy.may_use_content(ALICE, {ALICE, BOB})
    assert not tenancy.may_use_content(BOB, {ALICE})
    assert not tenancy.may_use_content(tenancy.UNVERIFIED, {ALICE})


@pytest.mark.parametrize("value, expected", [
    ("localhost:1000:100:4242", (1000, 100, 4242)),
    (":0:0:1", (0, 0, 1)),
    ("localhost", None), ("", None), (None, None), (b"localhost:1:2:3", None),
    ("localhost:1000:100:-1", None), ("localhost:x:1:2", None), ("localhost:1:2", None),
    ("localhost:１:2:3", None),  # non-ASCII digits are not numbers here
])
def test_peer_addresses_parse_only_as_address_uid_gid_pid(value, expected):
    assert tenancy.parse_peer_address(value) == expected


def test_libzmq_reports_the_kernels_uid_and_pid_of_an_ipc_peer(tmp_path):
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        endpoint = f"ipc://{tmp_path}/s"
        router.bind(endpoint)
        dealer.connect(endpoint)
        dealer.send(b"hi")
        assert router.poll(5000)
        identity, frame = router.recv_multipart(copy=False)
        assert tenancy.peer_uid_of_frame(frame) == os.getuid()
        assert tenancy.parse_peer_address(frame.get(tenancy.PEER_ADDRESS))[2] == os.getpid()
        assert tenancy.peer_uid_of_frame(b"bytes have no properties") is tenancy.UNVERIFIED
    finally:
        router.close(0)
        dealer.close(0)
        context.term()


def test_so_peercred_names_the_peer_process():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        assert tenancy.peer_credentials(left) == (os.getpid(), os.getuid())


# --------------------------------------------------------------------------------- sessions


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(ClientProcess, "alive", lambda self: self.pid != 99)  # pid 99 is dead
    return SessionRegistry(release_graph=lambda device, entry: None, clock=lambda: 0.0)


def test_session_names_are_per_user_and_a_parked_session_is_adopted_only_by_its_owner(registry):
    alices, _ = registry.open(b"a", ClientProcess(99, 1.0), "train", owner=ALICE)
    registry.reap(timeout_s=300.0)
    assert alices.state == "parked"
    bobs, adopted = registry.open(b"b", ClientProcess(2, 2.0), "train", owner=BOB)
    assert not adopted and bobs is not alices and bobs.owner == BOB
    assert alices.state == "parked"  # still waiting for Alice, warm
    with pytest.raises(SessionInUse):  # Bob's own name is taken by his live client
        registry.open(b"c", ClientProcess(3, 3.0), "train", owner=BOB)
    again, adopted = registry.open(b"d", ClientProcess(4, 4.0), "train", owner=ALICE)
    assert adopted and again is alices and again.owner == ALICE


def test_a_routing_id_of_another_users_session_is_refused_and_the_session_kept(registry):
    alices, _ = registry.open(b"a", ClientProcess(1, 1.0), None, owner=ALICE)
    with pytest.raises(Forbidden):
        registry.open(b"a", ClientProcess(2, 2.0), None, owner=BOB)
    assert registry.get(b"a") is alices and alices.state == "live"


def test_a_lane_attaches_only_for_the_sessions_user_and_client():
    session = types.SimpleNamespace(owner=ALICE, client=types.SimpleNamespace(pid=10, create_time=1.0))
    assert handshake_refusal(10, ALICE, session) is None
    assert "uid 1001" in handshake_refusal(10, BOB, session)
    assert "pid 11" in handshake_refusal(11, ALICE, session)
    assert handshake_refusal(None, None, session) is None  # a platform without SO_PEERCRED: the token decides
    unseen = types.SimpleNamespace(owner=ALICE, client=types.SimpleNamespace(pid=10, create_time=None))
    assert handshake_refusal(11, ALICE, unseen) is None  # the client's pid is not visible (another namespace)


# ------------------------------------------------------------------------------ graph store


def _runtime() -> DeviceRuntime:
    return DeviceRuntime("cpu", allowed_namespaces=lambda: (), compile_mode=lambda: "eager")


def _encoded(seed: int = 0, out_features: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, out_features), torch.nn.ReLU()).eval()
    return encode(lower(model, [torch.randn(2, 4)]))


def _blobs(encoded, hashes=None):
    return {h: memoryview(blob.data) for h, blob in encoded.weights.items() if hashes is None or h in hashes}


def test_another_user_gets_a_known_graph_only_by_sending_its_payload_and_weights():
    graphs = _runtime().graphs
    encoded = _encoded()
    payload = memoryview(encoded.graph_bytes)
    first = graphs.register(payload, encoded.graph_id, _blobs(encoded), {}, uid=ALICE)
    assert first.entry is not None and first.new
    tensors = {h: w.tensor for h, w in graphs.weights.items()}

    # Bob knows the id: not enough. The answers are those for a graph the device lacks.
    by_id = graphs.register(None, encoded.graph_id, {}, {}, uid=BOB)
    assert by_id.entry is None and by_id.need_payload
    assert graphs.register(None, "ab" * 32, {}, {}, uid=BOB).need_payload
    with_payload = graphs.register(payload, encoded.graph_id, {}, {}, uid=BOB)
    assert with_payload.entry is None and sorted(with_payload.missing_weights) == sorted(encoded.weights)
    # Wrong bytes under the right names prove nothing.
    forged = {h: memoryview(bytes(len(blob.data))) for h, blob in encoded.weights.items()}
    with pytest.raises(ProtocolError) as refused:
        graphs.register(payload, encoded.graph_id, forged, {}, uid=BOB)
    assert refused.value.code == "payload_rejected" and "does not match its hash" in refused.value.message
    # The same bytes do: the device's one copy is shared, nothing is stored twice.
    proved = graphs.register(payload, encoded.graph_id, _blobs(encoded), {}, uid=BOB)
    assert proved.entry is first.entry and not proved.new and proved.weights_added == 0
    assert {h: w.tensor for h, w in graphs.weights.items()} == tensors
    assert graphs.register(None, encoded.graph_id, {}, {}, uid=BOB).entry is first.entry  # now by id alone
    assert graphs.register(None, encoded.graph_id, {}, {}, uid=ALICE).entry is first.entry


def test_a_new_graph_over_another_users_weights_needs_those_weights_sent():
    graphs = _runtime().graphs
    torch.manual_seed(1)
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    alices = encode(lower(torch.nn.Sequential(linear, torch.nn.ReLU()).eval(), [x]))
    bobs = encode(lower(torch.nn.Sequential(linear, torch.nn.Tanh()).eval(), [x]))
    assert bobs.graph_id != alices.graph_id and set(bobs.weights) == set(alices.weights)
    graphs.register(memoryview(alices.graph_bytes), None, _blobs(alices), {}, uid=ALICE)
    # Bob's graph names Alice's weights by hash (hashes leak more easily than bytes): the daemon
    # asks for them as if it lacked them, and keeps its one copy once they are proven.
    outcome = graphs.register(memoryview(bobs.graph_bytes), None, {}, {}, uid=BOB)
    assert sorted(outcome.missing_weights) == sorted(alices.weights)
    done = graphs.register(memoryview(bobs.graph_bytes), None, _blobs(bobs), {}, uid=BOB)
    assert done.entry is not None and done.weights_added == 0
    assert done.entry.weights[0] is graphs.graphs[alices.graph_id].weights[0]
    # Alice, who sent them, reuses them for the same new graph without sending them again.
    assert graphs.register(memoryview(bobs.graph_bytes), None, {}, {}, uid=ALICE).entry is done.entry is not None


def test_a_weight_uploaded_in_parts_counts_once_the_graph_is_complete():
    graphs = _runtime().graphs
    encoded = _encoded(seed=2)
    payload = memoryview(encoded.graph_bytes)
    graphs.register(payload, None, _blobs(encoded), {}, uid=ALICE)
    staged: dict = {}
    first, *rest = sorted(encoded.weights)
    partial = graphs.register(payload, None, _blobs(encoded, {first}), staged, uid=BOB)
    assert partial.entry is None and sorted(partial.missing_weights) == sorted(rest)
    complete = graphs.register(payload, None, _blobs(encoded, set(rest)), staged, uid=BOB)
    assert complete.entry is not None and not staged


# ----------------------------------------------------------------------------------- status


def _status_as(viewer, registry, runtime, daemon_uid=DAEMON, compile_jobs=()) -> dict:
    info = {"pid": 1, "compile": {"mode": "auto", "jobs": [{"graph": graph_id, "state": "queued"} for graph_id in compile_jobs]}}
    ctx = CommandContext(identity=b"viewer", request_id=1, config=None, devices={"cpu": runtime}, sessions=registry,
                         metrics=None, daemon_info=lambda: info, next_buffer_id=lambda: 1, peer_uid=viewer,
                         daemon_uid=daemon_uid)
    return msgpack.unpackb(msgpack.packb(status_command.execute(ctx, None, {}, []).body), raw=False)


def test_status_shows_other_users_sessions_and_graph_ids_only_to_root_and_the_daemon_user(registry):
    runtime = _runtime()
    encoded = {ALICE: _encoded(seed=3), BOB: _encoded(seed=4, out_features=5)}
    sessions = {}
    for uid, payload in encoded.items():
        session, _ = registry.open(str(uid).encode(), ClientProcess(uid, 1.0), "job", owner=uid)
        entry = runtime.graphs.register(memoryview(payload.graph_bytes), None, _blobs(payload), {}, uid=uid).entry
        session.graphs[("cpu", entry.graph_id)] = runtime.graphs.acquire(entry)
        sessions[uid] = session

    def seen(document):
        ids = {s["id"] for s in document["sessions"]}
        graphs = {row["graph"] for row in document["devices"][0]["registered"]}
        return ids, graphs

    compiling = [encoded[ALICE].graph_id, encoded[BOB].graph_id]
    as_bob = _status_as(BOB, registry, runtime, compile_jobs=compiling)
    assert seen(as_bob) == ({sessions[BOB].session_id}, {encoded[BOB].graph_id})
    assert [job["graph"] for job in as_bob["daemon"]["compile"]["jobs"]] == [encoded[BOB].graph_id]
    assert as_bob["sessions"][0]["uid"] == BOB
    assert as_bob["daemon"]["viewer"] == {"uid": BOB, "sees": "own"}
    assert as_bob["devices"][0]["graphs"] == 2  # totals count everyone; ids stay hidden
    everything = ({s.session_id for s in sessions.values()}, {e.graph_id for e in encoded.values()})
    for viewer in (0, DAEMON):
        document = _status_as(viewer, registry, runtime, compile_jobs=compiling)
        assert seen(document) == everything and document["daemon"]["viewer"]["sees"] == "all"
        assert [job["graph"] for job in document["daemon"]["compile"]["jobs"]] == compiling
    assert seen(_status_as(tenancy.UNVERIFIED, registry, runtime)) == (set(), set())
