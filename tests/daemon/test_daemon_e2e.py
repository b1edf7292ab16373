"""End to end on the CPU replay backend: a real cgtreed process, clients in this process and in
subprocesses. One daemon serves the whole module (module-scoped fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cgtree.client import Client



def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


class TwoHeads(torch.nn.Module):
    """A small conv with two outputs of different shapes and dtypes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        pooled = features.mean(dim=(2, 3))
        return self.head(pooled), features.argmax(dim=1)


def session_doc(status: dict, session_id: int) -> dict:
    return next(s for s in status["sessions"] if s["id"] == session_id)


def wait_for(predicate, timeout_s: float = 8.0, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


def test_mlp_outputs_equal_eager_and_the_tree_goes_warmup_recorded_replayed(cgtreed):
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        modes = []
        for _ in range(4):
            x = torch.randn(5, 8)
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
            modes.append((client.last_execution["mode"], client.last_execution["node_id"]))
        assert modes == [("warmup", None), ("recorded", 0), ("replayed", 0), ("replayed", 0)]

        status = client.status()
        mine = session_doc(status, client.session_id)
        tree = mine["devices"]["cpu"]
        assert tree["backend"] == "cpu-replay"  # never presented as CUDA
        assert tree["root_children"] == [0]
        assert tree["counters"]["warmups"] == 1
        assert tree["counters"]["recordings"] == 1
        assert tree["counters"]["replays"] == 2
        (node,) = tree["tree"]["nodes"]
        assert node["id"] == 0 and node["replays"] == 2 and node["children"] == []
        assert mine["submits"] == 4
        assert status["devices"][0]["backend"] == "cpu-replay"


def test_conv_with_two_outputs_equals_eager_every_call(cgtreed):
    model = TwoHeads().eval()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        handle = client.register(model, [torch.randn(2, 3, 6, 6)])
        for _ in range(3):
            x = torch.randn(2, 3, 6, 6)
            logits, classes = client.submit(handle, [x])
            want_logits, want_classes = model(x)
            torch.testing.assert_close(logits, want_logits)
            assert classes.dtype == torch.int64
            assert torch.equal(classes, want_classes)
        assert client.last_execution["mode"] == "replayed"


def test_cpu_outputs_are_copies_the_client_owns(cgtreed):
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        first = [client.submit(model, [torch.randn(5, 8)])[0] for _ in range(3)]
        kept = first[-1].clone()
        client.submit(model, [torch.randn(5, 8)])
        assert torch.equal(first[-1], kept)  # a later submit never changes what we hold
        first[-1].add_(1.0)  # and they are writable


def test_two_clients_sending_the_same_model_share_one_weight_copy(cgtreed, client_scripts):
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        client.submit(model, [torch.randn(5, 8)])
        before = client.status()["devices"][0]["weights"]
        assert before["count"] == 4 and before["bytes"] == (8 * 16 + 16 + 16 * 4 + 4) * 4

        result = client_scripts.run(
            """
            import json, sys, torch
            from cgtree.client import Client
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
            with Client(sys.argv[1], timeout_s=30) as client:
                x = torch.randn(5, 8)
                (out,) = client.submit(model, [x])
                assert torch.allclose(out, model(x), atol=1e-6)
                status = client.status()
                print(json.dumps({"weights": status["devices"][0]["weights"], "sessions": len(status["sessions"])}))
            """,
            cgtreed.endpoint,
        )
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["sessions"] >= 2
        assert seen["weights"] == before  # the second client added nothing
        assert client.status()["devices"][0]["weights"] == before


SLEEPING_CLIENT = """
import sys, time, torch
from cgtree.client import Client
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
client = Client(sys.argv[1], timeout_s=30, session=(sys.argv[2] or None) if len(sys.argv) > 2 else None)
for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1):
    client.submit(model, [torch.randn(5, 8)])
    print(client.last_execution["mode"], flush=True)
print("session", client.session_id, flush=True)
time.sleep(600)
"""


def _read_session_id(proc: subprocess.Popen) -> int:
    for line in proc.stdout:
        if line.startswith("session "):
            return int(line.split()[1])
    raise AssertionError(f"client exited early: {proc.stderr.read()}")


def test_a_client_killed_with_sigkill_has_its_session_reclaimed_while_another_keeps_working(cgtreed, client_scripts):
    victim = client_scripts.start(SLEEPING_CLIENT, cgtreed.endpoint)
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as survivor:
        victim_session = _read_session_id(victim)
        ids = {s["id"] for s in survivor.status()["sessions"]}
        assert victim_session in ids
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 5.0:
            x = torch.randn(5, 8)
            (out,) = survivor.submit(model, [x])
            torch.testing.assert_close(out, model(x))
            if victim_session not in {s["id"] for s in survivor.status()["sessions"]}:
                break
        assert victim_session not in {s["id"] for s in survivor.status()["sessions"]}, "dead client's session not reclaimed"
        assert survivor.session_id in {s["id"] for s in survivor.status()["sessions"]}
        assert "exited" in cgtreed.log()


def test_a_named_session_is_parked_when_its_client_dies_and_adopted_warm(cgtreed, client_scripts):
    crashed = client_scripts.start(SLEEPING_CLIENT, cgtreed.endpoint, "warm-test", "3")
    session_id = _read_session_id(crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=10)
    with Client(cgtreed.endpoint, timeout_s=30, session="warm-test") as client:
        parked = wait_for(lambda: [s for s in client.status()["sessions"] if s["id"] == session_id and s["state"] == "parked"])
        assert parked, "the named session was not parked"
        model = tiny_mlp()
        x = torch.randn(5, 8)
        (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        assert client.session_id == session_id  # adopted, not a new session
        assert client.last_execution["mode"] == "replayed"  # the recording survived the crash


def test_a_live_named_session_cannot_be_taken_over(cgtreed):
    with Client(cgtreed.endpoint, timeout_s=30, session="taken") as holder:
        holder.ping()
        holder.mark_step_begin()  # says hello
        with Client(cgtreed.endpoint, timeout_s=30, session="taken") as other:
            from cgtree.client import DaemonError

            with pytest.raises(DaemonError) as info:
                other.mark_step_begin()
            assert info.value.code == "session_in_use"


def test_mark_step_release_and_reset(cgtreed):
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        for _ in range(3):
            client.submit(model, [torch.randn(5, 8)])
        client.mark_step_begin()
        client.submit(model, [torch.randn(5, 8)])
        assert client.last_execution["mode"] == "replayed"
        assert client.release() == 0  # CPU outputs hold no daemon buffers
        client.reset()
        client.submit(model, [torch.randn(5, 8)])
        assert client.last_execution["mode"] == "warmup"  # trees dropped, graph still registered


def test_cgtreectl_prints_status_tables_and_json(cgtreed):
    model = tiny_mlp()
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        client.submit(model, [torch.randn(5, 8)])
        client.submit(model, [torch.randn(5, 8)])
        env = {**os.environ, "CGTREE_ENDPOINT": cgtreed.endpoint}
        text = subprocess.run([sys.executable, "-m", "cgtree.daemon.ctl", "status"], env=env,
                              capture_output=True, text=True, timeout=30)
        assert text.returncode == 0, text.stderr
        assert "DEVICE" in text.stdout and "cpu-replay" in text.stdout
        assert "RECORDINGS" in text.stdout and str(client.session_id) in text.stdout
        as_json = subprocess.run([sys.executable, "-m", "cgtree.daemon.ctl", "--endpoint", cgtreed.endpoint, "status", "--json"],
                                 capture_output=True, text=True, timeout=30)
        assert as_json.returncode == 0, as_json.stderr
        document = json.loads(as_json.stdout)
        assert document["devices"][0]["backend"] == "cpu-replay"
        assert client.session_id in [s["id"] for s in document["sessions"]]


def test_the_daemon_logged_which_backend_each_device_runs(cgtreed):
    assert "device cpu: backend cpu-replay" in cgtreed.log()
