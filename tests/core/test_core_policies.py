"""Skips and policies: mutation, devices, symbolic and dynamic shapes, static inputs, RNG,
generations and overwritten outputs (the seed's skip/mutation/rng tests, ported)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cgtree.errors import ManagerClosedError
from core_helpers import make_manager  # noqa: F401 (fixture)

SKIP_LOGGER = "cgtree.skips"


def skip_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SKIP_LOGGER]


def test_mutation_on_input_skips_with_trace(make_manager, device, caplog):
    mgr = make_manager(support_input_mutation=True)

    def foo(x):
        x.add_(2)
        return x

    f = mgr.cudagraphify(foo, name="foo")
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        for _ in range(3):
            x = torch.ones([10], device=device)
            out = f(x)
            torch.testing.assert_close(x, torch.full([10], 3.0, device=device))
            assert out is x or out.data_ptr() == x.data_ptr()
    messages = skip_messages(caplog)
    assert len(messages) == 1
    assert "skipping cudagraphs due to mutated inputs (1 instances). Found from" in messages[0]
    assert "x.add_(2)" in messages[0]
    assert mgr.counters["skips"] == 1
    assert mgr.counters["skipped_calls"] == 3
    # mutation of a caller's input never reaches graphs
    assert mgr.root_children() == []
    assert mgr.last_execution.mode.value == "skipped"


def test_mutation_of_static_buffer_runs_under_graphs(make_manager, device):
    mgr = make_manager(support_input_mutation=True)
    buf = torch.ones([10], device=device)
    ref_buf = torch.ones([10], device=device)

    def step(buffer, x):
        buffer.add_(x)
        return buffer + x

    f = mgr.cudagraphify(step, static_input_idxs=(0,), name="step")
    for _ in range(3):
        x = torch.ones([10], device=device)
        torch.testing.assert_close(f(buf, x), step(ref_buf, x.clone()))
        torch.testing.assert_close(buf, ref_buf)
    assert mgr.counters["skips"] == 0
    assert mgr.counters["replays"] == 1


def test_mutation_of_a_static_buffer_stays_under_graphs(make_manager, device):
    """As in PyTorch's trees (seed test_mutation_on_inp, second half): a static input (a buffer,
    a KV cache) written in place is used in place, so the write reaches it; no skip, whatever
    ``support_input_mutation`` says (that flag is about tree-managed inputs)."""
    mgr = make_manager(support_input_mutation=False)
    buf = torch.ones([10], device=device)
    f = mgr.cudagraphify(lambda b, x: b.add_(x) * 2, static_input_idxs=(0,), name="step")
    for step in range(2, 6):
        out = f(buf, torch.ones([10], device=device))
        torch.testing.assert_close(buf, torch.full([10], float(step), device=device))
        torch.testing.assert_close(out, 2 * buf)
    assert mgr.counters["skips"] == 0 and mgr.root_children() == [0]
    assert mgr.last_execution.mode.value == "replayed"


def mutation_fixture(mgr):
    foo = mgr.cudagraphify(lambda x: x + 1, name="foo")

    def mut(x):
        x.add_(2)
        return x

    return foo, mgr.cudagraphify(mut, name="mut")


@pytest.mark.parametrize("supported", [True, False])
def test_mutation_cudagraph_managed_tensors(make_manager, device, caplog, supported):
    mgr = make_manager(support_input_mutation=supported)
    foo, mut = mutation_fixture(mgr)
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        for _ in range(3):
            mgr.mark_step_begin()
            inp = torch.rand([4], device=device)
            tmp = foo(inp)
            mut_out = mut(tmp)
            torch.testing.assert_close(mut_out, inp + 3)
    assert len(skip_messages(caplog)) == (0 if supported else 1)
    if supported:
        assert mgr.counters["skips"] == 0
        assert mgr.root_children() == [1]
        # an eager tensor (no longer tree-managed) being mutated falls back to eager
        mgr.mark_step_begin()
        inp = torch.rand([4], device=device)
        mut_inp = foo(inp).clone()
        with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
            mut(mut_inp)
        torch.testing.assert_close(mut_inp, inp + 3)
        assert mgr.counters["skips"] == 1
        assert "mutated inputs (1 instances)" in skip_messages(caplog)[-1]


def test_mutation_warns_only_once_per_function(make_manager, device, caplog):
    mgr = make_manager(support_input_mutation=True)
    foo, mut = mutation_fixture(mgr)
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        mut(torch.rand([4], device=device))  # warns: not tree-managed
        for _ in range(3):
            mgr.mark_step_begin()
            tmp = foo(torch.rand([4], device=device))
            mut(tmp)  # tree-managed: graphed, no warning
        mut(tmp.clone())  # would warn, but mut already has
    assert len(skip_messages(caplog)) == 1
    assert mgr.counters["skips"] == 1
    assert mgr.counters["skipped_calls"] == 2


def test_mutation_reinplaced_out_argument(make_manager, device, caplog):
    mgr = make_manager()

    def fn(a, b, out):
        return torch.logical_xor(input=a, other=b, out=out)

    f = mgr.cudagraphify(fn, name="xor")
    x, y = torch.rand([2, 9], device=device), torch.rand([2, 9], device=device)
    z = torch.rand([2, 9], device=device).half()
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        f(x, y, z)
    message = skip_messages(caplog)[0]
    assert "mutated inputs (1 instances). Found from" in message and "torch.logical_xor" in message
    assert mgr.counters["skips"] == 1


def test_skip_warmup_records_first_call_and_aborts_on_mutation(make_manager, device):
    mgr = make_manager(skip_warmup=True)

    def bump(x):
        x.mul_(2)
        return x.sum()

    f = mgr.cudagraphify(bump, name="bump")
    x = torch.ones([4], device=device)
    f(x)
    torch.testing.assert_close(x, torch.full([4], 2.0, device=device))  # ran once, eagerly
    assert mgr.last_execution.mode.value == "skipped"
    assert mgr.counters["recordings"] == 0 and mgr.root_children() == []


def test_incompatible_op_is_skipped(make_manager, device, caplog):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x.nonzero(), name="nz")
    x = torch.tensor([0.0, 1.0, 2.0], device=device)
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        for _ in range(3):
            torch.testing.assert_close(f(x), x.nonzero())
    message = skip_messages(caplog)[0]
    assert "skipping cudagraphs due to incompatible op aten.nonzero" in message
    assert mgr.counters["skips"] == 1 and mgr.counters["skipped_calls"] == 3
    assert mgr.status()["skips"]["by_reason"] == {"incompatible op": 1}


def test_skip_symbolic(make_manager, device, caplog):
    mgr = make_manager(skip_dynamic_graphs=True)
    f = mgr.cudagraphify(lambda x, y: x + y, name="add", dynamic=True)
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        out = f(torch.ones([10], device=device), torch.ones([10], device=device))
    torch.testing.assert_close(out, torch.full([10], 2.0, device=device))
    assert "skipping cudagraphs due to graph with symbolic shapes inputs" in skip_messages(caplog)[0]
    assert mgr.counters["skips"] == 1


def test_cpu_input_to_cuda_graph_skips(make_manager, device, caplog):
    if device == "cpu":
        pytest.skip("a CPU tensor is the normal input of the CPU backend")
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x, y: (x + 1, y + 2), name="foo")
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        f(torch.ones([10], device=device), torch.ones([20]))
    assert "skipping cudagraphs due to cpu device (arg1)" in skip_messages(caplog)[0]
    assert mgr.counters["skips"] == 1


def test_cpu_inputs_moved_to_device_when_policy_says_so(make_manager, device):
    if device == "cpu":
        pytest.skip("nothing to move on the CPU backend")
    mgr = make_manager(move_cpu_inputs_to_device=True)
    f = mgr.cudagraphify(lambda x, y: x + y, name="foo")
    for _ in range(3):
        out = f(torch.ones([4], device=device), torch.ones([4]))
    torch.testing.assert_close(out, torch.full([4], 2.0, device=device))
    assert mgr.counters["skips"] == 0 and mgr.counters["replays"] == 1


def test_input_on_foreign_device_is_skipped(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x + 1, name="foo")
    f(torch.ones([3], device="meta"))
    assert mgr.last_execution.mode.value == "skipped"
    assert "device mismatch (arg0 on meta" in mgr.last_execution.skip_reason


def rng_fn(device):
    return lambda: torch.rand([20], device=device)


def test_rng_replays_match_eager_after_reseed(make_manager, device):
    mgr = make_manager()
    foo = mgr.cudagraphify(rng_fn(device), name="rand")
    torch.manual_seed(0)
    first = [foo().clone() for _ in range(4)]
    assert len({tuple(t.tolist()) for t in first}) == 4  # fresh numbers every call
    torch.manual_seed(0)
    again = [foo().clone() for _ in range(4)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    eager = [torch.rand([20], device=device) for _ in range(4)]
    for a, b in zip(first, eager):
        torch.testing.assert_close(a, b)


def test_dynamic_shapes_record_per_shape_and_warn_past_limit(make_manager, device, caplog):
    mgr = make_manager(dynamic_shape_warn_limit=2)
    f = mgr.cudagraphify(lambda x: x * 2, name="double")
    with caplog.at_level(logging.WARNING, logger="cgtree.manager"):
        for size in (2, 3, 4, 5):
            for _ in range(3):
                x = torch.randn(size, device=device)
                torch.testing.assert_close(f(x), x * 2)
    assert mgr.counters["recordings"] == 4
    assert mgr.counters["dynamic_shape_warnings"] == 1
    assert sum("distinct input shapes" in r.getMessage() for r in caplog.records) == 1


def test_capture_sizes_allow_list(make_manager, device):
    mgr = make_manager(capture_sizes=[4, 8])
    f = mgr.cudagraphify(lambda x: x + 1, name="inc")
    for _ in range(3):
        f(torch.ones(4, 2, device=device))
    assert mgr.last_execution.mode.value == "replayed"
    out = f(torch.ones(3, 2, device=device))
    torch.testing.assert_close(out, torch.full([3, 2], 2.0, device=device))
    assert mgr.last_execution.mode.value == "skipped"
    assert "size not in capture_sizes (3; allowed: 4, 8)" == mgr.last_execution.skip_reason


def test_static_input_moved_records_sibling_until_rerecord_limit(make_manager, device, caplog):
    mgr = make_manager(rerecord_limit=1)
    f = mgr.cudagraphify(lambda w, x: x @ w, static_input_idxs=(0,), name="linear")
    x = torch.randn(2, 4, device=device)
    weights = [torch.randn(4, 4, device=device) for _ in range(3)]
    for _ in range(2):
        torch.testing.assert_close(f(weights[0], x), x @ weights[0])
    assert mgr.last_execution.mode.value == "recorded"
    torch.testing.assert_close(f(weights[0], x), x @ weights[0])
    assert mgr.last_execution.mode.value == "replayed"
    torch.testing.assert_close(f(weights[1], x), x @ weights[1])
    assert mgr.last_execution.mode.value == "recorded"
    assert mgr.root_children() == [0, 0] and mgr.counters["rerecords"] == 1
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        torch.testing.assert_close(f(weights[2], x), x @ weights[2])
    assert mgr.last_execution.mode.value == "skipped"
    assert "re-recording limit (1) exceeded" in skip_messages(caplog)[0]
    assert "static input 0 moved" in skip_messages(caplog)[0]


def test_overwritten_output_is_detected(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x * 3, name="triple")
    x = torch.ones(4, device=device)
    for _ in range(3):
        f(x)
    kept = f(x)
    assert mgr.last_execution.mode.value == "replayed"
    before = mgr.counters["overwritten_outputs"]
    f(x * 2)
    assert mgr.counters["overwritten_outputs"] == before + 1
    if mgr.status()["overwrite_detection"] == "raises":
        with pytest.raises(RuntimeError, match="overwritten by a subsequent run"):
            kept + 1
    else:
        # CPU replay cannot make access raise: the tensor shows the new values, the counter says so
        torch.testing.assert_close(kept, torch.full([4], 6.0, device=device))


def test_overwritten_recording_output_is_detected(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x * 3, name="triple")
    x = torch.ones(4, device=device)
    f(x)
    recorded = f(x)
    assert mgr.last_execution.mode.value == "recorded"
    mgr.mark_step_begin()
    f(x)
    assert mgr.counters["overwritten_outputs"] == 1
    if mgr.status()["overwrite_detection"] == "raises":
        with pytest.raises(RuntimeError, match="clone it"):
            recorded.sum()


def test_pending_backward_keeps_generation_until_backward(make_manager, device):
    mgr = make_manager()
    fwd = mgr.cudagraphify(lambda x: (x * 2, x), name="fwd", kind="forward")
    bwd = mgr.cudagraphify(lambda g, x: g * 2, name="bwd", kind="backward", top_level=False)
    x = torch.ones(3, device=device)
    for _ in range(3):
        out, saved = fwd(x)
        grad = bwd(torch.ones(3, device=device), saved)
        torch.testing.assert_close(grad, torch.full([3], 2.0, device=device))
    assert mgr.root_children() == [1]  # the backward is recorded as a child of its forward
    del out, saved, grad
    before = mgr.counters["overwritten_outputs"]
    out, saved = fwd(x)
    # a second top-level forward while one awaits its backward: no new generation, so the
    # first forward's outputs stay valid (the second is recorded as a child instead)
    out2, _ = fwd(x)
    assert mgr.counters["overwritten_outputs"] == before
    torch.testing.assert_close(out, torch.full([3], 2.0, device=device))
    mgr.mark_step_begin()  # the way out when a backward never comes
    fwd(x)
    assert mgr.counters["overwritten_outputs"] == before + 2


def test_status_is_json_and_names_backend(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x + 1, name="inc")
    for _ in range(3):
        f(torch.ones(2, device=device))
    status = json.loads(json.dumps(mgr.status()))
    assert status["backend"] == ("cuda" if device.startswith("cuda") else "cpu-replay")
    assert status["nodes"] == [
        {"id": 0, "function": "inc", "parent": None, "children": [], "mode": "replayed", "replays": 1, "depth": 0}
    ]
    assert status["pool"]["bytes"] > 0
    assert status["counters"]["warmups"] == 1 and status["counters"]["recordings"] == 1


def test_close_frees_everything_and_refuses_calls(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x + 1, name="inc")
    for _ in range(3):
        out = f(torch.ones(2, device=device))
    mgr.close()
    assert mgr.status()["pool"]["bytes"] == 0
    with pytest.raises(ManagerClosedError):
        f(torch.ones(2, device=device))
    del out


def test_function_that_cannot_be_recorded_runs_eagerly(make_manager, device, caplog):
    mgr = make_manager(skip_warmup=True)
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        return x + 1

    f = mgr.cudagraphify(flaky, name="flaky")
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        out = f(torch.ones(2, device=device))
    torch.testing.assert_close(out, torch.full([2], 2.0, device=device))
    assert "skipping cudagraphs due to capture failed (RuntimeError: operation not permitted" in skip_messages(caplog)[0]
    f(torch.ones(2, device=device))
    assert mgr.last_execution.mode.value == "skipped" and mgr.counters["recordings"] == 0


def test_genuine_error_in_function_reaches_the_caller(make_manager, device):
    mgr = make_manager()

    def broken(x):
        raise ValueError("bad input shape")

    f = mgr.cudagraphify(broken, name="broken")
    with pytest.raises(ValueError, match="bad input shape"):
        f(torch.ones(2, device=device))
    with pytest.raises(ValueError, match="bad input shape"):
        f(torch.ones(2, device=device))
