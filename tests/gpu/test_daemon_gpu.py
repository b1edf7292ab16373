"""cgtreed end to end on cuda:0: CUDA IPC inputs and outputs, overwritten outputs that raise, and
pool memory returned when sessions end. Run on a GPU host: ``pytest -m gpu tests/gpu``."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from gpu_models import Deep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]



@pytest.fixture(scope="module")
def gpu_daemon(cgtreed_gpu):
    return cgtreed_gpu


def mlp(device="cuda:0") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU()).eval().to(device)


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return self.head(features.mean(dim=(2, 3))), features.argmax(dim=1)


def device_doc(client) -> dict:
    return client.status()["devices"][0]


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def test_the_daemon_runs_the_cuda_backend(gpu_daemon):
    from cgtree.client import Client

    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        assert device_doc(client)["backend"] == "cuda"
    assert "device cuda:0: backend cuda" in gpu_daemon.log()


def test_cuda_outputs_equal_eager_through_ipc_inputs_and_outputs(gpu_daemon):
    from cgtree.client import Client

    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        modes = []
        for _ in range(5):
            x = torch.randn(16, 64, device="cuda:0")
            (out,) = client.submit(model, [x])
            assert out.device == torch.device("cuda:0")
            with torch.no_grad():
                torch.testing.assert_close(out, model(x))
            modes.append(client.last_execution["mode"])
        assert modes[:3] == ["warmup", "recorded", "replayed"] and modes[3:] == ["replayed", "replayed"]
        mine = next(s for s in client.status()["sessions"] if s["id"] == client.session_id)
        tree = mine["devices"]["cuda:0"]
        assert tree["backend"] == "cuda" and tree["root_children"] == [0]
        assert tree["counters"]["replays"] == 3 and tree["output_buffers"] == 1


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_a_non_contiguous_cuda_input_runs_inductors_code_and_replays(gpu_daemon, layout):
    """A CUDA input keeps its client's strides; inductor's code asserts the contiguous strides it
    was compiled for (``compiling.in_compiled_layout`` makes the inputs contiguous inside the
    recorded graph)."""
    from cgtree.client import Client

    if layout == "transposed":
        model = mlp()

        def fresh():
            return torch.randn(64, 16, device="cuda:0").t()
    else:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).cuda().eval()

        def fresh():
            return torch.randn(2, 3, 16, 16, device="cuda:0").to(memory_format=torch.channels_last)

    with Client(gpu_daemon.endpoint, timeout_s=120) as client:
        handle = client.register(model, [fresh()])
        modes = []
        for _ in range(5):
            x = fresh()
            assert not x.is_contiguous()
            (out,) = client.submit(handle, [x])
            with torch.no_grad():
                # cuDNN convolutions default to TF32 in both processes, with algorithms of their
                # own choosing: 1e-3 (a replay of stale inputs would be off by ~1).
                torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-3)
            modes.append(client.last_execution["mode"])
        rows = [row for dev in client.status()["devices"] for row in dev["registered"] if row["graph"] == handle.graph_id]
    assert rows and rows[0]["kernels"] == "inductor", rows
    assert modes[-2:] == ["replayed", "replayed"], modes


def test_repeated_cuda_buffers_read_fresh_data_through_the_input_memo(gpu_daemon):
    """The client packs the descriptors of a loop's CUDA buffers once and the daemon reuses its
    decoded views: the data in the buffers must still be read anew on every call, and a buffer
    freed and replaced (same address, new storage) must not be mistaken for the old one."""
    from cgtree.client import Client

    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client, torch.no_grad():
        x = torch.randn(16, 64, device="cuda:0")
        for step in range(6):
            x.copy_(torch.randn(16, 64, device="cuda:0"))  # same buffer, new data
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
        assert client.lane_attached
        first_ptr = x.data_ptr()
        del x, out
        y = torch.randn(16, 64, device="cuda:0")  # quite likely the freed block, reused
        (out,) = client.submit(model, [y])
        torch.testing.assert_close(out, model(y))
        assert client.last_execution["mode"] == "replayed", client.last_execution
        assert client.last_execution["daemon_us"] > 0
        print(f"reused address: {y.data_ptr() == first_ptr}")


class Accumulate(torch.nn.Module):
    def forward(self, total, x):
        total.add_(x)
        return total * 2


def test_a_cuda_input_the_graph_writes_is_written_in_place_under_graphs(gpu_daemon):
    """A written CUDA input is a static input of the recording: the replay writes the client's
    own memory (no copies either way), and the calls still run as graphs."""
    from cgtree.client import Client

    total = torch.zeros(64, device="cuda:0")
    ones = torch.ones(64, device="cuda:0")
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        handle = client.register(Accumulate(), [total.clone(), ones])
        modes = []
        for step in range(1, 6):
            (out,) = client.submit(handle, [total, ones])
            torch.testing.assert_close(total, torch.full((64,), float(step), device="cuda:0"))
            torch.testing.assert_close(out, 2 * total)
            modes.append(client.last_execution["mode"])
        assert modes[-2:] == ["replayed", "replayed"], modes
        other = torch.zeros(64, device="cuda:0")  # another buffer at the written position
        (out,) = client.submit(handle, [other, ones])
        torch.testing.assert_close(other, ones)
        torch.testing.assert_close(total, torch.full((64,), 5.0, device="cuda:0"))


def test_conv_with_two_outputs_on_cuda_equals_eager(gpu_daemon):
    from cgtree.client import Client

    model = TwoHeads().eval().cuda()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        for _ in range(3):
            x = torch.randn(2, 3, 16, 16, device="cuda:0")
            logits, classes = client.submit(model, [x])
            with torch.no_grad():
                want_logits, want_classes = model(x)
            torch.testing.assert_close(logits, want_logits)
            assert torch.equal(classes, want_classes)


def test_touching_an_overwritten_output_raises_and_the_new_one_is_right(gpu_daemon):
    from cgtree.client import Client
    from cgtree.client.outputs import CAN_RAISE_ON_OVERWRITTEN_OUTPUT

    if not CAN_RAISE_ON_OVERWRITTEN_OUTPUT:
        pytest.skip("this torch build lacks torch._C._set_storage_access_error_msg")
    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        x1, x2 = torch.randn(16, 64, device="cuda:0"), torch.randn(16, 64, device="cuda:0")
        (first,) = client.submit(model, [x1])
        kept = first.clone()
        (second,) = client.submit(model, [x2])
        with pytest.raises(RuntimeError, match="overwritten"):
            first.sum().item()
        with torch.no_grad():
            torch.testing.assert_close(second, model(x2))
            torch.testing.assert_close(kept, model(x1))  # a clone taken in time stays valid


def test_an_output_passed_back_as_an_input_travels_by_reference(gpu_daemon):
    from cgtree.client import Client

    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        x = torch.randn(16, 64, device="cuda:0")
        state = x
        with torch.no_grad():
            expected = x
            for _ in range(4):
                expected = model(expected)
        for _ in range(4):
            (state,) = client.submit(model, [state])  # recurrent: the previous output goes back in
        torch.testing.assert_close(state, expected, rtol=1e-4, atol=1e-4)


def test_two_gpu_clients_share_weights_and_pool_memory_returns_when_sessions_close(gpu_daemon, client_scripts):
    from cgtree.client import Client

    with Client(gpu_daemon.endpoint, timeout_s=60) as observer:
        baseline = wait_for(lambda: device_doc(observer) if device_doc(observer)["sessions"] == 0 else None)
        assert baseline, "sessions of earlier tests still open"
        result = client_scripts.run(
            """
            import json, sys, torch
            from cgtree.client import Client
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU()).eval().cuda()
            with Client(sys.argv[1], timeout_s=60) as a, Client(sys.argv[1], timeout_s=60) as b:
                for _ in range(3):
                    x = torch.randn(16, 64, device="cuda")
                    (oa,) = a.submit(model, [x]); (ob,) = b.submit(model, [x])
                    with torch.no_grad():
                        assert torch.allclose(oa, model(x), atol=1e-5) and torch.allclose(ob, model(x), atol=1e-5)
                doc = a.status()["devices"][0]
                print(json.dumps(doc))
            """,
            gpu_daemon.endpoint,
            timeout_s=120,
        )
        assert result.returncode == 0, result.stderr
        during = json.loads(result.stdout.strip().splitlines()[-1])
        assert during["weights"]["count"] == 4  # one copy for both clients
        assert during["pool_bytes"] > 0
        after = wait_for(lambda: (lambda d: d if d["sessions"] == 0 else None)(device_doc(observer)))
        assert after["pool_bytes"] == 0 and after["live_blocks"] == 0
        assert after["weights"] == {"count": 0, "bytes": 0}
        assert after["output_buffer_bytes"] == 0
        # Everything the sessions allocated went back to the daemon's allocator.
        assert after["allocated_bytes"] <= baseline["allocated_bytes"]


SLEEPING_GPU_CLIENT = """
import sys, time, torch
from cgtree.client import Client
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).eval().cuda()
client = Client(sys.argv[1], timeout_s=60)
for _ in range(3):
    (out,) = client.submit(model, [torch.randn(16, 64, device="cuda")])
