"""cgtree.in_place_inputs: the per-replay address check gives the Python loop's answer, whether
the C++ check of CUDA builds runs it or not (an emulation of its contract stands in on CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgtree import in_place_inputs
from cgtree.in_place_inputs import BATCHED_FROM, InPlaceInputs
from core_helpers import make_manager  # noqa: F401 (fixture)


def reference_first_moved(pairs, inputs):
    return next((position for position, pointer in pairs if inputs[position].data_ptr() != pointer), None)


class CppContract:
    """What torch/csrc/cuda/Module.cpp's check accepts and answers: lists only, both indexed by
    input position; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensors, data_ptrs, indices) -> bool:
        self.calls += 1
        if not (type(tensors) is list and type(data_ptrs) is list and type(indices) is list):
            raise TypeError("incompatible function arguments")
        return all(tensors[i].data_ptr() == data_ptrs[i] for i in indices)


def recorded(count: int, skip_every: int = 3):
    """Inputs of a recording: tensors, with non-in-place positions between them."""
    inputs = [torch.zeros(2) if i % skip_every else torch.ones(1) for i in range(count)]
    pairs = [(i, t.data_ptr()) for i, t in enumerate(inputs) if i % skip_every]
    return inputs, pairs


@pytest.mark.parametrize("as_tuple", [False, True])
def test_unchanged_inputs_pass_with_one_call_of_the_batched_check(as_tuple):
    inputs, pairs = recorded(30)
    check = CppContract()
    given_inputs = tuple(inputs) if as_tuple else inputs
    assert InPlaceInputs(pairs).first_moved(given_inputs, all_at_addresses=check) is None
    assert check.calls == 1


def test_a_moved_input_is_named_by_the_loop_after_the_batched_check_says_no():
    inputs, pairs = recorded(30)
    moved_at = pairs[5][0]
    inputs[moved_at] = torch.zeros(2)  # another storage at that position
    check = CppContract()
    assert InPlaceInputs(pairs).first_moved(inputs, all_at_addresses=check) == moved_at
    assert check.calls == 1


def test_a_check_that_cannot_take_the_arguments_leaves_the_answer_to_the_loop():
    inputs, pairs = recorded(12)
    inputs[pairs[-1][0]] = torch.zeros(2)

    def refuses(*args):
        raise TypeError("incompatible function arguments")

    assert InPlaceInputs(pairs).first_moved(inputs, all_at_addresses=refuses) == pairs[-1][0]


def test_cpu_builds_and_small_recordings_use_the_loop(monkeypatch):
    check = CppContract()
    monkeypatch.setattr(in_place_inputs, "_ALL_AT_ADDRESSES", check)
    inputs, pairs = recorded(BATCHED_FROM)  # fewer in-place positions than BATCHED_FROM
    assert len(pairs) < BATCHED_FROM
    assert InPlaceInputs(pairs).first_moved(inputs) is None and check.calls == 0
    inputs, pairs = recorded(3 * BATCHED_FROM)
    assert InPlaceInputs(pairs).first_moved(inputs) is None and check.calls == 1
    monkeypatch.setattr(in_place_inputs, "_ALL_AT_ADDRESSES", None)
    assert InPlaceInputs(pairs).first_moved(inputs) is None and check.calls == 1


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 40), moved=st.sets(st.integers(0, 39)), batched=st.booleans())
def test_first_moved_is_the_loops_answer(count, moved, batched):
    inputs, pairs = recorded(count, skip_every=2)
    for position in moved:
        if position < count:
            inputs[position] = torch.zeros(2)
    check = CppContract() if batched else None
    assert InPlaceInputs(pairs).first_moved(inputs, all_at_addresses=check) == reference_first_moved(pairs, inputs)


def chain(*args):
    """Twelve weights then an input: a function with many inputs read in place."""
    *ws, x = args
    for w in ws:
        x = torch.tanh(x @ w)
    return x


def test_a_manager_with_many_static_inputs_replays_them_and_notices_one_that_moved(make_manager, device):
    """Twelve weights read in place (the batched check on CUDA builds, the loop on CPU): the
    steady state replays, and a weight that moved makes a new recording, not a stale replay."""
    mgr = make_manager()
    weights = [torch.randn(4, 4, device=device) for _ in range(12)]

    f = mgr.cudagraphify(chain, static_input_idxs=tuple(range(12)), name="chain")
    x = torch.randn(2, 4, device=device)
    for _ in range(3):
        f(*weights, x)
    torch.testing.assert_close(f(*weights, x), chain(*weights, x))
    assert mgr.last_execution.mode.value == "replayed"
    assert len(mgr._nodes[0].in_place_inputs) == 12
    if device.startswith("cuda"):
        assert in_place_inputs._ALL_AT_ADDRESSES is not None, "CUDA builds of torch ship the batched check"
    moved = list(weights)
    moved[7] = weights[7].clone() * 2  # same shape, another address
    torch.testing.assert_close(f(*moved, x), chain(*moved, x))
    assert mgr.last_execution.mode.value == "recorded"
    assert mgr.counters["rerecords"] == 1


def test_fixed_static_inputs_are_checked_at_recording_only_and_tree_managed_ones_still_per_replay(make_manager, device):
    """``static_inputs_fixed`` (a daemon plan's in-place recording): no per-replay check of the
    twelve weights, yet the steady state replays and matches; an input that is a parent graph's
    output (tree-managed) is still checked on every replay."""
    mgr = make_manager()
    weights = [torch.randn(4, 4, device=device) for _ in range(12)]

    def first(x):
        return x * 2

    parent = mgr.cudagraphify(first, name="first")
    fixed = mgr.cudagraphify(chain, static_input_idxs=tuple(range(12)), name="chain", static_inputs_fixed=True,
                             top_level=False)
    x = torch.randn(2, 4, device=device)
    for _ in range(4):
        mgr.begin_invocation()
        out = fixed(*weights, parent(x))
    torch.testing.assert_close(out, chain(*weights, x * 2))
    assert mgr.last_execution.mode.value == "replayed"
    node = mgr._nodes[mgr.last_execution.node_id]
    assert node.static_idxs == frozenset(range(12))
    assert [position for position, _ in node.in_place_inputs.pairs] == [12], "only the parent's output is checked"

    plain = mgr.cudagraphify(chain, static_input_idxs=tuple(range(12)), name="plain")
    for _ in range(3):
        plain(*weights, x)
    plain_node = mgr._nodes[mgr.last_execution.node_id]
    assert len(plain_node.in_place_inputs) == 12, "without the promise every weight is checked per replay"
