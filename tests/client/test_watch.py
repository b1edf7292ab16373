"""cgtree.client.watch: the decision (what counts as a daemon gone, and what is no evidence) and
the observations it rests on (``/proc/<pid>/stat``, the socket file, the listener's pid)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from cgtree.client.watch import PF_EXITING, Bound, DaemonWatch, ProcessState, file_identity, gone_reason, listener_pid, read_process

ALIVE = ProcessState(True, "S", 0, 1000)
FILE = (1, 42, 10**18)


def test_a_daemon_is_gone_when_its_file_or_its_process_says_so():
    bound = Bound(FILE, pid=77, start_ticks=1000)
    assert gone_reason(bound, FILE, True, ALIVE) is None
    assert gone_reason(bound, FILE, True, ProcessState(True, "R", 0, 1000)) is None
    assert "socket file is gone" in gone_reason(bound, None, False, ALIVE)
    assert "another daemon" in gone_reason(bound, (1, 43, 10**18), True, ALIVE)
    assert "another daemon" in gone_reason(bound, (1, 42, 10**18 + 1), True, ALIVE)  # the inode number reused
    assert "is gone" in gone_reason(bound, FILE, True, ProcessState(False))
    assert "exited" in gone_reason(bound, FILE, True, ProcessState(True, "Z", 0, 1000))
    assert "exiting" in gone_reason(bound, FILE, True, ProcessState(True, "D", PF_EXITING, 1000))
    assert "another process" in gone_reason(bound, FILE, True, ProcessState(True, "S", 0, 2000))


def test_what_cannot_be_seen_is_no_evidence():
    # A listener in another pid namespace (no pid), an unreadable /proc, an unbound watch.
    assert gone_reason(Bound(FILE, pid=None), FILE, True, None) is None
    assert gone_reason(Bound(FILE, pid=77, start_ticks=1000), FILE, True, None) is None
    assert gone_reason(None, (9, 9, 9), True, ProcessState(False)) is None
    assert gone_reason(None, None, False, None) == "its socket file is gone"
    # Not an ipc endpoint: nothing to compare the file with.
    assert gone_reason(Bound(None, pid=None), None, True, None) is None


def test_proc_stat_tells_a_live_process_a_zombie_and_a_missing_pid():
    me = read_process(os.getpid())
    assert me.exists and me.state in "RS" and not me.flags & PF_EXITING and me.start_ticks > 0
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while read_process(pid).state != "Z":  # exited, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.waitpid(pid, 0)
    assert read_process(pid) == ProcessState(exists=False)


def test_the_socket_files_identity_and_its_listeners_pid(tmp_path):
    path = str(tmp_path / "s")
    assert file_identity(path) is None and listener_pid(path) is None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    first = file_identity(path)
    assert listener_pid(path) == os.getpid()
    watch = DaemonWatch(f"ipc://{path}")
    watch.bind()
    assert watch.bound == Bound(first, os.getpid(), read_process(os.getpid()).start_ticks)
    assert watch.gone(fresh=True) is None
    listener.close()
    os.unlink(path)
    time.sleep(0.05)  # a new daemon's file is made seconds later; timestamps may be a jiffy coarse
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a new daemon's file
    replacement.bind(path)
    try:
        assert file_identity(path) != first
        assert "another daemon" in watch.gone(fresh=True)
        replacement.close()
        os.unlink(path)
        assert "another daemon" in watch.gone(fresh=True)  # gone stays gone until bound again
        watch.unbind()
        assert watch.gone(fresh=True) == "its socket file is gone"
    finally:
        replacement.close()


def test_checks_are_rate_limited_unless_asked_fresh(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    watch = DaemonWatch(f"ipc://{path}")
    watch.bind()
    looks = []
    monkeypatch.setattr("cgtree.client.watch.file_identity", lambda p: looks.append(p) or watch.bound.identity)
    for _ in range(100):
        watch.gone()
    assert len(looks) == 1
    watch.gone(fresh=True)
    assert len(looks) == 2
    listener.close()


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "ipc://@abstract"])
def test_endpoints_without_a_file_are_never_reported_gone(endpoint):
    watch = DaemonWatch(endpoint)
    watch.bind()
    assert watch.gone(fresh=True) is None
