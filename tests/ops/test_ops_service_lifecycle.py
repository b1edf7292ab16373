"""A real cgtreed under a stand-in for systemd: the test binds the ``NOTIFY_SOCKET`` and sets a
small ``WATCHDOG_USEC``, then checks what the daemon reports (READY=1 with STATUS, WATCHDOG=1,
RELOADING=1 + READY=1 around SIGHUP and the reload command, STOPPING=1) and that reloads change
policy and log level for what comes next while a bad file changes nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from cgtree.client import Client

WATCHDOG_S = 0.4


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket; each message kept with whether the
    daemon's socket file existed when it arrived."""

    def __init__(self, socket_path_to_watch: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="cgtn-")
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.watched = socket_path_to_watch
        self.messages: list[tuple[float, str, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(), os.path.exists(self.watched)))

    def texts(self) -> list[str]:
        return [text for _, text, _ in self.messages]

    def wait_for(self, predicate, timeout_s: float = 10.0, since: int = 0) -> str:
        """The first message from index ``since`` on that ``predicate`` accepts (waiting for it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, text, _ in self.messages[since:]:
                if predicate(text):
                    return text
            time.sleep(0.02)
        raise AssertionError(f"no matching sd_notify message within {timeout_s} s; got {self.texts()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.directory)


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def wait_for_log(daemon, pattern: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, daemon.log()):
            return True
        time.sleep(0.05)
    return False


def test_notify_watchdog_reload_and_stop_as_systemd_sees_them(daemon_tools):
    workdir = daemon_tools.short_tmpdir()
    listener = NotifyListener(os.path.join(workdir, "s"))
    config_text = daemon_tools.DEFAULT_TEST_CONFIG
    daemon = daemon_tools.DaemonProcess(workdir, config_text, extra_env={
        "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))})
    try:
        daemon.start()
        # READY=1 once the socket is bound (and every device is up), with a STATUS line.
        ready = listener.wait_for(lambda t: t.startswith("READY=1"))
        assert re.fullmatch(r"READY=1\nSTATUS=serving ipc://\S+/s on cpu: 0 sessions, 0 graphs", ready)
        assert all(exists for _, text, exists in listener.messages if text.startswith("READY=1"))
        # The loop keeps systemd's watchdog fed at half the interval.
        time.sleep(4 * WATCHDOG_S)
        pings = [at for at, text, _ in listener.messages if text == "WATCHDOG=1"]
        assert len(pings) >= 4
        assert max(b - a for a, b in zip(pings, pings[1:])) < WATCHDOG_S

        model = tiny_mlp()
        with Client(daemon.endpoint, timeout_s=30) as before:
            before.submit(model, [torch.randn(2, 8)])
            assert before.last_execution["mode"] == "warmup"
            listener.wait_for(lambda t: t == f"STATUS=serving {daemon.endpoint} on cpu: 1 session, 1 graph")

            # A bad file: RELOADING=1, then READY=1 saying it was rejected; the old policy stays.
            good = Path(daemon.config_path).read_text()
            Path(daemon.config_path).write_text(good + '\n[policy]\nskip_warmup = "yes"\n')
            count = len(listener.messages)
            daemon.signal(signal.SIGHUP)
            rejected = listener.wait_for(lambda t: t.startswith("READY=1\nSTATUS=reload rejected"), since=count)
            assert "policy.skip_warmup" in rejected
            assert any(t.startswith("RELOADING=1\nMONOTONIC_USEC=") for t in listener.texts()[count:])
            with Client(daemon.endpoint, timeout_s=30) as other:
                other.submit(model, [torch.randn(2, 8)])
                assert other.last_execution["mode"] == "warmup"  # still the running policy
            before.submit(model, [torch.randn(2, 8)])  # and the running session goes on
            assert before.last_execution["mode"] == "recorded"

            # A good file: new policy for new recordings, and the log level changes at once.
            Path(daemon.config_path).write_text(good.replace('log_level = "INFO"', 'log_level = "DEBUG"')
                                                + "\n[policy]\nskip_warmup = true\n")
            count = len(listener.messages)
            daemon.signal(signal.SIGHUP)
            assert wait_for_log(daemon, r"SIGHUP: configuration reloaded .*changed: policy\.skip_warmup, daemon\.log_level")
            # The daemon's datagrams reach the listener's thread a moment after it logs: wait for them.
            listener.wait_for(lambda t: t.startswith("RELOADING=1"), since=count)
            listener.wait_for(lambda t: t.startswith("READY=1\nSTATUS=serving"), since=count)
            assert any(t.startswith("RELOADING=1") for t in listener.texts()[count:])
            before.submit(model, [torch.randn(5, 8)])  # a graph newly registered in the running session
            assert before.last_execution["mode"] == "recorded"
            with Client(daemon.endpoint, timeout_s=30) as after:
                after.submit(model, [torch.randn(2, 8)])  # a new session's tree: records on its first submit
                assert after.last_execution["mode"] == "recorded"
                assert after.status()["daemon"]["policy"]["skip_warmup"] is True
            before.submit(model, [torch.randn(2, 8)])  # recorded before the reload: replays as before
            assert before.last_execution["mode"] == "replayed"
            assert wait_for_log(daemon, r"DEBUG cgtree\.daemon\.server: request \d+: submit answered in [\d.]+ ms \[req=\d+ session=s\d+\]")

            # The reload command does the same without signal permission (cgtreectl reload).
            count = len(listener.messages)
            result = subprocess.run([sys.executable, "-m", "cgtree.daemon.ctl", "--endpoint", daemon.endpoint, "reload"],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            assert "nothing changed" in result.stdout
            listener.wait_for(lambda t: t.startswith("RELOADING=1"), since=count)
            listener.wait_for(lambda t: t.startswith("READY=1"), since=count)

        # SIGTERM: STOPPING=1, exit 0, no socket file left behind.
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout_s=15) == 0
        assert not os.path.exists(daemon.socket_path)
        stopping = listener.wait_for(lambda t: t.startswith("STOPPING=1"))
        assert stopping.startswith("STOPPING=1\nSTATUS=stopping")
    finally:
        daemon.kill()
        listener.close()

