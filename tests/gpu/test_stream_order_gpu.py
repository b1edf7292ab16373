"""Stream-ordered outputs on cuda:0 (``cgtree.client.stream_order``, opt-in): a doorbell run is
handed back before the device finished it, every read on the caller's stream (the default stream
or another) sees the finished values, and a daemon killed while a stream waits makes the client
abort rather than run on unfinished outputs or hang. Run on a GPU host: ``pytest -m gpu``."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from gpu_models import Deep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("stream", ["default", "side"])
def test_outputs_come_back_before_the_device_finished_and_read_right_on_the_callers_stream(wide_spin_daemon, stream):
    from cgtree.client import Client

    model = Deep(seed=5).eval().cuda()
    side = torch.cuda.Stream() if stream == "side" else torch.cuda.current_stream()
    with Client(wide_spin_daemon.endpoint, timeout_s=60, stream_ordered_outputs=True) as client, \
            torch.no_grad(), torch.cuda.stream(side):
        x = torch.randn(64, 1024, device="cuda:0")
        handle = client.register(model, [x])
        for _ in range(60):  # past the plan's in-place recording
            x.normal_()
            client.submit(handle, [x])
        runs_before = client.stream_order.runs
        inputs, seen, unfinished = [], [], 0
        for _ in range(100):
            x.normal_()
            inputs.append(x.clone())
            (out,) = client.submit(handle, [x])
            unfinished += client.stream_order.unfinished()  # handed back while the device still ran it
            seen.append(out.clone())  # on the caller's stream, behind the wait
        torch.cuda.current_stream().synchronize()
        ordered = client.stream_order.runs - runs_before
        assert ordered >= 90, client.stream_order.describe()
        assert unfinished >= 30, f"only {unfinished} of {ordered} runs came back before their done word"
        wrong = sum(not torch.allclose(got, model(given)[0], atol=1e-4, rtol=1e-4) for got, given in zip(seen, inputs))
        assert wrong == 0, f"{wrong} of {len(seen)} reads on the caller's stream saw unfinished outputs"


def test_a_compiled_model_through_stream_ordered_outputs_equals_eager(wide_spin_daemon):
    from cgtree.client import Client
    from cgtree.client.compile_backend import backend

    model = Deep(seed=5).eval().cuda()
    with Client(wide_spin_daemon.endpoint, timeout_s=120, stream_ordered_outputs=True) as client, torch.no_grad():
        compiled = torch.compile(model, backend=backend(client))
        x = torch.randn(64, 1024, device="cuda:0")
        for _ in range(70):
            compiled(x)
        results = []
        for _ in range(30):
            x.normal_()
            results.append((x.clone(), compiled(x)[0].clone()))
        for given, got in results:
            torch.testing.assert_close(got, model(given)[0], atol=1e-4, rtol=1e-4)
        assert client.stream_order.runs >= 25, client.stream_order.describe()
        assert client.compile_stats.as_dict()["graphs_in_client"] == 0


KILLED_MID_RUN_CLIENT = """
import json, sys, torch
from cgtree.client import Client
torch.manual_seed(0)
# A few hundred milliseconds of GPU work a step: the daemon dies while the device runs it.
model = torch.nn.Sequential(*[torch.nn.Linear(8192, 8192) for _ in range(4)]).eval().cuda()
x = torch.randn(8192, 8192, device="cuda")
with torch.no_grad():
    expected = model(x)
torch.cuda.synchronize()
client = Client(sys.argv[1], timeout_s=60, stream_ordered_outputs=True)
with torch.no_grad():
    handle = client.register(model, [x])
    for _ in range(6):
        client.submit(handle, [x])
    before = client.stream_order.runs
    (out,) = client.submit(handle, [x])
    print(json.dumps({"returned": True, "ordered": client.stream_order.runs - before,
                      "unfinished": client.stream_order.unfinished()}), flush=True)
    sys.stdin.readline()  # the test killed the daemon
    right = bool(torch.allclose(out, expected, atol=1e-3, rtol=1e-3))
    torch.cuda.synchronize()
print(json.dumps({"completed": True, "right": right}), flush=True)
"""


def test_a_daemon_killed_while_a_stream_waits_aborts_the_client_never_a_wrong_value(daemon_tools, client_scripts):
    """The crash semantics stream-ordered outputs trade for their speed: the daemon is SIGKILLed
    while the caller's stream waits for a run it answered. The client must abort with a message
    naming the cause (or, should the dying daemon's device still finish the run, go on with
    right values); it must never hang or hand on wrong values."""
    # The model's 256 MiB weights travel in one registration message.
    config = daemon_tools.GPU_TEST_CONFIG.replace("max_message_bytes = 67108864", f"max_message_bytes = {1 << 30}")
    assert config != daemon_tools.GPU_TEST_CONFIG
    # A step of ~130 ms: the daemon must still be spinning when the next one rings (a daemon
    # asleep is reached over the lane, where outputs are always waited for on the host).
    daemon = daemon_tools.DaemonProcess(daemon_tools.short_tmpdir(), config + "spin_us = 1000000\n",
                                        devices="cuda:0", extra_env=daemon_tools.GPU_TEST_ENV).start()
    try:
        import subprocess
        import sys

        path = client_scripts._write(KILLED_MID_RUN_CLIENT)
        proc = subprocess.Popen([sys.executable, path, daemon.endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=client_scripts.workdir)
        client_scripts.running.append(proc)
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("returned"), proc.communicate(timeout=60)
        daemon.signal(signal.SIGKILL)  # while the device runs the step
        daemon.wait(60)
        try:
            stdout, stderr = proc.communicate("go\n", timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the client hung after its daemon was killed mid-run")
    finally:
        daemon.kill()
    report = {"first": first, "returncode": proc.returncode, "stderr_tail": stderr[-1500:], "stdout": stdout}
    print(json.dumps(report))  # kept in the test log: which of the two outcomes this run saw
    assert first["ordered"] == 1, report
    if proc.returncode == -signal.SIGABRT:
        assert "the daemon is gone" in stderr and "stream-ordered" in stderr, report
    else:
        assert proc.returncode == 0, report
        last = json.loads(stdout.strip().splitlines()[-1])
        assert last == {"completed": True, "right": True}, report
