"""Shared pytest fixtures.

Daemon fixtures (for tests/daemon and tests/gpu): start a real ``cgtreed`` process
(``python -m cgtree.daemon.main --config <tmp> --endpoint ipc://<tmp>/s --devices cpu``),
wait until it answers ``ping``, and kill it at teardown, also when the test failed: no
process outlives its test module. ``run_client`` runs a small client script in a real
subprocess with a timeout (killed when it overruns).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
DAEMON_START_TIMEOUT_S = 60.0

DEFAULT_TEST_CONFIG = """
[daemon]
max_message_bytes = 4194304
reap_interval_s = 0.2
session_timeout_s = 300.0
shutdown_timeout_s = 10.0
log_level = "INFO"
"""


def _short_tmpdir() -> str:
    # ipc:// paths must fit in sockaddr_un (108 bytes): pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="cgt-", dir="/tmp")


def ping_endpoint(endpoint: str, timeout_s: float = 1.0) -> Optional[dict]:
    """One raw ping (no client library): the reply body, or None when nothing answered."""
    import msgpack
    import zmq

    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "id": 1, "op": "ping", "body": {}}))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = msgpack.unpackb(sock.recv(), raw=False)
        return reply.get("body")
    finally:
        sock.close(0)


class DaemonProcess:
    """A cgtreed subprocess: its endpoint, config file, log file and process handle."""

    def __init__(self, workdir: str, config_text: str = DEFAULT_TEST_CONFIG, devices: str = "cpu",
                 extra_env: Optional[dict] = None) -> None:
        self.workdir = workdir
        self.socket_path = os.path.join(workdir, "s")
        self.endpoint = "ipc://" + self.socket_path
        self.config_path = os.path.join(workdir, "config.toml")
        self.log_path = os.path.join(workdir, "cgtreed.log")
        self.devices = devices
        Path(self.config_path).write_text(textwrap.dedent(config_text))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cgtree.daemon.main", "--config", self.config_path,
             "--endpoint", self.endpoint, "--devices", self.devices],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
        )
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgtreed exited with {self.proc.returncode} at start:\n{self.log()}")
            if os.path.exists(self.socket_path) and ping_endpoint(self.endpoint, 0.5) is not None:
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"cgtreed did not answer ping within {DAEMON_START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after a grace period: never leave a daemon behind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def daemon_factory() -> Iterator:
    """Start daemons with custom config text; all are killed at teardown."""
    started: list[DaemonProcess] = []

    def start(config_text: str = DEFAULT_TEST_CONFIG, devices: str = "cpu", extra_env: Optional[dict] = None) -> DaemonProcess:
        daemon = DaemonProcess(_short_tmpdir(), config_text, devices, extra_env)
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in started:
            daemon.kill()


@pytest.fixture(scope="module")
def cgtreed() -> Iterator[DaemonProcess]:
    """One CPU daemon shared by a test module (started once: torch import costs ~2 s)."""
    daemon = DaemonProcess(_short_tmpdir())
    try:
        yield daemon.start()
    finally:
        daemon.kill()


class ClientScripts:
    """Run client scripts in real subprocesses (each its own pid and session)."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.running: list[subprocess.Popen] = []
        self._count = 0

    def _write(self, source: str) -> str:
        self._count += 1
        path = os.path.join(self.workdir, f"client_{self._count}.py")
        Path(path).write_text(textwrap.dedent(source))
        return path

    def run(self, source: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run to completion; returns the CompletedProcess (stdout/stderr as text)."""
        proc = self.start(source, *args)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"client script timed out after {timeout_s} s:\n{stdout}\n{stderr}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def start(self, source: str, *args: str) -> subprocess.Popen:
        path = self._write(source)
        proc = subprocess.Popen([sys.executable, path, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.workdir)
        self.running.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def client_scripts() -> Iterator[ClientScripts]:
    scripts = ClientScripts(_short_tmpdir())
    try:
        yield scripts
    finally:
        scripts.kill_all()


GPU_TEST_CONFIG = """
[daemon]
max_message_bytes = 67108864
reap_interval_s = 0.2
shutdown_timeout_s = 20.0
"""
# Expandable segments cannot be shared through legacy CUDA IPC handles (NOTES.md section 3).
GPU_TEST_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}


@pytest.fixture(scope="module")
def cgtreed_gpu() -> Iterator[DaemonProcess]:
    """One daemon on cuda:0 shared by a GPU test module (skipped without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    daemon = DaemonProcess(_short_tmpdir(), GPU_TEST_CONFIG, devices="cuda:0", extra_env=GPU_TEST_ENV)
    try:
        yield daemon.start()
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def wide_spin_daemon() -> Iterator[DaemonProcess]:
    """A CUDA daemon whose spin window (20 ms) outlasts any gap between a tight loop's steps,
    even with the rest of the GPU suite sharing the GPU and the cores (pytest-xdist): with the
    default 500 us, a loop step stretched by another process's kernels finds the daemon asleep
    and goes over the lane instead, which is correct but not what the doorbell test counts
    (31 of 100 steps rung, once, in a parallel run on the H200, session 9)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    daemon = DaemonProcess(_short_tmpdir(), GPU_TEST_CONFIG + "spin_us = 20000\n",
                           devices="cuda:0", extra_env=GPU_TEST_ENV)
    try:
        yield daemon.start()
    finally:
        daemon.kill()


def in_thread(fn):
    """Run ``fn`` in a thread (a call that waits on the daemon); ``.join(timeout_s)`` returns its
    result or raises its exception, and fails when it is still running."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    class Joined:
        @staticmethod
        def join(timeout_s: float = 60.0):
            thread.join(timeout_s)
            assert not thread.is_alive(), "the call did not return"
            if "error" in outcome:
                raise outcome["error"]
            return outcome["value"]

    return Joined


def processes_with(*fragments: str) -> set[int]:
    """Pids of processes whose command line holds every fragment (benchmarks' leftovers)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if all(fragment in cmdline for fragment in fragments):
            found.add(proc.info["pid"])
    return found


@pytest.fixture(scope="session")
def daemon_tools():
    """The helpers above, for tests that need them directly (``import conftest`` is ambiguous
    when several test folders have a conftest.py). Session-scoped (it holds no state), so
    module-scoped fixtures can start their own daemons with it."""
    import types

    return types.SimpleNamespace(DaemonProcess=DaemonProcess, DEFAULT_TEST_CONFIG=DEFAULT_TEST_CONFIG,
                                 GPU_TEST_CONFIG=GPU_TEST_CONFIG, GPU_TEST_ENV=GPU_TEST_ENV,
                                 short_tmpdir=_short_tmpdir, ping_endpoint=ping_endpoint, in_thread=in_thread,
                                 processes_with=processes_with)


# Core, seed and compile tests run on the CPU replay backend always, and on cuda:0 too when a
# GPU is present (those cases carry the ``gpu`` marker, so CI deselects them).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda:0",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
