"""Pure pieces of the daemon and client, without processes or sockets."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
import torch

from cgtree.client.errors import ClientError, DaemonError
from cgtree.client.registration import _batches
from cgtree.daemon import runtime_dir
from cgtree.daemon.protocol import ProtocolError, decode_request, wire_safe
from cgtree.daemon.sessions import ClientProcess, SessionInUse, SessionRegistry, session_verdict
from cgtree.daemon.tensors import (
    IpcImportCache,
    OUTPUT_ALIGNMENT,
    layout_outputs,
    parse_geometry,
    parse_ipc,
    tensor_from_cpu_desc,
)


# ---------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "state, alive, idle, parked, named, expected",
    [
        ("live", True, 10_000.0, 0.0, False, None),  # alive and idle: kept
        ("live", False, 0.0, 0.0, False, "close"),
        ("live", False, 0.0, 0.0, True, "park"),
        ("live", None, 10.0, 0.0, False, None),  # liveness unknown, not idle long enough
        ("live", None, 301.0, 0.0, False, "close"),
        ("live", None, 301.0, 0.0, True, "park"),
        ("parked", None, 0.0, 59.0, True, None),
        ("parked", None, 0.0, 60.0, True, "close"),
    ],
)
def test_session_verdict(state, alive, idle, parked, named, expected):
    assert session_verdict(state=state, client_alive=alive, idle_s=idle, timeout_s=300.0,
                           parked_s=parked, linger_s=60.0, named=named) == expected


def make_registry(clock):
    released = []
    registry = SessionRegistry(release_graph=lambda device, entry: released.append((device, entry)), clock=clock, linger_s=60.0)
    return registry, released


def test_registry_parks_a_dead_named_session_and_adopts_it_for_the_same_name(monkeypatch):
    now = [0.0]
    registry, _ = make_registry(lambda: now[0])
    alive = {1: True, 2: True}
    monkeypatch.setattr(ClientProcess, "alive", lambda self: alive.get(self.pid))
    first, adopted = registry.open(b"a", ClientProcess(1, 1.0), "job")
    assert not adopted
    with pytest.raises(SessionInUse):
        registry.open(b"b", ClientProcess(2, 2.0), "job")
    alive[1] = False
    registry.reap(timeout_s=300.0)
    assert first.state == "parked" and registry.get(b"a") is None
    second, adopted = registry.open(b"b", ClientProcess(2, 2.0), "job")
    assert adopted and second is first and second.state == "live"
    assert registry.get(b"b") is first


def test_registry_closes_a_parked_session_after_the_linger_and_releases_its_graphs(monkeypatch):
    now = [0.0]
    registry, released = make_registry(lambda: now[0])
    monkeypatch.setattr(ClientProcess, "alive", lambda self: False)
    session, _ = registry.open(b"a", ClientProcess(1, 1.0), "job")
    session.graphs[("cpu", "g" * 64)] = "entry"
    registry.reap(timeout_s=300.0)
    assert session.state == "parked"
    now[0] = 61.0
    registry.reap(timeout_s=300.0)
    assert session.state == "closed" and len(registry) == 0
    assert released == [("cpu", "entry")]


def test_registry_same_client_saying_hello_again_keeps_its_session(monkeypatch):
    registry, _ = make_registry(lambda: 0.0)
    monkeypatch.setattr(ClientProcess, "alive", lambda self: True)
    first, _ = registry.open(b"a", ClientProcess(1, 1.0), None)
    again, adopted = registry.open(b"a", ClientProcess(1, 1.0), None)
    assert again is first and not adopted


def test_client_process_lookup_uses_the_start_time():
    me = ClientProcess.lookup(os.getpid())
    assert me.alive() is True
    assert ClientProcess(os.getpid(), (me.create_time or 0) - 100.0).alive() is False  # a reused pid
    with pytest.raises(ProcessLookupError):
        ClientProcess.lookup(2**22 + 12345)


# ------------------------------------------------------------------------------ runtime dir


def test_runtime_dir_is_created_0700_and_looser_or_foreign_ones_are_refused(tmp_path):
    path = str(tmp_path / "cgtree")
    runtime_dir.ensure_runtime_dir(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    runtime_dir.ensure_runtime_dir(path)  # existing and safe: fine
    os.chmod(path, 0o755)
    with pytest.raises(runtime_dir.RuntimeDirError, match="chmod 700"):
        runtime_dir.ensure_runtime_dir(path)
    os.chmod(path, 0o700)
    with pytest.raises(runtime_dir.RuntimeDirError, match="not by this user"):
        runtime_dir.check_runtime_dir(path, uid=os.getuid() + 1)
    link = str(tmp_path / "link")
    os.symlink(path, link)
    with pytest.raises(runtime_dir.RuntimeDirError, match="symbolic link"):
        runtime_dir.ensure_runtime_dir(link)


def test_default_endpoint_follows_xdg_runtime_dir():
    assert runtime_dir.default_endpoint({"XDG_RUNTIME_DIR": "/run/user/7"}, uid=7) == "ipc:///run/user/7/cgtree/cgtreed.sock"
    assert runtime_dir.default_endpoint({}, uid=7) == "ipc:///tmp/cgtree-7/cgtreed.sock"
    assert runtime_dir.ipc_path("ipc:///a/b") == "/a/b"
    assert runtime_dir.ipc_path("tcp://127.0.0.1:5") is None


# --------------------------------------------------------------------------------- protocol


def test_decode_request_checks_every_envelope_field():
    good = decode_request(msgpack.packb({"v": 1, "id": 3, "op": "ping", "body": {}}), [])
    assert (good.request_id, good.op, good.body) == (3, "ping", {})
    with pytest.raises(ProtocolError) as info:
        decode_request(msgpack.packb({"v": 1, "id": True, "op": "ping"}), [])
    assert info.value.code == "bad_request"


def test_wire_safe_turns_status_values_into_plain_data():
    import enum

    class Mode(enum.Enum):
        A = "a"

    assert wire_safe({1: (Mode.A, {2, 3}), "x": object}) in ({"1": ["a", [2, 3]], "x": str(object)},
                                                            {"1": ["a", [3, 2]], "x": str(object)})


# ---------------------------------------------------------------------------------- tensors


def test_geometry_validation_names_the_problem():
    with pytest.raises(ProtocolError, match="input 3: stride has 1 entries for 2 dimensions"):
        parse_geometry({"dtype": "float32", "shape": [2, 2], "stride": [1]}, "input 3", need_stride=True)
    with pytest.raises(ProtocolError, match="at most 16"):
        parse_geometry({"dtype": "float32", "shape": [1] * 17}, "input 0", need_stride=False)
    with pytest.raises(ProtocolError, match="shape entries"):
        parse_geometry({"dtype": "float32", "shape": [True]}, "input 0", need_stride=False)


def test_cpu_frames_round_trip_every_allowed_dtype_zero_copy():
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64, torch.uint8):
        tensor = (torch.arange(6) % 2).to(dtype).reshape(2, 3)
        frame = bytearray(tensor.view(torch.uint8).numpy().tobytes()) if dtype != torch.bfloat16 else bytearray(
            tensor.view(torch.int16).numpy().tobytes())
        from cgtree.daemon.tensors import dtype_name

        out = tensor_from_cpu_desc({"dtype": dtype_name(dtype), "shape": [2, 3], "frame": 0}, [memoryview(frame)], "input 0")
        assert torch.equal(out, tensor)


def test_parse_ipc_refuses_wrong_handles_and_counter_files():
    good = {"device": 0, "handle": bytes(64), "size": 16, "offset": 0, "ref": b"/torch_12_34", "ref_offset": 3}
    assert parse_ipc(good, "input 0", [0])[:2] == (0, bytes(64))
    versioned = b"\x01c" + bytes(64)  # newer torch: [version][type 'c'][64-byte handle]
    assert parse_ipc({**good, "handle": versioned}, "input 0", [0])[1] == versioned
    for bad, message in [
        ({**good, "handle": bytes(10)}, "CUDA IPC handle"),
        ({**good, "handle": b"\x01e" + bytes(64)}, "CUDA IPC handle"),  # expandable segment: needs fds
        ({**good, "ref": b"/etc/passwd"}, "IPC counter file"),
        ({**good, "ref_offset": 10_000}, "ref_offset"),
        ({**good, "device": 3}, "cuda:3 is not a device this daemon serves"),
        ({**good, "size": -1}, "non-negative"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            parse_ipc(bad, "input 0", [0])


def test_ipc_import_cache_opens_each_export_once_and_evicts_least_recently_used():
    opened = []
    cache = IpcImportCache(capacity=2, opener=lambda args, label: opened.append(args) or object())
    a, b, c = [(0, bytes([i]) * 64, 8, 0, b"/torch_1_1", i, b"", False) for i in range(3)]
    first = cache.get(a, "x")
    assert cache.get(a, "x") is first and len(opened) == 1
    cache.get(b, "x")
    cache.get(c, "x")  # evicts a
    assert len(cache) == 2
    cache.get(a, "x")
    assert len(opened) == 4
    cache.close()
    assert len(cache) == 0


def test_output_layout_is_aligned():
    slots, total = layout_outputs([torch.empty(3), torch.empty(2, 2, dtype=torch.float64), torch.empty(0)])
    assert [s.byte_offset for s in slots] == [0, OUTPUT_ALIGNMENT, 2 * OUTPUT_ALIGNMENT]
    assert total == 2 * OUTPUT_ALIGNMENT


# ------------------------------------------------------------------------------------ client


class Blob:
    def __init__(self, n):
        self.data = bytes(n)


def test_weight_uploads_are_split_under_the_message_limit():
    blobs = {"a": Blob(60), "b": Blob(50), "c": Blob(30)}
    assert _batches(["a", "b", "c"], blobs, limit=100) == [["a"], ["b", "c"]]
    with pytest.raises(DaemonError, match="too_large"):
        _batches(["a"], blobs, limit=10)
    with pytest.raises(ClientError):
        _batches(["zzz"], blobs, limit=100)


def test_unreachable_ipc_endpoints_are_explained(tmp_path):
    sock = tmp_path / "s"
    assert "does not exist" in runtime_dir.ipc_endpoint_problem(f"ipc://{sock}")
    sock.write_text("")
    os.chmod(sock, 0o400)
    if os.access(sock, os.W_OK):  # root ignores modes
        pytest.skip("running as root")
    assert "permission denied" in runtime_dir.ipc_endpoint_problem(f"ipc://{sock}")
    assert runtime_dir.ipc_endpoint_problem("tcp://127.0.0.1:5555") is None


def test_cgtreectl_without_a_daemon_exits_3_with_a_clear_message(tmp_path, capsys):
    from cgtree.daemon import ctl

    assert ctl.main(["--endpoint", f"ipc://{tmp_path}/absent.sock", "status"]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_cgtreectl_tables_render_a_status_document():
    from cgtree.daemon.ctl import format_status

    text = format_status({
        "daemon": {"pid": 1, "version": "0.1.0", "protocol": 1, "uptime_s": 5, "endpoint": "ipc:///x"},
        "devices": [{"device": "cpu", "backend": "cpu-replay", "graphs": 1, "weights": {"count": 2, "bytes": 2048},
                     "sessions": 1, "pool_bytes": 100, "live_blocks": 0, "output_buffer_bytes": 0}],
        "sessions": [{"id": 3, "name": None, "pid": 42, "state": "live", "idle_s": 1.0, "submits": 5,
                      "devices": {"cpu": {"root_children": [0], "counters": {"warmups": 1, "recordings": 1, "replays": 3},
                                          "tree": {"nodes": [{"id": 0}]}, "pool_bytes": 100, "live_blocks": 0}}}],
    })
    assert "cpu-replay" in text and "2.0 KiB" in text
    header, row = [line for line in text.splitlines() if line.startswith(("SESSION", "3 "))]
    assert row.split()[:3] == ["3", "-", "42"]


# --------------------------------------------------------------------------- dispatch hooks


class _FakeFrame:
    def __init__(self, data: bytes) -> None:
        self.bytes = data
        self.buffer = memoryview(data)

    def __len__(self) -> int:
        return len(self.bytes)


def _dispatch(monkeypatch, exc: Exception, sticky: bool):
    import types

    from cgtree.config import Config
    from cgtree.daemon import commands, server

    boom = types.SimpleNamespace(NAME="boom", NEEDS_SESSION=False, __doc__="x",
                                 execute=lambda ctx, session, body, frames: (_ for _ in ()).throw(exc))
    monkeypatch.setitem(commands.COMMANDS, "boom", boom)
    monkeypatch.setattr(server, "cuda_context_is_broken", lambda names: sticky)
    daemon = server.Daemon(Config(), endpoint="ipc:///nonexistent/s", device_names=["cpu"])
    daemon.metrics = server._NoMetrics()
    request = msgpack.packb({"v": 1, "id": 77, "op": "boom", "body": {}})
    reply = daemon.handle_message([_FakeFrame(b"client"), _FakeFrame(request)])
    return daemon, msgpack.unpackb(reply[-1], raw=False)


def test_a_sticky_cuda_error_is_answered_then_ends_the_daemon(monkeypatch):
    from cgtree.daemon.server import EXIT_CUDA_ERROR

    daemon, reply = _dispatch(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"), sticky=True)
    assert reply["id"] == 77 and reply["error"]["code"] == "cuda_error"
    assert daemon.exit_code == EXIT_CUDA_ERROR


def test_a_transient_cuda_error_is_answered_and_the_daemon_goes_on(monkeypatch):
    daemon, reply = _dispatch(monkeypatch, RuntimeError("CUDA error: invalid argument"), sticky=False)
    assert reply["error"]["code"] == "cuda_error" and daemon.exit_code is None


def test_any_other_handler_exception_is_internal_with_the_request_id(monkeypatch):
    daemon, reply = _dispatch(monkeypatch, KeyError("oops"), sticky=False)
    assert reply["id"] == 77 and reply["error"]["code"] == "internal" and "77" in reply["error"]["message"]
    assert daemon.exit_code is None and daemon.counters["internal_errors"] == 1


def test_a_socket_file_nobody_listens_on_is_stale_at_once(tmp_path):
    import socket

    path = str(tmp_path / "s")
    assert not runtime_dir.has_listener(path)  # no file
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    assert runtime_dir.has_listener(path)
    listener.close()  # what SIGKILL leaves: the file, nobody behind it
    assert os.path.exists(path) and not runtime_dir.has_listener(path)


def test_a_restarted_daemon_replaces_a_stale_socket_file_without_waiting_for_a_ping(monkeypatch):
    """After a SIGKILL the socket file stays; the next daemon must not spend half a second
    pinging it (it used to: the probe waited 0.5 s for an answer that could not come)."""
    import socket
    import tempfile

    from cgtree.config import Config
    from cgtree.daemon import server
    from cgtree.daemon.transports import zmq as zmq_transport

    workdir = tempfile.mkdtemp(prefix="cgt-", dir="/tmp")
    path = os.path.join(workdir, "s")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    monkeypatch.setattr(zmq_transport, "_endpoint_answers", lambda *a, **k: pytest.fail("pinged a file nobody listens on"))
    daemon = server.Daemon(Config(), endpoint=f"ipc://{path}", device_names=["cpu"])
    try:
        daemon._bind()
        assert runtime_dir.has_listener(path)
    finally:
        daemon._close_socket()
        os.rmdir(workdir)
