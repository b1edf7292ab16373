"""The client's per-submit decisions: when to spin for a reply, and when a call's inputs are
the very tensors of an earlier call (their packed descriptors are then reused)."""

import pytest
import torch

from cgtree.client.inputs import _identity_marks, _same_inputs
from cgtree.client.session import spin_while_waiting


def test_spin_only_for_a_daemon_that_serves_cuda():
    assert spin_while_waiting(1e-3, [{"device": "cuda:0", "backend": "cuda"}]) == 1e-3
    assert spin_while_waiting(1e-3, [{"device": "cpu", "backend": "cpu-replay"}]) == 0.0
    assert spin_while_waiting(1e-3, []) == 0.0
    assert spin_while_waiting(0.0, [{"backend": "cuda"}]) == 0.0


def test_same_inputs_means_same_objects_address_and_geometry():
    a, b = torch.zeros(4, 2), torch.ones(3)
    marks = _identity_marks([a, b, 2])
    assert _same_inputs(marks, [a, b, 2])
    a.add_(1)  # new data in the same buffer: still the same input
    assert _same_inputs(marks, [a, b, 2])
    assert not _same_inputs(marks, [a.clone(), b, 2])  # another tensor
    assert not _same_inputs(marks, [a, b, 3])
    assert not _same_inputs(marks, [a, b, 2.0])  # a float is not the int it equals
    a.resize_(16, 2)  # re-pointed: new storage, new geometry
    assert not _same_inputs(marks, [a, b, 2])
    c = torch.zeros(4, 2)
    marks = _identity_marks([c])
    c.set_(torch.zeros(8).untyped_storage(), 0, (4, 2), (2, 1))
    assert not _same_inputs(marks, [c])


def test_a_written_input_is_written_straight_from_its_new_value():
    """Lowering folds functionalization's extra full copy: the trailing write of a cache is
    ``copy_(cache, index_put(cache, ...))``, the shape inductor reinplaces, and the values and
    the write are unchanged."""
    from cgtree.client import lowering

    class Step(torch.nn.Module):
        def forward(self, cache, x, pos):
            cache.index_copy_(0, pos, x)
            return cache.sum(0)

    cache, x, pos = torch.zeros(5, 3), torch.randn(1, 3), torch.tensor([2])
    lowered = lowering.lower(Step(), [cache.clone(), x, pos])
    graph = lowered.graph_module.graph
    assert lowered.mutated_inputs == (0,)
    assert not [n for n in graph.nodes if n.target is torch.ops.aten.copy.default]
    (write,) = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert write.args[0].op == "placeholder" and write.args[1].target is not torch.ops.aten.copy.default
    expected_cache = cache.clone().index_copy_(0, pos, x)
    out = lowered.graph_module(*lowered.weights, cache, x, pos)
    torch.testing.assert_close(cache, expected_cache)
    torch.testing.assert_close(out[0], expected_cache.sum(0))


def test_cpu_inputs_go_to_the_daemons_only_device_unless_a_device_is_named(monkeypatch):
    """Client.target_device: a client without CUDA needs no device argument when the daemon
    serves one device; CUDA inputs, an explicit device, Client(device=) and $CGTREE_DEVICE win."""
    import pytest as _pytest

    from cgtree.client.client import Client, ClientError

    monkeypatch.delenv("CGTREE_DEVICE", raising=False)
    client = Client("ipc:///nonexistent/cgtree-target-device")
    try:
        client.session_id = 1  # as after hello: no daemon needed for the decision
        x = torch.randn(2)
        client.devices = [{"device": "cuda:0"}]
        assert client.target_device(None, [x]) == "cuda:0"
        assert client.target_device("cpu", [x]) == "cpu"
        client.devices = [{"device": "cpu"}, {"device": "cuda:0"}]
        assert client.target_device(None, [x]) == "cpu"
        client.devices = [{"device": "cuda:0"}, {"device": "cuda:1"}]
        with _pytest.raises(ClientError, match="name the device"):
            client.target_device(None, [x])
        client.default_device = "cuda:1"
        assert client.target_device(None, [x]) == "cuda:1"
    finally:
        client.close(timeout_s=0.1)
    monkeypatch.setenv("CGTREE_DEVICE", "cuda")
    named = Client("ipc:///nonexistent/cgtree-target-device", device=None)
    try:
        assert named.default_device == "cuda:0"
    finally:
        named.close(timeout_s=0.1)


def test_an_observation_runs_once_and_raises_what_it_raised_only_when_read():
    """``Client.submit_observing``'s check runs between a doorbell's ring and its answer: an
    exception there must wait for the submit to finish, and a retried submit must not run it twice."""
    from cgtree.client.plans import Observation

    calls = []
    observation = Observation(lambda: calls.append(1) or len(calls))
    observation.run()
    observation.run()
    assert observation.result() == 1 and calls == [1]

    def broken():
        raise ValueError("weights unreadable")

    failing = Observation(broken)
    failing.run()  # kept, not raised: a request is in flight
    with pytest.raises(ValueError, match="weights unreadable"):
        failing.result()
