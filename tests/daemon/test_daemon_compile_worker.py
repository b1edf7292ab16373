"""``daemon.compile = "inductor"`` through a real cgtreed (CPU backend, real compile worker):
a graph compiles off the serving loop while another client is served, its registration waits
with progress and ends on inductor's kernels, and a restarted daemon loads the compiled graph
instead of compiling it again."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("zmq")

from cgtree.client import Client  # noqa: E402

INDUCTOR_CONFIG = """
[daemon]
reap_interval_s = 0.2
log_level = "INFO"
compile = "inductor"
"""


class Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])

    def forward(self, x):
        return torch.relu(self.layers(x)) * 2


def _graph_row(client: Client, graph_id: str) -> dict:
    for device in client.status()["devices"]:
        for row in device["registered"]:
            if row["graph"] == graph_id:
                return row
    raise AssertionError(f"graph {graph_id} is not in the daemon's status")


def test_a_compile_does_not_stall_other_clients_and_survives_a_restart(daemon_factory, tmp_path, caplog):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    daemon = daemon_factory(INDUCTOR_CONFIG, extra_env=env)
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(4, 32)
    small = torch.nn.Linear(4, 4).eval()  # the other client's graph: symbolic-free, but compiled too
    with Client(daemon.endpoint, timeout_s=60) as other:
        handle_small = other.register(small, [torch.randn(2, 4)])
        registered: dict = {}

        def register_wide() -> None:
            with Client(daemon.endpoint, timeout_s=60) as registering:
                with torch.no_grad():
                    handle = registering.register(model, [x])
                    registered["handle"] = handle
                    registered["out"] = registering.submit(handle, [x])[0]
                    registered["row"] = _graph_row(registering, handle.graph_id)  # while its session holds it

        caplog.set_level("INFO", logger="cgtree.client")
        worker = threading.Thread(target=register_wide)
        worker.start()
        served_while_compiling = 0
        seen_compiling = False
        with torch.no_grad():
            while worker.is_alive():
                out = other.submit(handle_small, [torch.ones(2, 4)])[0]
                torch.testing.assert_close(out, small(torch.ones(2, 4)))
                jobs = other.status()["daemon"]["compile"]["jobs"]
                if any(job["name"].startswith("Wide") for job in jobs):
                    seen_compiling = True
                    served_while_compiling += 1
                time.sleep(0.02)
        worker.join()
        assert seen_compiling, "the Wide graph never showed up as compiling in status"
        assert served_while_compiling >= 3, "the other client was not served while the graph compiled"
        torch.testing.assert_close(registered["out"], model(x))
        assert "cgtreed is compiling graph" in caplog.text
        assert registered["row"]["kernels"] == "inductor"
        compile_state = other.status()["daemon"]["compile"]
        assert compile_state["compiled"] >= 1 and compile_state["failed"] == 0
    log = daemon.log()
    assert "compiling in the compile worker" in log and "runs inductor's code: compiled by inductor" in log
    assert "loader warm-up canary queued" in log  # a first start: no canary yet, made after READY

    daemon.kill()
    restarted = daemon_factory(INDUCTOR_CONFIG, extra_env=env)
    with Client(restarted.endpoint, timeout_s=60) as client:
        started = time.monotonic()
        with torch.no_grad():
            handle = client.register(model, [x])
            out = client.submit(handle, [x])[0]
        torch.testing.assert_close(out, model(x))
        state = client.status()["daemon"]["compile"]
        assert state["submitted"] == 0 and state["workers_started"] == 0, state  # loaded, not compiled
        assert _graph_row(client, handle.graph_id)["kernels"] == "inductor"
    restarted_log = restarted.log()
    assert "compiled before (artifact on disk)" in restarted_log
    # The first daemon compiled the loader warm-up canary after its READY; the restarted one
    # loaded it before READY (so it queued nothing: ``submitted == 0`` above).
    assert "loader warm-up canary queued" not in restarted_log
    assert "compiled-graph loader warmed in" in restarted_log
    assert time.monotonic() - started < 60


def test_a_daemon_whose_inductor_does_not_import_still_starts_and_serves(daemon_factory, tmp_path):
    """daemon.compile = "inductor" imports inductor before READY; a broken install must cost
    the compiled kernels, not the daemon."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch._inductor':\n"
        "            raise ImportError('inductor refused by the test')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Refuse())\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    daemon = daemon_factory(INDUCTOR_CONFIG, extra_env=env)
    with Client(daemon.endpoint, timeout_s=60) as client:
        assert client.ping()["daemon_pid"] > 0
    assert "inductor does not import" in daemon.log()
