"""Service behaviour that only a CUDA device shows: cgtreed refuses expandable segments on a
CUDA device, and a client with CUDA IPC inputs and outputs survives a SIGKILLed daemon
(re-registers, its in-flight submit is sent once more with a correct result, outputs of the
dead daemon are refused clearly). Run on a GPU host: ``pytest -m gpu tests/ops``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cgtree.client import Client, ClientError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]



def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval().to("cuda:0")


def test_cgtreed_refuses_expandable_segments_on_a_cuda_device(tmp_path, daemon_tools):
    config = tmp_path / "config.toml"
    config.write_text(daemon_tools.GPU_TEST_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "cgtree.daemon.main", "--config", str(config), "--devices", "cuda:0",
         "--endpoint", f"ipc://{tmp_path}/s"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    assert result.returncode == 78
    assert "expandable_segments" in result.stderr and "CUDA IPC" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_cuda_client_survives_a_sigkilled_daemon(daemon_tools):
    workdir = daemon_tools.short_tmpdir()
    daemon = daemon_tools.DaemonProcess(workdir, daemon_tools.GPU_TEST_CONFIG, devices="cuda:0", extra_env=daemon_tools.GPU_TEST_ENV).start()
    restarted = None
    model = mlp()
    client = Client(daemon.endpoint, timeout_s=60)
    try:
        x = torch.randn(8, 64, device="cuda:0")
        handle = client.register(model, [x])
        for _ in range(3):
            (old_out,) = client.submit(handle, [x])
        assert client.last_execution["mode"] == "replayed" and old_out.is_cuda
        first_pid = client.daemon_pid

        daemon.signal(signal.SIGSTOP)
        y = torch.randn(8, 64, device="cuda:0")
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(out=client.submit(handle, [y])), daemon=True)
        thread.start()
        time.sleep(0.3)
        daemon.signal(signal.SIGKILL)
        daemon.wait(timeout_s=30)
        restarted = daemon_tools.DaemonProcess(workdir, Path(daemon.config_path).read_text(), devices="cuda:0",
                                               extra_env=daemon_tools.GPU_TEST_ENV).start()
        thread.join(60)
        assert not thread.is_alive() and "out" in result
        (out,) = result["out"]
        torch.testing.assert_close(out, model(y))
        assert client.daemon_pid != first_pid and client.last_execution["mode"] == "warmup"
        with pytest.raises((ClientError, RuntimeError)):
            client.submit(handle, [old_out])  # a view of the dead daemon's buffer: refused, never read
        for _ in range(3):
            (out,) = client.submit(handle, [y])
        torch.testing.assert_close(out, model(y))
        assert client.last_execution["mode"] == "replayed"
    finally:
        client.close(timeout_s=1.0)
        daemon.kill()
        if restarted is not None:
            restarted.kill()
