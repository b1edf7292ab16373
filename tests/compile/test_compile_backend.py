"""The in-process backend's own plumbing: registration, invocations and steps, resets, options,
static inputs, training, routing. (The seed's behaviours are in tests/seed.)"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import cgtree.compile as cgtree_compile


def test_backend_is_found_by_name():
    fn = torch._dynamo.lookup_backend("cgtree")
    assert fn is cgtree_compile.cgtree_backend


def test_package_declares_the_dynamo_entry_point():
    points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    if "cgtree" not in points.names:
        pytest.skip("cgtree is not installed as a package here (no entry points)")
    assert points["cgtree"].value == "cgtree.compile:cgtree_backend"
    assert points["cgtree"].load() is cgtree_compile.cgtree_backend


def test_unknown_options_are_refused():
    f = torch.compile(lambda x: x + 1, backend="cgtree", options={"compiler": "tvm"})
    with pytest.raises(Exception, match="compiler"):
        f(torch.ones(2))
    with pytest.raises(Exception, match="unknown cgtree backend option"):
        torch.compile(lambda x: x * 2, backend="cgtree", options={"warp_speed": 9})(torch.ones(1))
    with pytest.raises(ValueError):
        cgtree_compile.backend("tvm")


def test_each_compiled_call_is_a_new_invocation():
    """Two compiled functions called one after the other: the second call is a new top-level
    invocation, so the first one's (replayed) output is given up for the new generation."""
    double = torch.compile(lambda x: x * 2, backend="cgtree")
    inc = torch.compile(lambda x: x + 1, backend="cgtree")
    x = torch.ones(4)
    for _ in range(3):
        a = double(x)
        b = inc(x)
    mgr = cgtree_compile.get_manager("cpu")
    before = mgr.counters["overwritten_outputs"]
    a = double(x)  # a replay: a new generation starts, b's memory may be reused
    assert mgr.counters["overwritten_outputs"] == before + 1
    torch.testing.assert_close(a, x * 2)
    del b


def test_marked_steps_replace_invocations_also_through_the_original_function():
    double = torch.compile(lambda x: x * 2, backend="cgtree")
    inc = torch.compile(lambda x: x + 1, backend="cgtree")
    x = torch.ones(4)
    double(x)
    mgr = cgtree_compile.get_manager("cpu")
    # A caller holding PyTorch's own function (bound before cgtree wrapped it) still counts.
    original = torch.compiler.cudagraph_mark_step_begin.__cgtree_wraps__
    for _ in range(3):
        original()
        a = double(x)
        b = inc(a)  # same step: no new generation, a stays valid as b's input
        torch.testing.assert_close(b, x * 2 + 1)
    before = mgr.counters["overwritten_outputs"]
    double(x)
    inc(x)  # no step marked: still the same generation, nothing overwritten
    assert mgr.counters["overwritten_outputs"] == before
    torch.compiler.cudagraph_mark_step_begin()  # the wrapped one marks the step directly
    double(x)
    assert mgr.counters["overwritten_outputs"] > before


def test_dynamo_reset_closes_the_managers_and_graphs_move_on():
    f = torch.compile(lambda x: x * 3, backend="cgtree")
    x = torch.ones(3)
    for _ in range(3):
        f(x)
    first = cgtree_compile.get_manager("cpu")
    torch._dynamo.reset()
    assert cgtree_compile.managers() == {}
    assert first.status()["closed"]
    torch.testing.assert_close(f(x), x * 3)  # recompiled onto a new manager
    assert cgtree_compile.get_manager("cpu") is not first


def test_configure_sets_the_policy_of_new_and_existing_managers():
    policy = cgtree_compile.configure(skip_warmup=True)
    assert policy.skip_warmup and policy.support_input_mutation  # the backend's default stays
    f = torch.compile(lambda x: x - 1, backend="cgtree")
    f(torch.ones(2))
    mgr = cgtree_compile.get_manager("cpu")
    assert mgr.policy.skip_warmup and mgr.last_execution.mode.value == "recorded"


def test_parameters_are_static_inputs():
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lin, backend="cgtree")
    x = torch.randn(2, 4)
    with torch.no_grad():
        for _ in range(3):
            f(x)
        mgr = cgtree_compile.get_manager("cpu")
        assert mgr.last_execution.mode.value == "replayed"
        # updated in place: used in place, so the replay sees the new values
        lin.weight.add_(1.0)
        torch.testing.assert_close(f(x), lin(x))
        assert mgr.last_execution.mode.value == "replayed"
        # replaced by another tensor: the recorded address no longer holds, so a re-recording
        lin.weight = torch.nn.Parameter(torch.randn(4, 4))
        torch.testing.assert_close(f(x), lin(x))
        torch.testing.assert_close(f(x), lin(x))
    assert mgr.counters["rerecords"] >= 1


def test_training_steps_match_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="cgtree")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(4):
        x, y = torch.randn(5, 8), torch.randn(5, 4)
        for net, optimizer in ((compiled, opt), (reference, ref_opt)):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            optimizer.step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected)
    mgr = cgtree_compile.get_manager("cpu")
    assert mgr.root_children() == [1]  # forward root, backward child
    assert mgr.counters["replays"] >= 4


def test_symbolic_graphs_record_per_shape():
    f = torch.compile(lambda x: x * x, backend="cgtree", dynamic=True)
    for size in (3, 5, 3, 5, 3, 5):
        x = torch.randn(size)
        torch.testing.assert_close(f(x), x * x)
    mgr = cgtree_compile.get_manager("cpu")
    assert mgr.counters["recordings"] == 2 and mgr.counters["skips"] == 0


def test_graph_without_tensors_on_cpu_or_cuda_runs_outside_the_trees():
    f = torch.compile(lambda x: x + 1, backend="cgtree")
    out = f(torch.ones(2, device="meta"))
    assert out.device.type == "meta"
    assert cgtree_compile.managers() == {}


def test_higher_order_op_runs_without_graphs(log_lines):
    def fn(x):
        return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))

    f = torch.compile(fn, backend="cgtree")
    for sign in (1.0, -1.0, 1.0):
        x = torch.full([3], sign)
        torch.testing.assert_close(f(x), fn(x))
    assert any("higher-order op" in line for line in log_lines("cgtree.compile"))


def test_skip_messages_point_at_the_users_line(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="cgtree.skips")

    def scale_in_place(x):
        x.mul_(3)  # the line the message must show
        return x.sum()

    f = torch.compile(scale_in_place, backend="cgtree")
    f(torch.ones(3))
    (message,) = [r.getMessage() for r in caplog.records if r.name == "cgtree.skips"]
    assert f'File "{__file__}"' in message and "x.mul_(3)  # the line the message must show" in message
