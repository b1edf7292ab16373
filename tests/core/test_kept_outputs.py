"""A graph output the caller keeps as its own state (a KV cache a compiled prefill created)
and passes back as a static input that later graphs write: moved out of the pool before its
path ends, so the next generation neither overwrites nor invalidates it."""

from __future__ import annotations

import torch

from cgtree import Policy
from cgtree.manager import TreeManager


def _create(x):
    return torch.zeros(4, device=x.device) + x.sum()


def _accumulate(state, x):
    state.add_(x)
    return state * 2


def test_a_kept_output_written_as_static_state_survives_generations(device):
    mgr = TreeManager(device, policy=Policy(skip_warmup=False))
    try:
        create = mgr.cudagraphify(_create, name="create")
        accumulate = mgr.cudagraphify(_accumulate, static_input_idxs=(0,), name="accumulate")
        expected = None
        for step in range(5):
            x = torch.full((4,), float(step + 1), device=device)
            if step % 2 == 0:  # a new "generate": the state is created by a graph and kept
                state = create(x)
                expected = torch.full((4,), float(4 * (step + 1)), device=device)
            out = accumulate(state, x)
            expected = expected + x
            torch.testing.assert_close(state, expected)
            torch.testing.assert_close(out, expected * 2)
            del out  # only the kept state outlives the step: nothing else may count as overwritten
        assert mgr.counters["relocated_outputs"] >= 1
        assert mgr.counters["overwritten_outputs"] == 0
        assert mgr.counters["skipped_calls"] == 0
    finally:
        mgr.close()


def test_parameters_are_not_checked_once_the_first_run_showed_what_is_written(device):
    mgr = TreeManager(device, policy=Policy(skip_warmup=False))
    try:
        weight = torch.ones(4, device=device)
        f = mgr.cudagraphify(lambda w, s, x: (s.add_(x), w * x)[1], static_input_idxs=(0, 1), name="f")
        state = torch.zeros(4, device=device)
        for _ in range(3):
            f(weight, state, torch.ones(4, device=device))
        variant = next(iter(f.variants.values()))
        assert mgr._state_positions(variant) == frozenset({1})
    finally:
        mgr.close()


def test_writes_declared_by_the_caller_count_when_kernels_hide_them(device):
    """Compiled kernels (inductor's) write without ATen ops the inspector could see: the
    compile backend declares the written inputs, and they stay checked."""
    mgr = TreeManager(device, policy=Policy(skip_warmup=False))
    try:
        f = mgr.cudagraphify(lambda w, s, x: w * x + s, static_input_idxs=(0, 1), written_input_idxs=(1,), name="f")
        for _ in range(3):
            f(torch.ones(4, device=device), torch.zeros(4, device=device), torch.ones(4, device=device))
        variant = next(iter(f.variants.values()))
        assert variant.inspected and not variant.mutated_idxs
        assert mgr._state_positions(variant) == frozenset({1})
    finally:
        mgr.close()


def test_a_new_kept_state_moves_into_its_dead_predecessors_place_and_the_recordings_replay(device):
    """HF's generate makes a new cache per call, created by the compiled prefill (so a graph
    output) and moved out of the pool at the first decode step. Recordings of the decode steps
    read it in place by address: moved onto a fresh allocation, every one of them is recorded
    again each generate. ``cgtree.relocation`` moves it into the home its dead predecessor had
    at that input position. A blocker takes the freed allocation between generates, so the
    allocator alone could not hand the same block back."""
    mgr = TreeManager(device, policy=Policy(skip_warmup=False))
    try:
        create = mgr.cudagraphify(_create, name="create")
        accumulate = mgr.cudagraphify(_accumulate, static_input_idxs=(0,), name="accumulate")
        addresses, blockers, replays = [], [], []
        for generate in range(5):
            before = mgr.counters["replays"]
            state = create(torch.ones(4, device=device))  # the new cache
            for _ in range(3):  # decode steps writing it
                out = accumulate(state, torch.ones(4, device=device))
                del out
            torch.testing.assert_close(state, torch.full((4,), 7.0, device=device))
            addresses.append(state.data_ptr())
            replays.append(mgr.counters["replays"] - before)
            del state
            blockers.append(torch.empty(4, device=device))  # may take the freed block, if any was freed
        assert len(set(addresses[1:])) == 1, f"each generate's state landed elsewhere: {addresses}"
        # From the third generate on (warmup, then recording), create and every decode step replay.
        assert replays[2:] == [4, 4, 4], (replays, dict(mgr.counters))
        assert mgr.counters["overwritten_outputs"] == 0 and mgr.counters["skipped_calls"] == 0
    finally:
        mgr.close()
