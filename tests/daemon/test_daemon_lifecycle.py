"""The daemon's lifecycle: graceful SIGTERM, a second daemon on a served endpoint, and clients
facing no daemon at all. (SIGHUP reloads, sd_notify, metrics and stops with requests in flight:
tests/ops/test_ops_*.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import zmq

from cgtree.client import Client, DaemonTimeout, DaemonUnavailable


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def test_a_second_daemon_on_a_served_endpoint_refuses_to_start(daemon_factory):
    daemon = daemon_factory()
    second = subprocess.run(
        [sys.executable, "-m", "cgtree.daemon.main", "--config", daemon.config_path, "--endpoint", daemon.endpoint, "--devices", "cpu"],
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 78
    assert "another cgtreed already serves" in second.stderr
    assert daemon.alive() and os.path.exists(daemon.socket_path)
    with Client(daemon.endpoint, timeout_s=10) as client:
        assert client.ping()["pong"] is True


def test_a_client_without_a_daemon_fails_at_once_with_a_clear_error():
    endpoint = "ipc://" + os.path.join(tempfile.mkdtemp(prefix="cgt-"), "absent.sock")
    started = time.monotonic()
    with Client(endpoint, timeout_s=30) as client:
        with pytest.raises(DaemonUnavailable, match="does not exist"):
            client.submit(tiny_mlp(), [torch.randn(2, 8)])
    assert time.monotonic() - started < 5.0


def test_a_silent_daemon_times_out_with_a_clear_error_and_never_hangs():
    workdir = tempfile.mkdtemp(prefix="cgt-")
    endpoint = "ipc://" + os.path.join(workdir, "silent.sock")
    context = zmq.Context.instance()
    silent = context.socket(zmq.ROUTER)  # accepts connections, never answers
    silent.bind(endpoint)
    try:
        client = Client(endpoint, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(DaemonTimeout, match="did not answer 'ping' within 0.5 s"):
            client.ping()
        with pytest.raises(DaemonTimeout):
            client.status()
        assert time.monotonic() - started < 3.0
        client.close(timeout_s=0.2)
    finally:
        silent.close(0)


def test_a_bad_config_file_stops_the_daemon_at_start_with_exit_78(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nmax_message_bytes = 'big'\n")
    result = subprocess.run([sys.executable, "-m", "cgtree.daemon.main", "--config", str(config), "--devices", "cpu"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "daemon.max_message_bytes" in result.stderr


def test_sigterm_exits_0_removes_the_socket_and_a_client_survives_the_restart(daemon_factory, daemon_tools):
    daemon = daemon_factory()
    model = tiny_mlp()
    with Client(daemon.endpoint, timeout_s=30) as client:
        for _ in range(2):
            client.submit(model, [torch.randn(2, 8)])
        first_daemon = client.daemon_pid
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout_s=15) == 0
        assert time.monotonic() - started < 10.0  # within shutdown_timeout_s
        assert not os.path.exists(daemon.socket_path)
        log = daemon.log()
        assert "stopped cleanly" in log and "the daemon is stopping" in log
        with pytest.raises(DaemonUnavailable, match="does not exist"):
            client.ping()

        restarted = daemon_tools.DaemonProcess(daemon.workdir, Path(daemon.config_path).read_text()).start()
        try:
            x = torch.randn(2, 8)
            (out,) = client.submit(model, [x])  # no_session -> hello -> register -> submit
            torch.testing.assert_close(out, model(x))
            assert client.daemon_pid != first_daemon
            assert client.last_execution["mode"] == "warmup"  # a new daemon starts cold
        finally:
            client.close()
            restarted.kill()
