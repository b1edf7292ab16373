"""What the torch.compile backend reads off one AOT graph before handing it to a tree manager.

Every fact is read from the graph alone (node targets, ``meta["val"]`` fake values, placeholder
names, ``meta["stack_trace"]``); nothing here runs the graph or touches real memory.

Invariants:
- ``device_of`` prefers a CUDA device over the CPU: a graph with any CUDA tensor belongs to
  that CUDA device's tree (the tree manager then skips calls with CPU inputs or several
  devices, with PyTorch's messages). Graphs with CPU tensors only go to the cpu-replay tree.
- ``mutated_inputs`` lists placeholder positions whose *storage* some node writes, so a write
  through a view of an input counts as well.
- ``locate_user_frames`` changes only the callables of the nodes it is given (mutating and
  graph-incompatible ops), never what they compute (see ``cgtree.user_frames``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx
from torch._ops import OpOverload

from cgtree.capturability import incompatible_fx_node
from cgtree.user_frames import located_call, parse_stack_trace

log = logging.getLogger("cgtree.graph_facts")

# Backward placeholders that are not saved activations (aot_autograd's names).
_NOT_SAVED_MARKERS = ("tangents", "bwd_seed", "bwd_base_offset", "bwd_rng_state")


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def _value(node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("val", node.meta.get("fake_result"))


def placeholder_value(node: torch.fx.Node) -> Any:
    """A placeholder's example value (a fake tensor, a SymInt, an int), None when unknown."""
    return _value(node)


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def device_of(gm: torch.fx.GraphModule, example_inputs: Iterable[Any] = ()) -> Optional[torch.device]:
    """The device whose tree runs this graph: the first CUDA device any tensor of it is on,
    else ``cpu`` when it has CPU tensors, else None (no tensors, or only other devices)."""
    seen_cpu = False
    values = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    values += [t for node in gm.graph.nodes for t in _tensors_in(_value(node))]
    for tensor in values:
        if tensor.device.type == "cuda":
            return tensor.device
        seen_cpu = seen_cpu or tensor.device.type == "cpu"
    return torch.device("cpu") if seen_cpu else None


def _storage_key(tensor: torch.Tensor) -> Any:
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        return StorageWeakRef(tensor.untyped_storage())
    except Exception:  # tensors without storage (sparse, nested): identity is the best we have
        return id(tensor)


def _written_arguments(node: torch.fx.Node) -> Iterable[Any]:
    """The fx arguments a mutating op node writes (its ``Tensor(a!)`` arguments)."""
    if node.op != "call_function" or not isinstance(node.target, OpOverload):
        return
    schema = node.target._schema
    if not schema.is_mutable:
        return
    for position, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if not argument.kwarg_only and position < len(node.args):
            yield node.args[position]
        elif argument.name in node.kwargs:
            yield node.kwargs[argument.name]


