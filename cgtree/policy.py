"""Pure decisions of the tree manager: what gets graphed, what is skipped and why.

Nothing here touches a tensor's memory, a backend or the tree; every function takes plain
facts and returns a decision, so the rules can be tested on their own and the manager's
mechanism stays free of policy (vLLM's dispatcher/wrapper split).

Invariants:
- A skip decision depends only on its arguments (policy, devices, shapes, mutation facts).
- ``shape_key`` is what makes two calls the "same function variant": the shapes, dtypes and
  devices of tensor inputs and the values of non-tensor inputs. Strides are not part of it:
  copied inputs are copied into the recording's buffers whatever their strides.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

from cgtree.config import Policy
from cgtree.skips import SkipReason

MUTATED_INPUTS = "mutated inputs"
CPU_DEVICE = "cpu device"
MULTIPLE_DEVICES = "multiple devices"
DEVICE_MISMATCH = "device mismatch"
SYMBOLIC_SHAPES = "graph with symbolic shapes inputs"
INCOMPATIBLE_OP = "incompatible op"
CAPTURE_SIZE = "size not in capture_sizes"
RERECORD_LIMIT = "re-recording limit"
CAPTURE_FAILED = "capture failed"


def shape_key(inputs: Sequence[Any]) -> tuple:
    """A hashable key naming the variant of a function these inputs call."""
    key = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            key.append((value.shape, value.dtype, value.device))
        elif isinstance(value, (int, float, bool, str, type(None))):
            key.append(value)
        else:
            key.append(type(value).__name__)
    return tuple(key)


def is_cpu_scalar(value: Any) -> bool:
    """A 0-dim CPU tensor: what CUDA kernels accept beside device tensors (saved scalars of
    backward graphs, SDPA's RNG seed and offset, step counters)."""
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() == 0


def cpu_scalar_positions(manager_device: torch.device, inputs: Sequence[Any]) -> tuple[int, ...]:
    """Inputs a CUDA manager's graphs take as device scalars: 0-dim CPU tensors.

    A capture would bake a CPU scalar's value into the graph (kernels read it at launch), so
    such an input is copied into a device buffer of the recording instead, like any copied
    input, on every replay: a value that changes between calls is never replayed stale. What
    the graph computes from it then lives on the device. A CPU manager takes them as they are.
    """
    if manager_device.type == "cpu":
        return ()
    return tuple(i for i, value in enumerate(inputs) if is_cpu_scalar(value))


def device_skip_reason(
    manager_device: torch.device,
    input_devices: Iterable[tuple[str, torch.device]],
    *,
    move_cpu_inputs: bool,
) -> Optional[SkipReason]:
    """Why inputs on these devices cannot run under this manager's graphs, or None.

    ``input_devices`` yields (argument name, device) for every tensor input, except the CPU
    scalars ``cpu_scalar_positions`` names (they go to the device).
    """
    named = list(input_devices)
    distinct_accelerators = {dev for _, dev in named if dev.type != "cpu"}
    if manager_device.type == "cpu":
        for name, dev in named:
            if dev.type != "cpu":
                return SkipReason(DEVICE_MISMATCH, f" ({name} on {dev}, graphs on cpu)")
        return None
    if len(distinct_accelerators) > 1:
        return SkipReason(MULTIPLE_DEVICES)
    if not move_cpu_inputs:
        for name, dev in named:
            if dev.type == "cpu":
                return SkipReason(CPU_DEVICE, f" ({name})")
    for name, dev in named:
        if dev.type != "cpu" and dev != manager_device:
            return SkipReason(DEVICE_MISMATCH, f" ({name} on {dev}, graphs on {manager_device})")
    return None


def symbolic_skip_reason(policy: Policy, dynamic: bool) -> Optional[SkipReason]:
    """Functions declared dynamic run without graphs under ``skip_dynamic_graphs``."""
    if dynamic and policy.skip_dynamic_graphs:
        return SkipReason(SYMBOLIC_SHAPES)
    return None


def capture_size_skip_reason(policy: Policy, leading_size: Optional[int]) -> Optional[SkipReason]:
    """``capture_sizes`` is an allow-list of leading dimensions; other sizes are not graphed."""
    if not policy.capture_sizes or leading_size is None:
        return None
    if leading_size in policy.capture_sizes:
        return None
    allowed = ", ".join(str(s) for s in policy.capture_sizes)
    return SkipReason(CAPTURE_SIZE, f" ({leading_size}; allowed: {allowed})")


def mutation_allowed(policy: Policy, mutated_idxs: Iterable[int], static_idxs: frozenset[int],
                     managed_idxs: frozenset[int] = frozenset()) -> bool:
    """Whether a call that mutates ``mutated_idxs`` may run under graphs.

    ``static_idxs`` are the function's static inputs (parameters, buffers, KV caches: used in
    place, addresses fixed); ``managed_idxs`` the inputs that are tree-managed in this call
    (outputs of earlier graphs on the current path). A graph mutating a copied input would
    mutate its private buffer instead of the caller's tensor: never allowed. Mutating a static
    input is always allowed (PyTorch's trees do the same: a module's buffers written in place,
    such as KV caches, stay under graphs). Mutating a tree-managed one needs
    ``support_input_mutation``.
    """
    for idx in mutated_idxs:
        if idx in static_idxs:
            continue
        if idx in managed_idxs and policy.support_input_mutation:
            continue
        return False
    return True


def mutation_skip_reason(count: int) -> SkipReason:
    return SkipReason(MUTATED_INPUTS, f" ({count} instances)")


def rerecord_limit_exceeded(policy: Policy, rerecords: int) -> bool:
    """Past ``rerecord_limit`` re-recordings under one parent a function runs without graphs."""
    return rerecords > policy.rerecord_limit


def rerecord_skip_reason(policy: Policy, node_label: str, why: str) -> SkipReason:
    return SkipReason(RERECORD_LIMIT, f" ({policy.rerecord_limit}) exceeded under {node_label}: {why}")


def should_warn_dynamic_shapes(policy: Policy, recorded_shapes: int) -> bool:
    """Warn once when a function has been recorded at more distinct shapes than the limit."""
    return recorded_shapes == policy.dynamic_shape_warn_limit + 1


def can_start_new_generation(new_invocation: bool, step_marked: bool, pending_backward: bool) -> bool:
    """Whether the current path's outputs may be given up for a new generation.

    A new generation needs a new top-level invocation; a forward whose backward has not run
    yet keeps the generation open, unless the user marked a step explicitly (the way out of
    "stuck in warmup because a backward never ran").
    """
    if not new_invocation:
        return False
    if step_marked:
        return True
    return not pending_backward


def must_warm_up(policy: Policy, warmed_up: bool, path_in_warmup: bool) -> bool:
    """Whether this call runs eagerly in the pool instead of being recorded or replayed.

    A warmup can only be followed by warmups on the same path: recording after a warmup in
    the same path would see an allocator state the replays will not reproduce.
    """
    if path_in_warmup:
        return True
    return not (warmed_up or policy.skip_warmup)
