"""Crash recovery on a CUDA daemon (issue 14), where the client waits on its doorbell page and
the daemon's CUDA context makes its exit slow: a client in a steady plan loop is served by the
next daemon well within its timeout, and ``benchmarks/chaos.py`` with 8 clients meets the
target (0 wrong results, every client served within 2 s of the new daemon's READY, default
client settings). Run on a GPU host: ``pytest -m gpu tests/gpu/test_recovery_gpu.py``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTICED_WITHIN_S = 20.0  # the client's timeout is 60 s


def test_a_doorbell_loop_on_a_daemon_that_died_is_served_by_the_next_one(daemon_tools):
    """The daemon is held with SIGSTOP (dead to its clients, sockets open: a SIGKILLed CUDA
    process can stay like that while its context is torn down) and a new daemon takes the
    endpoint; the client's next doorbell run must not wait out its 60 s timeout."""
    from cgtree.client import Client

    workdir = daemon_tools.short_tmpdir()
    daemon = daemon_tools.DaemonProcess(workdir, daemon_tools.GPU_TEST_CONFIG, devices="cuda:0",
                                        extra_env=daemon_tools.GPU_TEST_ENV).start()
    successor = None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)).eval().cuda()
    client = Client(daemon.endpoint, timeout_s=60)
    try:
        with torch.no_grad():
            x = torch.randn(16, 256, device="cuda:0")
            handle = client.register(model, [x])
            for _ in range(60):  # a steady loop: plan runs rung on the doorbell
                x.normal_()
                client.submit(handle, [x])
            assert client.connection.lane.attached is not None and client.connection.lane.attached.doorbell is not None
            assert client.last_execution.get("plan") is not None
            daemon.signal(signal.SIGSTOP)
            x.normal_()
            expected = model(x)
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(out=client.submit(handle, [x])), daemon=True)
            thread.start()
            time.sleep(0.3)
            successor = daemon_tools.DaemonProcess(workdir, Path(daemon.config_path).read_text(), devices="cuda:0",
                                                   extra_env=daemon_tools.GPU_TEST_ENV).start()
            thread.join(NOTICED_WITHIN_S)
            assert not thread.is_alive() and "out" in result, "the client waited on the dead daemon"
            (out,) = result["out"]
            torch.testing.assert_close(out, expected)
            assert client.daemon_pid == successor.proc.pid
    finally:
        client.close(timeout_s=1.0)
        daemon.signal(signal.SIGKILL)
        daemon.signal(signal.SIGCONT)
        daemon.wait(timeout_s=60)
        if successor is not None:
            successor.kill()


def test_chaos_eight_clients_sigkill_and_restart_meet_the_target(tmp_path):
    json_path = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "chaos.py"), "--device", "cuda", "--clients", "8",
         "--kill-after", "10", "--fail-on-target", "--json", str(json_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["ok"] and not report["missed"], (report.get("failed"), report.get("missed"))