def mutated_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Positions of the placeholders whose storage some node of the graph writes."""
    by_storage: dict[Any, set[int]] = {}
    for position, node in enumerate(placeholders(gm)):
        value = _value(node)
        if isinstance(value, torch.Tensor):
            by_storage.setdefault(_storage_key(value), set()).add(position)
    mutated: set[int] = set()
    for node in gm.graph.nodes:
        for argument in _written_arguments(node):
            for tensor in _tensors_in(_value(argument)):
                mutated |= by_storage.get(_storage_key(tensor), set())
    return mutated


@functools.cache
def _auto_functionalized_ops() -> dict[Any, Callable]:
    """auto_functionalized higher-order ops -> their plain (clone, then call the op) form."""
    try:
        from torch._higher_order_ops import auto_functionalize as af
    except ImportError:  # pragma: no cover - both exist in every supported torch
        return {}
    pairs = {}
    for hop, dense in (("auto_functionalized", "auto_functionalized_dense"),
                       ("auto_functionalized_v2", "auto_functionalized_v2_dense")):
        if hasattr(torch.ops.higher_order, hop) and hasattr(af, dense):
            pairs[getattr(torch.ops.higher_order, hop)] = getattr(af, dense)
    return pairs


def _operator_of(node: torch.fx.Node) -> Any:
    """The operator a node calls; for an auto_functionalized node, the mutable op it wraps."""
    if node.op == "call_function" and node.target in _auto_functionalized_ops() and node.args:
        return node.args[0]
    return node.target


def is_incompatible(node: torch.fx.Node) -> bool:
    """Whether a CUDA graph cannot hold this node (``cgtree.capturability``'s rule: host
    syncs, unsafe tags, sizes that depend on tensor values)."""
    return incompatible_fx_node(node, _operator_of(node)) is not None


def propagate_fake_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Give every node of ``gm`` a fake ``meta["val"]`` by running it on fake copies of the
    examples (a decoded payload has none), so that ``is_incompatible`` decides by values, as
    for AOT graphs: an integer gather is then capturable. False when propagation failed (the
    nodes then keep what they had; a tagged node without a value counts as incompatible)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as exc:  # noqa: BLE001 - facts stay unknown; the cautious answer follows
        log.debug("fake propagation over %s failed: %s", type(gm).__name__, exc)
        return False
    return True


def incompatible_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if is_incompatible(node)]


def _through_attribute(source: Any) -> bool:
    """Whether a dynamo source reaches its value through an object attribute somewhere in its
    chain (``L['cache'].layers[0].keys``), as opposed to a tensor passed as an argument
    (``L['x']``, ``L['kwargs']['input_ids']``)."""
    while source is not None:
        if type(source).__name__ == "AttrSource":
            return True
        source = getattr(source, "base", None)
    return False


def kept_state_positions(dynamo_gm: torch.fx.GraphModule) -> list[int]:
    """Positions of a dynamo graph's placeholders that are state the caller keeps on an object
    (read through an attribute: caches, counters), by dynamo's ``_dynamo_source``.

    Such a tensor is the same buffer from call to call (transformers' ``StaticCache`` keeps its
    key/value tensors and position counter this way; tensors a compiled region created cannot be
    ``mark_static_address``-ed there, so nothing else marks them). Written in place by the
    graph, it is used in place like a static input: the write lands in the caller's buffer, and
    a buffer that moved records a sibling graph."""
    return [position for position, node in enumerate(placeholders(dynamo_gm))
            if _through_attribute(getattr(node, "_dynamo_source", None))]


def saved_tensor_count(bw_gm: torch.fx.GraphModule) -> int:
    """Leading backward inputs that are saved activations (static: the forward's outputs or
    tensors it kept), as opposed to incoming gradients and RNG state."""
    count = 0
    for node in placeholders(bw_gm):
        if any(marker in node.name for marker in _NOT_SAVED_MARKERS):
            break
        count += 1
    return count


def is_dynamic(gm: torch.fx.GraphModule) -> bool:
    """Whether any input is a symbolic size or a tensor with symbolic sizes."""
    for node in placeholders(gm):
        value = _value(node)
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


_TORCH_DIR = os.path.dirname(torch.__file__)


def first_user_frame(gm: torch.fx.GraphModule) -> Optional[tuple[str, int, str]]:
    """(file, line, function) of the user code the graph's first traced op came from: the
    innermost frame outside torch (an ``nn.Linear`` is not where the user's code is)."""
    for node in gm.graph.nodes:
        frames = parse_stack_trace(node.meta.get("stack_trace"))
        if frames:
            outside_torch = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
            return (outside_torch or frames)[-1]
    return None


def nodes_worth_locating(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes whose first run may produce a skip message: mutating and incompatible ops."""
    return [
        node
        for node in gm.graph.nodes
        if is_incompatible(node) or any(True for _ in _written_arguments(node)) or node.target in _auto_functionalized_ops()
    ]


def lower_auto_functionalized(gm: torch.fx.GraphModule) -> int:
    """Run auto_functionalized nodes (custom ops with mutated arguments, functionalized by
    AOT) in their plain form: clones, then the op. Same results; but the op then dispatches
    like any ATen op, which is what the tree manager's inspector watches (a dispatch mode
    sees no higher-order op). Returns how many nodes changed; recompiles if any did."""
    pairs = _auto_functionalized_ops()
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in pairs:
            node.target = pairs[node.target]
            changed += 1
    if changed:
        gm.recompile()
    return changed


def higher_order_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the higher-order ops (cond, while_loop, invoke_subgraph, ...) the graph calls."""
    return [
        str(getattr(node.target, "name", lambda: node.target)())
        for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
    ]


def locate_user_frames(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> int:
    """Make each of ``nodes`` run inside frames at its user source lines; returns how many.

    The GraphModule is recompiled when anything changed.
    """
    changed = 0
    for node in nodes:
        frames = parse_stack_trace(node.meta.get("stack_trace"))
        if frames:
            node.target = located_call(node.target, frames)
            changed += 1
    if changed:
        gm.recompile()
    return changed
