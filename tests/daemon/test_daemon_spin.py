"""The daemon's spin loop (``daemon.spin_us``, which only runs when a CUDA device is served):
exercised here on the CPU backend by telling an embedded daemon it serves CUDA. Requests over
the lane and over ZeroMQ must be picked up while it spins, and a stop must still end it."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import torch

from cgtree.client import Client
from cgtree.config import Config, DaemonConfig
from cgtree.daemon import server


def test_requests_are_served_while_the_daemon_spins(monkeypatch):
    workdir = tempfile.mkdtemp(prefix="cgt-")
    endpoint = "ipc://" + os.path.join(workdir, "s")
    daemon = server.Daemon(Config(daemon=DaemonConfig(spin_us=200_000)), endpoint=endpoint, device_names=["cpu"])
    found = []
    spin = daemon.waiting._poll_spinning

    def counting_spin() -> dict:
        ready = spin()
        found.append(bool(ready))
        return ready

    monkeypatch.setattr(daemon.waiting, "_poll_spinning", counting_spin)
    original_start = daemon._start_devices

    def start_devices() -> None:
        original_start()
        daemon._serves_cuda = True  # as if: the spin loop only runs for CUDA daemons

    monkeypatch.setattr(daemon, "_start_devices", start_devices)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=daemon.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(workdir, "s")) and time.monotonic() < deadline:
        time.sleep(0.02)  # the daemon binds in its thread
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    try:
        for lanes in (True, False):
            with Client(endpoint, timeout_s=30, lanes=lanes) as client:
                for _ in range(5):
                    (out,) = client.submit(model, [x])
                    with torch.no_grad():
                        torch.testing.assert_close(out, model(x))
                assert client.lane_attached is lanes
    finally:
        daemon.request_stop()
        thread.join(30)
    assert result.get("code") == 0
    assert any(found), "no request was picked up by the spin loop"
