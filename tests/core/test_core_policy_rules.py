"""The pure decision functions of cgtree.policy, on their own."""

from __future__ import annotations

import torch

from cgtree import Policy
from cgtree import policy as rules

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


def test_device_rules_for_a_cuda_manager():
    skip = rules.device_skip_reason
    assert skip(CUDA0, [("arg0", CUDA0), ("arg1", CUDA0)], move_cpu_inputs=False) is None
    assert str(skip(CUDA0, [("arg0", CUDA0), ("arg1", CPU)], move_cpu_inputs=False)) == "cpu device (arg1)"
    assert skip(CUDA0, [("arg0", CUDA0), ("arg1", CPU)], move_cpu_inputs=True) is None
    assert str(skip(CUDA0, [("arg0", CUDA0), ("arg1", CUDA1)], move_cpu_inputs=False)) == "multiple devices"
    assert skip(CUDA0, [("arg0", CUDA1)], move_cpu_inputs=False).kind == "device mismatch"


def test_device_rules_for_a_cpu_manager():
    assert rules.device_skip_reason(CPU, [("arg0", CPU)], move_cpu_inputs=False) is None
    reason = rules.device_skip_reason(CPU, [("arg0", CUDA0)], move_cpu_inputs=False)
    assert str(reason) == "device mismatch (arg0 on cuda:0, graphs on cpu)"


def test_mutation_rules():
    allowed = rules.mutation_allowed
    none = frozenset()
    assert allowed(Policy(), [], none)
    assert allowed(Policy(), [0], frozenset({0}))  # a static input (a buffer, a KV cache)
    assert not allowed(Policy(), [1], frozenset({0}))  # a copied input: never
    assert not allowed(Policy(), [0], none, frozenset({0}))  # tree-managed: needs the flag
    assert allowed(Policy(support_input_mutation=True), [0], none, frozenset({0}))
    assert allowed(Policy(support_input_mutation=True), [0, 1], frozenset({1}), frozenset({0}))
    assert not allowed(Policy(support_input_mutation=True), [0, 1], none, frozenset({0}))


def test_generation_rules():
    gen = rules.can_start_new_generation
    assert not gen(new_invocation=False, step_marked=True, pending_backward=False)
    assert gen(new_invocation=True, step_marked=False, pending_backward=False)
    assert not gen(new_invocation=True, step_marked=False, pending_backward=True)
    assert gen(new_invocation=True, step_marked=True, pending_backward=True)


def test_warmup_and_limits():
    assert rules.must_warm_up(Policy(), warmed_up=False, path_in_warmup=False)
    assert not rules.must_warm_up(Policy(skip_warmup=True), warmed_up=False, path_in_warmup=False)
    assert rules.must_warm_up(Policy(skip_warmup=True), warmed_up=True, path_in_warmup=True)
    assert rules.rerecord_limit_exceeded(Policy(rerecord_limit=2), 3)
    assert not rules.rerecord_limit_exceeded(Policy(rerecord_limit=2), 2)
    assert rules.should_warn_dynamic_shapes(Policy(dynamic_shape_warn_limit=8), 9)
    assert not rules.should_warn_dynamic_shapes(Policy(dynamic_shape_warn_limit=8), 10)  # once
    assert rules.capture_size_skip_reason(Policy(capture_sizes=(1, 2)), 2) is None
    assert rules.capture_size_skip_reason(Policy(), 7) is None


def test_shape_key_separates_shapes_dtypes_and_scalars():
    a = rules.shape_key([torch.ones(2), 3])
    assert a == rules.shape_key([torch.zeros(2), 3])
    assert a != rules.shape_key([torch.ones(3), 3])
    assert a != rules.shape_key([torch.ones(2, dtype=torch.float64), 3])
    assert a != rules.shape_key([torch.ones(2), 4])


def test_cpu_scalars_go_to_a_cuda_manager_and_are_no_cpu_device_skip():
    import torch

    from cgtree import policy as rules

    inputs = (torch.ones(3), torch.tensor(2.0), 4, torch.ones(1))
    assert rules.cpu_scalar_positions(torch.device("cuda", 0), inputs) == (1,)
    assert rules.cpu_scalar_positions(torch.device("cpu"), inputs) == ()
    # the manager leaves the scalars out of the device check: only the 1-dim CPU tensors remain
    named = [(f"arg{i}", x.device) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and i != 1]
    reason = rules.device_skip_reason(torch.device("cuda", 0), named, move_cpu_inputs=False)
    assert reason is not None and "arg0" in str(reason)
