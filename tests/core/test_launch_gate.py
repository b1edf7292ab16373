"""``TreeManager.launch_gate``: a caller's gate for its next call, passed once after the call's
decisions and before anything runs. A gate that refuses (``LaunchVetoed``) leaves the tree, the
inputs and the counters as they were, at every stage of a graph's life: warmup, recording,
replay, and a call the policies send around the graphs. cgtreed's gated plan runs rely on it
(``cgtree.daemon.doorbell``, ``tests/daemon/test_plans.py``)."""

from __future__ import annotations

import pytest
import torch

from cgtree import Policy
from cgtree.errors import LaunchVetoed
from cgtree.manager import TreeManager


class Gate:
    def __init__(self, launch: bool) -> None:
        self.launch, self.calls = launch, 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.launch:
            raise LaunchVetoed("the test vetoes")


def _step(cache, x):
    cache.add_(x)  # a static input the graph writes, as a decoder step writes its KV cache
    return cache * 2


def _vetoed_changes_nothing(mgr: TreeManager, fn, cache: torch.Tensor, x: torch.Tensor) -> None:
    counters, cache_before, invocation = dict(mgr.counters), cache.clone(), mgr._invocation
    last = mgr.last_execution
    gate = mgr.launch_gate = Gate(False)
    with pytest.raises(LaunchVetoed):
        fn(cache, x)
    assert gate.calls == 1 and mgr.launch_gate is None  # one call's gate, called once
    assert mgr.counters == counters and mgr._invocation == invocation and mgr.last_execution is last
    torch.testing.assert_close(cache, cache_before)


def test_a_vetoed_call_runs_nothing_at_any_stage_and_the_next_call_goes_on_as_if_it_never_was(device):
    mgr = TreeManager(device, policy=Policy(skip_warmup=False))
    try:
        fn = mgr.cudagraphify(_step, static_input_idxs=(0,), name="step")
        cache, x = torch.zeros(4, device=device), torch.ones(4, device=device)
        modes = []
        for step in range(5):
            _vetoed_changes_nothing(mgr, fn, cache, x)
            gate = mgr.launch_gate = Gate(True)
            out = fn(cache, x)
            assert gate.calls == 1
            modes.append(mgr.last_execution.mode.value)
            torch.testing.assert_close(cache, torch.full((4,), float(2 * step + 1), device=device))
            torch.testing.assert_close(out, cache * 2)
            del out
            fn(cache, x)  # and without a gate, as before
            modes.append(mgr.last_execution.mode.value)
        assert modes[:3] == ["warmup", "recorded", "replayed"] and set(modes[3:]) == {"replayed"}, modes
        assert mgr.counters["skipped_calls"] == 0
    finally:
        mgr.close()


def test_a_call_the_policies_send_around_the_graphs_passes_the_gate_first(device):
    mgr = TreeManager(device, policy=Policy(capture_sizes=(8,)))  # batch 4 is not captured: skipped
    try:
        fn = mgr.cudagraphify(lambda x: (x * 3,), name="skipped")
        x = torch.ones(4, 2, device=device)
        fn(x)
        assert mgr.last_execution.mode.value == "skipped"
        skipped = mgr.counters["skipped_calls"]
        gate = mgr.launch_gate = Gate(False)
        with pytest.raises(LaunchVetoed):
            fn(x)
        assert gate.calls == 1 and mgr.counters["skipped_calls"] == skipped
        gate = mgr.launch_gate = Gate(True)
        (out,) = fn(x)
        assert gate.calls == 1 and mgr.counters["skipped_calls"] == skipped + 1
        torch.testing.assert_close(out, x * 3)
    finally:
        mgr.close()