print("session", client.session_id, flush=True)
time.sleep(600)
"""


def test_a_killed_gpu_client_is_reclaimed_and_its_memory_returned(gpu_daemon, client_scripts):
    from cgtree.client import Client

    with Client(gpu_daemon.endpoint, timeout_s=60) as observer:
        baseline = wait_for(lambda: (lambda d: d if d["sessions"] == 0 else None)(device_doc(observer)))
        victim = client_scripts.start(SLEEPING_GPU_CLIENT, gpu_daemon.endpoint)
        for line in victim.stdout:
            if line.startswith("session "):
                break
        else:
            raise AssertionError(victim.stderr.read())
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        after = wait_for(lambda: (lambda d: d if d["sessions"] == 0 else None)(device_doc(observer)))
        assert after, "the killed client's session was not reclaimed"
        assert after["pool_bytes"] == 0 and after["output_buffer_bytes"] == 0
        # The dead client held the output buffer open: the daemon released that reference itself.
        freed = wait_for(lambda: device_doc(observer)["allocated_bytes"] <= baseline["allocated_bytes"])
        assert freed, (baseline, device_doc(observer))


def test_a_stale_ipc_handle_is_refused_and_the_daemon_keeps_serving(gpu_daemon):
    from cgtree.client import Client, DaemonError
    from cgtree.daemon.tensors import describe_cuda, export_cuda_storage

    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client:
        handle = client.register(model, [torch.randn(16, 64, device="cuda:0")])
        # 64 MiB: a segment of its own, so freeing the tensor really cudaFree's the allocation.
        doomed = torch.empty(16 * 1024 * 1024, device="cuda:0")
        view = doomed[: 16 * 64].view(16, 64)
        desc = describe_cuda(view, export_cuda_storage(doomed.untyped_storage()))
        ipc = desc["storage"]
        del doomed, view
        torch.UntypedStorage._release_ipc_counter_cuda(ipc["ref"], ipc["ref_offset"])  # no consumer holds it
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()  # the segment is cudaFree'd: its handle is stale
        with pytest.raises(DaemonError) as info:
            client.session.call("submit", {"device": "cuda:0", "graph": handle.graph_id, "inputs": [desc]})
        assert info.value.code == "bad_tensor" and "input 0" in info.value.message
        x = torch.randn(16, 64, device="cuda:0")
        (out,) = client.submit(handle, [x])
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))
    assert gpu_daemon.alive()


def test_sigterm_with_gpu_sessions_exits_0(daemon_factory, daemon_tools):
    from cgtree.client import Client

    daemon = daemon_factory(daemon_tools.GPU_TEST_CONFIG, devices="cuda:0", extra_env=daemon_tools.GPU_TEST_ENV)
    client = Client(daemon.endpoint, timeout_s=60)
    client.submit(mlp(), [torch.randn(16, 64, device="cuda:0")])
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout_s=30) == 0
    assert not os.path.exists(daemon.socket_path)
    client.close(timeout_s=0.2)


CPU_ONLY_CLIENT = """
import os, sys, json
os.environ["CUDA_VISIBLE_DEVICES"] = ""   # this process cannot create a CUDA context at all
import torch
from cgtree.client import Client
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU()).eval()
modes = []
with Client(sys.argv[1], timeout_s=60) as client, torch.no_grad():
    handle = client.register(model, [torch.randn(16, 64)], device="cuda:0")
    for _ in range(4):
        x = torch.randn(16, 64)
        (out,) = client.submit(handle, [x])
        assert out.device.type == "cpu", out.device
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        modes.append(client.last_execution["mode"])
print(json.dumps({"modes": modes, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_a_client_without_cuda_sends_cpu_inputs_and_gets_cpu_outputs(gpu_daemon, client_scripts):
    result = client_scripts.run(CPU_ONLY_CLIENT, gpu_daemon.endpoint)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modes"] == ["warmup", "recorded", "replayed", "replayed"]
    assert report["cuda_initialized"] is False


class CachedStep(torch.nn.Module):
    """A decoder-like step: a cache buffer written in place at a position each call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(64, 64)
        self.register_buffer("cache", torch.zeros(8, 16, 64))

    def forward(self, x, pos):
        self.cache.index_copy_(1, pos, self.proj(x).unsqueeze(1))
        return self.cache.sum(1)


def test_compiled_kv_cache_writes_happen_in_the_clients_buffer(gpu_daemon):
    """torch.compile(backend=cgtree.client.backend(client)) on CUDA: the cache write runs inside
    the daemon's graph on the client's buffer (IPC, in place); only the step's output travels."""
    from cgtree.client import Client, backend

    model = CachedStep().eval().cuda()
    reference = CachedStep().eval().cuda()
    reference.load_state_dict(model.state_dict())
    with Client(gpu_daemon.endpoint, timeout_s=120) as client, torch.no_grad():
        compiled = torch.compile(model, backend=backend(client))
        modes = []
        for step in range(6):
            x, pos = torch.randn(8, 64, device="cuda:0"), torch.tensor([step], device="cuda:0")
            torch.testing.assert_close(compiled(x, pos), reference(x, pos))
            torch.testing.assert_close(model.cache, reference.cache)
            modes.append(client.last_execution["mode"])
        assert modes[-2:] == ["replayed", "replayed"], modes
        mine = client.status(session_only=True)["sessions"][0]["devices"]["cuda:0"]
        # Only the [8, 64] output has a slot in the output buffer: the cache never travels back.
        assert mine["output_buffer_bytes"] < model.cache.numel() * model.cache.element_size()


def test_a_steady_submit_loop_runs_as_plans_and_stays_correct(gpu_daemon):
    """Prepared submits (cgtree.daemon.plans): the same graph on the same CUDA buffers goes as a
    plan run after the first submits; data read anew each time, the previous outputs marked
    overwritten, and releasing the outputs expires the plan (the loop goes on the general way)."""
    from cgtree.client import Client
    from cgtree.client.outputs import CAN_RAISE_ON_OVERWRITTEN_OUTPUT

    model = mlp()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client, torch.no_grad():
        x = torch.randn(16, 64, device="cuda:0")
        plans = []
        for _ in range(8):
            x.copy_(torch.randn(16, 64, device="cuda:0"))
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
            plans.append(client.last_execution.get("plan"))
        assert plans[-1] is not None and len(set(plans[-4:])) == 1, plans
        assert client.last_execution["mode"] == "replayed" and client.last_execution["daemon_us"] > 0
        previous = out
        x.copy_(torch.randn(16, 64, device="cuda:0"))
        (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        if CAN_RAISE_ON_OVERWRITTEN_OUTPUT:
            with pytest.raises(RuntimeError, match="overwritten"):
                previous.sum().item()
        client.release()
        (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        assert client.last_execution.get("plan") is None  # the general way, a new buffer
        for _ in range(3):
            (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        assert client.last_execution.get("plan") is not None and client.last_execution["plan"] != plans[-1]
        client.reset()  # trees dropped: the plan expires, the graph warms up and records again
        (out,) = client.submit(model, [x])
        torch.testing.assert_close(out, model(x))
        assert client.last_execution["mode"] == "warmup"


def test_a_plan_loop_moves_to_an_in_place_recording_that_reads_and_writes_the_clients_buffers(gpu_daemon):
    """After DIRECT_AFTER_RUNS plan runs the daemon records the plan's own graph
    (cgtree.daemon.plans: every input static, the output copy inside the graph): steps keep
    reading fresh inputs, the cache is written in the client's buffer, and the tree shows the
    "[plan]" root replaying."""
    from cgtree.daemon.plans import DIRECT_AFTER_RUNS
    from cgtree.client import Client, backend

    model = CachedStep().eval().cuda()
    reference = CachedStep().eval().cuda()
    reference.load_state_dict(model.state_dict())
    x, pos = torch.empty(8, 64, device="cuda:0"), torch.empty(1, dtype=torch.long, device="cuda:0")
    with Client(gpu_daemon.endpoint, timeout_s=120) as client, torch.no_grad():
        compiled = torch.compile(model, backend=backend(client))
        for step in range(DIRECT_AFTER_RUNS + 12):
            x.copy_(torch.randn(8, 64, device="cuda:0"))
            pos.fill_(step % 16)
            torch.testing.assert_close(compiled(x, pos), reference(x, pos))
            torch.testing.assert_close(model.cache, reference.cache)
        execution = client.last_execution
        assert execution["mode"] == "replayed" and execution.get("plan") is not None, execution
        nodes = client.status(session_only=True)["sessions"][0]["devices"]["cuda:0"]["tree"]["nodes"]
        planned = [node for node in nodes if node["function"].endswith("[plan]")]
        assert planned and planned[0]["replays"] >= 3, nodes
        # The report names what replayed: the plan's recording, node and function alike.
        assert execution["node_id"] == planned[0]["id"] and execution["function"] == planned[0]["function"], execution


def _hot_plan_loop(client, model):
    """An input and its graph's handle, submitted past the plan's in-place recording: the next
    submits of ``x`` are hot plan runs."""
    x = torch.randn(64, 1024, device="cuda:0")
    handle = client.register(model, [x])
    for _ in range(60):
        x.normal_()
        client.submit(handle, [x])
    return x, handle


def test_a_tight_plan_loop_rings_the_doorbell_and_reads_finished_outputs(wide_spin_daemon):
    """cgtree.daemon.doorbell: on a CUDA daemon a tight plan loop goes through the lane's
    doorbell page; the daemon answers at launch, so every returned output must still be the
    finished one (the client waits for the device's done word), and the in-place recording
    runs behind it as before."""
    from cgtree.client import Client

    model = Deep().eval().cuda()
    with Client(wide_spin_daemon.endpoint, timeout_s=60) as client, torch.no_grad():
        x, handle = _hot_plan_loop(client, model)
        rung = client.status(session_only=True)["sessions"][0]["doorbell_requests"]
        inputs, seen = [], []
        for _ in range(100):  # back to back: the daemon is still spinning when each comes
            x.normal_()
            inputs.append(x.clone())
            (out,) = client.submit(handle, [x])
            # Copied at once, on this process's stream: were the outputs handed back before
            # the device finished, the copy would hold the previous step's values.
            seen.append(out.clone())
        assert client.connection.lane.attached.doorbell is not None, "a CUDA daemon on x86-64 offers doorbells by default"
        session = client.status(session_only=True)["sessions"][0]
        assert session["doorbell"] is True and session["doorbell_requests"] - rung >= 90, session
        wrong = sum(not torch.allclose(got, model(given)[0], atol=1e-4, rtol=1e-4) for got, given in zip(seen, inputs))
        assert wrong == 0, f"{wrong} of {len(seen)} steps returned unfinished outputs"
        execution = client.last_execution
        assert execution["mode"] == "replayed" and execution["function"].endswith("[plan]"), execution


def test_a_plan_loop_slower_than_the_daemon_spins_rings_and_kicks_every_call(gpu_daemon):
    """A client calling less often than ``daemon.spin_us`` (500 us) finds the daemon's loop
    asleep every time. Its hot plan runs still go through the doorbell page, one kick each
    (``ClientDoorbell.rouse``), never as plan requests on the lane; and each returns its own
    call's finished outputs."""
    from cgtree.client import Client

    model = Deep().eval().cuda()
    with Client(gpu_daemon.endpoint, timeout_s=60) as client, torch.no_grad():
        x, handle = _hot_plan_loop(client, model)
        before = client.status(session_only=True)["sessions"][0]
        calls, wrong = 20, 0
        for _ in range(calls):
            x.normal_()
            given = x.clone()
            time.sleep(0.005)  # ten times the spin window: the loop sleeps when the call comes
            (out,) = client.submit(handle, [x])
            wrong += not torch.allclose(out.clone(), model(given)[0], atol=1e-4, rtol=1e-4)
        after = client.status(session_only=True)["sessions"][0]
        assert wrong == 0, f"{wrong} of {calls} calls returned unfinished or other outputs"
        assert after["doorbell_requests"] - before["doorbell_requests"] == calls, (before, after)
        assert after["doorbell_kicks"] - before["doorbell_kicks"] == calls, (before, after)
        assert after["lane_requests"] - before["lane_requests"] <= 1, (before, after)  # the status call itself
        assert client.last_execution["function"].endswith("[plan]"), client.last_execution


def test_weights_changed_during_a_compiled_doorbell_loop_are_used_from_the_next_call(wide_spin_daemon):
    """The compile backend checks a non-writing graph's weights between the doorbell's ring and
    its answer (``Client.submit_observing``): a weight changed in place between two calls is
    found there, the stale run's outputs are dropped, and the call returns outputs of the new
    weights (registered again), with the loop back on its doorbell afterwards."""
    from cgtree.client import Client
    from cgtree.client.compile_backend import backend

    model = Deep().eval().cuda()
    reference = Deep().eval().cuda()
    reference.load_state_dict(model.state_dict())
    with Client(wide_spin_daemon.endpoint, timeout_s=120) as client, torch.no_grad():
        compiled = torch.compile(model, backend=backend(client))
        x = torch.randn(64, 1024, device="cuda:0")
        for _ in range(60):  # past the plan's in-place recording: the loop rings the doorbell
            compiled(x)
        rung = client.status(session_only=True)["sessions"][0]["doorbell_requests"]
        for net in (model, reference):
            net.layers[5].weight.mul_(-1.0)
        (out,) = compiled(x)
        torch.testing.assert_close(out, reference(x)[0], atol=1e-4, rtol=1e-4)
        for _ in range(60):
            (out,) = compiled(x)
        torch.testing.assert_close(out, reference(x)[0], atol=1e-4, rtol=1e-4)
        session = client.status(session_only=True)["sessions"][0]
        assert session["doorbell_requests"] - rung >= 50, session  # a new plan is offered after the first calls
        assert client.compile_stats.as_dict()["graphs_in_client"] == 0


class Accumulating(torch.nn.Module):
    """A step that adds into its cache: run twice, the cache shows it (a stale run that launched
    anyway would not pass for a correct one, as an idempotent KV write might)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(64, 64)
        self.register_buffer("cache", torch.zeros(8, 64))

    def forward(self, x):
        self.cache.add_(torch.tanh(self.proj(x)))
        return self.cache * 2


def test_a_writing_graphs_doorbell_loop_is_gated_and_a_changed_weight_vetoes_the_stale_run(wide_spin_daemon):
    """A compiled step that writes its cache runs its hot plan as gated doorbell requests (the
    weight check between the ring and the launch, ``Client.submit_vetoable``). A weight changed
    in place vetoes the run before it launches: the cache is written once, with the new weight,
    and the loop goes on gated."""
    from cgtree.client import Client
    from cgtree.client.compile_backend import backend

    model = Accumulating().eval().cuda()
    reference = Accumulating().eval().cuda()
    reference.load_state_dict(model.state_dict())
    with Client(wide_spin_daemon.endpoint, timeout_s=120) as client, torch.no_grad():
        compiled = torch.compile(model, backend=backend(client))
        x = torch.randn(8, 64, device="cuda:0") * 0.1
        for _ in range(60):  # past the plan's in-place recording: the loop rings the doorbell
            compiled(x)
            reference(x)
        torch.testing.assert_close(model.cache, reference.cache)
        before = client.status(session_only=True)["sessions"][0]["gated"]
        for net in (model, reference):
            net.proj.weight.mul_(-1.0)
        out = compiled(x)
        torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.cache, reference.cache, atol=1e-4, rtol=1e-4)  # written once
        for _ in range(60):
            out = compiled(x)
            reference(x)
        torch.testing.assert_close(out, reference.cache * 2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.cache, reference.cache, atol=1e-4, rtol=1e-4)
        after = client.status(session_only=True)["sessions"][0]["gated"]
        assert after["requests"] - before["requests"] >= 50, (before, after)
        # The stale run was vetoed at its gate (or, on a loaded host, its verdict came late: not launched either).
        assert after["vetoed"] - before["vetoed"] == 1 or after["late"] > before["late"], (before, after)
        assert client.compile_stats.as_dict()["graphs_in_client"] == 0


RINGING_GPU_CLIENT = """
import json, sys, torch
from cgtree.client import Client
torch.manual_seed(int(sys.argv[2]))
layers = [torch.nn.Linear(512, 512) for _ in range(12)]
model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())]).eval().cuda()
x = torch.randn(32, 512, device="cuda")
with Client(sys.argv[1], timeout_s=60) as client, torch.no_grad():
    handle = client.register(model, [x])
    inputs, seen = [], []
    for step in range(400):
        x.normal_()
        inputs.append(x.clone())
        (out,) = client.submit(handle, [x])
        seen.append(out.clone())  # at once: an unfinished or foreign output would show here
    session = client.status(session_only=True)["sessions"][0]
    wrong = sum(not torch.allclose(got, model(given), atol=1e-4, rtol=1e-4) for got, given in zip(seen, inputs))
print(json.dumps({"wrong": wrong, "rung": session["doorbell_requests"], "doorbell": session["doorbell"]}))
"""


def test_two_processes_ringing_at_once_each_get_their_own_finished_outputs(gpu_daemon, client_scripts):
    """Two clients' plan loops through their doorbells at the same time: the daemon serves
    both pages from one loop, each done word belongs to its own page, and no client ever gets
    outputs that are unfinished or the other's."""
    procs = [client_scripts.start(RINGING_GPU_CLIENT, gpu_daemon.endpoint, str(seed)) for seed in (1, 2)]
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    for report in reports:
        assert report["doorbell"] is True and report["wrong"] == 0, reports
        assert report["rung"] >= 200, reports  # back to back: most steps find the daemon awake


PLAIN_CLIENT_WITHOUT_CUDA = """
import json, os, sys
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # as if started so: this process sees no GPU at all
os.environ["CGTREE_ENDPOINT"] = sys.argv[1]
import torch
from cgtree.client import Client, backend
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
modes, compiled_modes = [], []
with Client() as client, torch.no_grad():
    for _ in range(4):
        x = torch.randn(16, 64)
        (out,) = client.submit(model, [x])
        assert out.device.type == "cpu", out.device
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        modes.append(client.last_execution["mode"])
    compiled = torch.compile(model, backend=backend(client))
    for _ in range(4):
        x = torch.randn(16, 64)
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        compiled_modes.append(client.last_execution["mode"])
    devices = sorted(g["device"] for g in client.status(session_only=True)["sessions"][0]["graphs"])
print(json.dumps({"modes": modes, "compiled_modes": compiled_modes, "devices": devices,
                  "cuda_available": torch.cuda.is_available()}))
"""


def test_a_client_started_without_cuda_runs_on_the_daemons_gpu_with_a_plain_client(gpu_daemon, client_scripts):
    """Issue 13: CUDA_VISIBLE_DEVICES="" and Client() with no arguments: the daemon's one GPU
    runs the graphs (Client.submit and torch.compile alike), CPU outputs come back."""
    result = client_scripts.run(PLAIN_CLIENT_WITHOUT_CUDA, gpu_daemon.endpoint, timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cuda_available"] is False
    assert report["devices"] and set(report["devices"]) == {"cuda:0"}
    assert report["modes"][-2:] == ["replayed", "replayed"], report
    assert report["compiled_modes"][-2:] == ["replayed", "replayed"], report
