"""The graph tree: recorded nodes, warmup nodes, and what a path knows about its outputs.

A node is one recording of one function variant under one parent. Children of a node were
recorded while the parent's outputs were live, so their memory never overlaps those outputs.

Invariants:
- ``path`` of a node runs from its root to itself; ``depth`` is its index in that list.
- Each node remembers, per output storage, a weak reference from its latest execution
  (record or replay) and whether the allocator currently owns that block (``owned``):
  warmup and recording outputs are owned; replay outputs are not until a checkpoint hands
  them to the allocator. ``live_block_count`` is computed from exactly this.
- ``expected_dead`` lists (depth, storage) positions of the path that were dead when the
  node was recorded: the node's graph may write over them, so it can only replay while they
  are still dead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from cgtree.in_place_inputs import InPlaceInputs
from cgtree.liveness import StorageRef, TensorGeometry
from cgtree.types import FunctionId, GraphId


@dataclass(frozen=True)
class OutputSpec:
    """Where one flattened output of a recording comes from on every replay.

    kind "pool": a view of the node's pool storage ``index`` with ``geometry``; "input": a view
    of input ``index``'s storage (the function returned (a view of) its input; ``geometry``'s
    offset is relative to that input's own offset); "constant": ``value`` itself (non-tensors,
    and tensors outside the pool such as captured parameters).
    """

    kind: str
    index: int = -1
    geometry: Optional[TensorGeometry] = None
    value: Any = None


class OutputTracking:
    """Weak references to one execution's output storages (liveness, checkpoints) and to the
    tensors handed out (to make them raise once overwritten), and who owns their blocks."""

    __slots__ = ("refs", "owned", "tensors")

    def __init__(self) -> None:
        self.refs: list[Optional[StorageRef]] = []
        self.owned: list[bool] = []
        self.tensors: list[weakref.ref] = []

    def reset(self, refs: list[Optional[StorageRef]], owned: bool, tensors: list) -> None:
        self.refs = refs
        self.owned = [owned] * len(refs)
        self.tensors = [weakref.ref(t) for t in tensors if isinstance(t, torch.Tensor)]

    def live_positions(self) -> list[int]:
        return [i for i, ref in enumerate(self.refs) if ref is not None and ref.alive()]

    def any_live(self) -> bool:
        for ref in self.refs:
            if ref is not None and ref.alive():
                return True
        return False

    def clear(self) -> None:
        self.refs = []
        self.owned = []
        self.tensors = []


class TreeNode:
    """Common part of warmup and recorded nodes: parent, path and output tracking."""

    is_warmup = False

    def __init__(self, function_id: FunctionId, function_name: str, parent: Optional["TreeNode"]) -> None:
        self.function_id = function_id
        self.function_name = function_name
        self.parent = parent
        self.path: list[TreeNode] = (parent.path if parent is not None else []) + [self]
        self.depth = len(self.path) - 1
        self.outputs = OutputTracking()

    def path_any_live(self) -> bool:
        return any(node.outputs.any_live() for node in self.path)


class WarmupNode(TreeNode):
    """An eager run inside the pool. Never replayed; only its outputs' liveness matters."""

    is_warmup = True


class RecordedNode(TreeNode):
    """One captured graph of one function variant under one parent."""

    def __init__(
        self,
        graph_id: GraphId,
        function_id: FunctionId,
        function_name: str,
        parent: Optional["RecordedNode"],
    ) -> None:
        super().__init__(function_id, function_name, parent)
        self.graph_id = graph_id
        self.children: dict[FunctionId, list[RecordedNode]] = {}
        self.recording: Any = None  # the backend's Recording
        self.output_specs: list[OutputSpec] = []
        self.pool_positions: tuple[int, ...] = ()  # flat output positions that are pool memory
        self.output_structure: Any = None  # pytree spec, or None for a single tensor
        self.storage_sizes: list[tuple[int, int]] = []  # (data_ptr, nbytes) per pool storage
        self.in_place_inputs = InPlaceInputs()  # (input index, expected data_ptr), checked per replay
        self.copied_idxs: tuple[int, ...] = ()
        self.in_place_idxs: frozenset[int] = frozenset()
        self.static_idxs: frozenset[int] = frozenset()
        self.expected_dead: tuple[tuple[int, int], ...] = ()
        self.allocated_in_checkpoint: tuple[tuple[int, int], ...] = ()  # (depth, storage) owned after recording
        self.checkpoint_state: Any = None
        self.replays = 0
        self.last_mode = "recorded"
        self.replay_execution: Any = None  # the Execution every replay reports (built once)
        self.variant: Any = None  # the manager's function variant this node records

    def add_child(self, child: "RecordedNode") -> None:
        self.children.setdefault(child.function_id, []).append(child)

    def num_descendants(self) -> int:
        return sum(1 + child.num_descendants() for kids in self.children.values() for child in kids)

    def iter_subtree(self):
        yield self
        for kids in self.children.values():
            for child in kids:
                yield from child.iter_subtree()

    def expected_dead_still_dead(self, path: list[TreeNode]) -> bool:
        for depth, position in self.expected_dead:
            refs = path[depth].outputs.refs
            ref = refs[position] if position < len(refs) else None
            if ref is not None and ref.alive():
                return False
        return True
