"""sd_notify: datagrams reach a real AF_UNIX socket; nothing happens without NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid

import pytest

from cgtree.daemon import notify


@pytest.fixture
def notify_socket(monkeypatch):
    """A bound datagram socket standing in for systemd's /run/systemd/notify."""
    # sun_path holds 108 bytes; pytest's tmp_path can be longer, so use a short directory.
    directory = tempfile.mkdtemp(prefix="cgtn-")
    path = os.path.join(directory, "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield receiver
    receiver.close()
    os.unlink(path)
    os.rmdir(directory)


def received(receiver: socket.socket) -> str:
    return receiver.recv(4096).decode("utf-8")


def test_ready_sends_ready_1(notify_socket):
    assert notify.ready() is True
    assert received(notify_socket) == "READY=1"


def test_ready_with_status_sends_both_in_one_datagram(notify_socket):
    assert notify.ready("serving 2 devices")
    assert received(notify_socket) == "READY=1\nSTATUS=serving 2 devices"


def test_stopping_watchdog_and_status_send_their_assignments(notify_socket):
    assert notify.stopping() and notify.watchdog() and notify.status("3 sessions")
    assert [received(notify_socket) for _ in range(3)] == ["STOPPING=1", "WATCHDOG=1", "STATUS=3 sessions"]


def test_status_text_with_newlines_stays_one_assignment(notify_socket):
    notify.status("line one\nline two")
    assert received(notify_socket) == "STATUS=line one line two"


def test_reloading_carries_the_monotonic_clock_in_microseconds(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(notify_socket).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_address_starting_with_at_is_reached(monkeypatch):
    name = f"cgtree-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert received(receiver) == "READY=1"


def test_everything_is_a_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert not any(f() for f in (notify.ready, notify.stopping, notify.watchdog, notify.reloading))
    assert notify.status("x") is False


def test_unsupported_address_is_ignored(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_send_failure_returns_false_and_logs_at_debug(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="cgtree.daemon.notify"):
        assert notify.watchdog() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "nobody-listens.sock" in caplog.records[0].getMessage()


def test_watchdog_interval_is_read_from_watchdog_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval_s() == 30.0


def test_watchdog_interval_applies_when_watchdog_pid_is_this_process(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval_s() == 1.5


def test_watchdog_interval_is_none_when_watchdog_pid_names_another_process(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval_s() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "thirty", "1.5"])
def test_watchdog_interval_is_none_when_unset_or_invalid(monkeypatch, usec):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert notify.watchdog_interval_s() is None


def test_watchdog_interval_is_none_when_watchdog_pid_is_garbage(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "self")
    assert notify.watchdog_interval_s() is None
