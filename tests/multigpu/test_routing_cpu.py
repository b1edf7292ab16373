"""The multi-device decisions without GPUs (CI): routing by the inputs' device in the client,
one independent tree manager per device, and the cross-device skip rules."""

from __future__ import annotations

import torch

from cgtree import policy as rules
from cgtree.manager import TreeManager


def test_the_client_routes_a_call_to_its_first_cuda_inputs_device():
    from cgtree.client.inputs import _device_of

    assert _device_of([torch.ones(2), 3]) == "cpu"
    meta_like = [torch.empty(2, device="meta")]
    assert _device_of(meta_like) == "cpu"  # only CUDA inputs pick a CUDA device


def test_inputs_on_two_devices_are_not_graphed_and_a_cpu_input_names_its_argument():
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert str(rules.device_skip_reason(cuda0, [("arg0", cuda0), ("arg1", cuda1)], move_cpu_inputs=False)) == "multiple devices"
    assert str(rules.device_skip_reason(cuda1, [("arg0", cuda1), ("arg1", torch.device("cpu"))], move_cpu_inputs=False)) == "cpu device (arg1)"
    assert rules.device_skip_reason(cuda1, [("arg0", cuda1)], move_cpu_inputs=False) is None


def test_two_managers_keep_separate_trees_pools_and_counters():
    first, second = TreeManager("cpu"), TreeManager("cpu")
    try:
        f = first.cudagraphify(lambda x: x + 1, name="f")
        g = second.cudagraphify(lambda x: x * 2, name="g")
        for _ in range(3):
            f(torch.ones(3))
        g(torch.ones(3))
        assert first.counters["replays"] == 1 and second.counters["replays"] == 0
        assert first.root_children() == [0] and second.root_children() == []
        assert first.status()["pool"]["bytes"] > 0 and second.status()["pool"]["bytes"] == 0
        first.close()
        torch.testing.assert_close(g(torch.ones(3)), torch.full([3], 2.0))  # the other device keeps serving
    finally:
        first.close()
        second.close()
