"""The tree manager: warmup -> record -> replay of graphed functions in one pool per device.

Invariants (the graph-tree contract, as in PyTorch's cudagraph_trees, in our own code):
- All graphs of a manager share one private pool and one side stream (its backend).
- Live pool memory belongs to one path of the tree at a time: the nodes from a root to the
  current node. A child is recorded while its parent's outputs are live, so its memory never
  overlaps theirs; it replays only while every path output that was dead at its recording is
  still dead (``RecordedNode.expected_dead``).
- The first call of a function variant runs eagerly in the pool (warmup) unless
  ``skip_warmup``; once a path holds a warmup, the rest of that path warms up too.
- A path ends when nothing of it is needed any more (all outputs dead) or a new generation
  starts (``mark_step_begin()``, or a new top-level invocation while no forward awaits its
  backward). A generation change invalidates the old path's live outputs: where the build can,
  accessing them raises; in every case ``counters["overwritten_outputs"]`` counts them.
- Before a warmup or recording that follows replays, the pool is checkpointed back to the
  current node's post-recording state (replays do no allocator bookkeeping).
- Everything the manager decides comes from ``cgtree.policy``; everything it does to memory
  goes through its backend. Not thread-safe: use one manager per thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from cgtree import policy as rules
from cgtree.backends.base import Backend
from cgtree.config import Policy
from cgtree.errors import LaunchVetoed, ManagerClosedError, overwritten_message
from cgtree.in_place_inputs import InPlaceInputs
from cgtree.inspection import Inspector, InspectionAbort, input_storage_index
from cgtree.liveness import (
    CAN_RAISE_ON_OVERWRITTEN_ACCESS,
    StorageRef,
    TensorGeometry,
    mark_overwritten,
    non_owning_storage,
    tensor_on,
)
from cgtree.relocation import RelocationHomes
from cgtree.skips import SkipLog, SkipReason
from cgtree.tree import OutputSpec, RecordedNode, TreeNode, WarmupNode
from cgtree.types import Execution, ExecutionMode, FunctionId, FunctionKind, GraphId, PathState

log = logging.getLogger("cgtree.manager")

COUNTER_NAMES = (
    "warmups",
    "recordings",
    "replays",
    "checkpoints",
    "skips",
    "skipped_calls",
    "rerecords",
    "overwritten_outputs",
    "dynamic_shape_warnings",
    "relocated_outputs",
)


def make_backend(device: torch.device) -> Backend:
    """The backend for a device: real CUDA graphs on cuda, CPU replay on cpu."""
    if device.type == "cuda":
        from cgtree.backends.cuda import CudaGraphBackend

        return CudaGraphBackend(device)
    if device.type == "cpu":
        from cgtree.backends.cpu import CpuReplayBackend

        return CpuReplayBackend(device)
    raise ValueError(f"cgtree has no backend for device type {device.type!r} (use cuda:N or cpu)")


class _Variant:
    """One function at one input shape key: the unit that is warmed up, recorded and skipped."""

    __slots__ = (
        "id",
        "function",
        "static_skip",
        "skip_origin",
        "inspected",
        "mutated_idxs",
        "mutation_origin",
        "rerecords",
        "has_recording",
        "cpu_inputs_to_move",
        "cpu_scalars",
        "hot_root",
    )

    def __init__(self, variant_id: FunctionId, function: "GraphedFunction") -> None:
        self.id = variant_id
        self.function = function
        self.static_skip: Optional[SkipReason] = None
        self.skip_origin = function.origin
        self.inspected = False
        self.mutated_idxs: frozenset[int] = frozenset()
        self.mutation_origin = ""
        self.rerecords: Counter = Counter()  # parent graph id (or None) -> re-recordings
        self.has_recording = False
        self.cpu_inputs_to_move: tuple[int, ...] = ()
        self.cpu_scalars: tuple[int, ...] = ()  # 0-dim CPU tensors the graphs take on the device
        self.hot_root: Optional[RecordedNode] = None  # the root last replayed (fast path)


class GraphedFunction:
    """A function under the tree manager's control; call it like the function itself."""

    def __init__(
        self,
        manager: "TreeManager",
        fn: Callable,
        name: str,
        static_input_idxs: Sequence[int],
        kind: FunctionKind,
        dynamic: bool,
        top_level: bool,
        written_input_idxs: Sequence[int] = (),
        exact_input_layout: bool = False,
        static_inputs_fixed: bool = False,
    ) -> None:
        self.manager = manager
        self.static_inputs_fixed = static_inputs_fixed
        self.written_input_idxs = frozenset(written_input_idxs)
        self.exact_input_layout = exact_input_layout
        self.fn = fn
        self.name = name
        self.static_input_idxs = frozenset(static_input_idxs)
        self.kind = kind
        self.dynamic = dynamic
        self.top_level = top_level
        code = getattr(fn, "__code__", None)
        self.origin = f'  function {name} defined at "{code.co_filename}", line {code.co_firstlineno}\n' if code else ""
        self.variants: dict[tuple, _Variant] = {}
        self._keyed_positions: dict[int, tuple[int, ...]] = {}
        self.log_key = f"{name}#{id(self):x}"

    def __call__(self, *inputs: Any) -> Any:
        return self.manager._call(self, inputs)

    def key(self, inputs: Sequence[Any]) -> tuple:
        """The variant key of a call (``cgtree.policy.shape_key`` of the non-static inputs).

        Static inputs are checked by address on every replay; keying on them too would only
        cost time on the hot path, so the positions keyed are computed once per arity.
        """
        positions = self._keyed_positions.get(len(inputs))
        if positions is None:
            positions = tuple(i for i in range(len(inputs)) if i not in self.static_input_idxs)
            self._keyed_positions[len(inputs)] = positions
        return (len(inputs), rules.shape_key([inputs[i] for i in positions]))


class TreeManager:
    """Records, replays and tracks the CUDA graphs of one device (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cuda:0", policy: Optional[Policy] = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.policy = policy or Policy()
        self.backend = make_backend(self.device)
        self.backend_name = self.backend.name
        self.counters: dict[str, int] = {name: 0 for name in COUNTER_NAMES}
        self.skip_log = SkipLog()
        self.last_execution: Optional[Execution] = None
        self._roots: dict[FunctionId, list[RecordedNode]] = {}
        self._nodes: list[RecordedNode] = []
        self._functions: list[GraphedFunction] = []
        self._current: Optional[TreeNode] = None
        self._path_state = PathState.NONE
        self._warmed: set[FunctionId] = set()
        self._graph_ids = itertools.count()
        self._variant_ids = itertools.count()
        self._invocation = 0
        self._generation_invocation = 0
        self._generation = 0
        self._step_marked = False
        self._manual_steps = False
        self._pending_backward = False
        self._relocation_homes = RelocationHomes()  # where kept outputs are moved (cgtree.relocation)
        # Set by a caller for its next call only: called once, after the call's pure decisions and
        # before anything runs, launches or changes the tree; raising LaunchVetoed there leaves
        # the tree as it was (cgtreed's gated plan runs: the client's checks overlap the decisions).
        self.launch_gate: Optional[Callable[[], None]] = None
        self._closed = False
        log.info("tree manager on %s uses the %s backend", self.device, self.backend_name)

    # ---------------------------------------------------------------- public API
    def cudagraphify(
        self,
        fn: Callable,
        example_inputs: Sequence[Any] = (),
        static_input_idxs: Sequence[int] = (),
        *,
        name: Optional[str] = None,
        kind: str | FunctionKind = FunctionKind.INFERENCE,
        dynamic: bool = False,
        top_level: bool = True,
        written_input_idxs: Sequence[int] = (),
        exact_input_layout: bool = False,
        static_inputs_fixed: bool = False,
    ) -> GraphedFunction:
        """Put ``fn`` (tensors -> tensor or tuple/list of tensors) under the tree's control.

        static_input_idxs: inputs used in place (parameters, buffers): their addresses are
            checked on each replay, a moved one records a sibling graph. Other tensor inputs
            are copied into the recording's buffers on every replay.
        kind: "inference", or "forward"/"backward" for training steps (a forward keeps the
            generation open until its backward ran).
        dynamic: the function has symbolic shapes (skipped under ``skip_dynamic_graphs``).
        top_level: each call is a new top-level invocation (like a torch.compile'd function),
            so it may start a new generation. Pass False for pieces of one invocation (graph
            breaks) and call ``begin_invocation()`` yourself at each top-level entry.
        written_input_idxs: inputs the function writes, declared by a caller whose kernels hide
            their writes from the first-run inspection (inductor's): static ones among them are
            checked for caller-kept graph outputs (``_relocate_kept_outputs``).
        exact_input_layout: copied inputs' buffers keep their strides even where an input is
            expanded (stride 0), for code that checks the strides it was compiled for
            (inductor's); otherwise an expanded input's buffer is contiguous.
        static_inputs_fixed: the caller promises that every call passes its static inputs at
            the addresses they had when the function was first called, none of them an output
            of a graph of this tree (a prepared plan's arguments, ``cgtree.daemon.plans``,
            whose recording is keyed by those addresses): they are then checked once, when a
            graph is recorded, instead of before every replay (60-100 ns an input; a plan's
            recording has one per weight). Tree-managed inputs are still checked.
        ``example_inputs`` are only validated here; nothing runs until the first call.
        """
        self._check_open()
        for idx in static_input_idxs:
            if idx < 0 or (example_inputs and idx >= len(example_inputs)):
                raise ValueError(f"static input index {idx} out of range for {len(example_inputs)} inputs")
        graphed = GraphedFunction(
            self,
            fn,
            name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__,
            static_input_idxs,
            FunctionKind(kind),
            dynamic,
            top_level,
            written_input_idxs,
            exact_input_layout,
            static_inputs_fixed,
        )
        self._functions.append(graphed)
        return graphed

    def begin_invocation(self) -> None:
        """A new top-level call begins (dynamo frame entry): the next call may start a generation.

        Once ``mark_step_begin()`` has been used, only marked steps start generations (as in
        PyTorch: the user took charge of iteration boundaries) and this does nothing.
        """
        if not self._manual_steps:
            self._invocation += 1

    def mark_step_begin(self) -> None:
        """The next call starts a new generation, even while a backward is pending."""
        self._invocation += 1
        self._step_marked = True
        self._manual_steps = True

    def set_policy(self, policy: Policy) -> None:
        """New policy for function variants seen from now on; existing decisions stay."""
        self.policy = policy

    def root_children(self) -> list[int]:
        """Descendant count of each root, in recording order (the seed's get_root_children)."""
        roots = sorted((node for nodes in self._roots.values() for node in nodes), key=lambda n: n.graph_id)
        return [root.num_descendants() for root in roots]

    def live_block_count(self) -> int:
        """Pool blocks the allocator holds for live outputs.

        Warmup and recording outputs are allocator blocks; replay outputs are views of graph
        memory the allocator does not track until a checkpoint hands them over (as in PyTorch).
        """
        if self._current is None:
            return 0
        live = set()
        for node in self._current.path:
            for ref, owned in zip(node.outputs.refs, node.outputs.owned):
                if owned and ref is not None and ref.alive():
                    live.add(ref.data_ptr)
        return len(live)

    def live_output_count(self) -> int:
        """Live output storages of the current path, whoever owns their blocks."""
        if self._current is None:
            return 0
        return len({ref.data_ptr for node in self._current.path for ref in node.outputs.refs if ref and ref.alive()})

    def status(self) -> dict:
        """A JSON-serializable picture of the tree, the pool and the counters."""
        pool = self.backend.pool_stats() if not self._closed else {"bytes": 0, "segments": 0, "allocator_live_blocks": 0}
        current_id = getattr(self._current, "graph_id", None)
        return {
            "backend": self.backend_name,
            "device": str(self.device),
            "closed": self._closed,
            "policy": dataclasses.asdict(self.policy),
            "generation": self._generation,
            "path_state": self._path_state.value,
            "current_node": current_id,
            "overwrite_detection": "raises" if self._raises_on_overwrite() else "counted",
            "root_children": self.root_children(),
            "nodes": [self._node_status(node) for node in self._nodes],
            "functions": [
                {"name": f.name, "kind": f.kind.value, "variants": len(f.variants)} for f in self._functions
            ],
            "pool": {
                "bytes": pool["bytes"],
                "segments": pool["segments"],
                "live_blocks": self.live_block_count(),
                "allocator_live_blocks": pool["allocator_live_blocks"],
                "live_outputs": self.live_output_count(),
            },
            "counters": dict(self.counters),
            "skips": {"by_reason": dict(self.skip_log.counts), "calls_by_reason": dict(self.skip_log.calls)},
        }

    def close(self) -> None:
        """Free every graph and pool segment. Live outputs become stale (see the module doc)."""
        if self._closed:
            return
        if self._current is not None:
            self._invalidate_path()
        for node in self._nodes:
            self._invalidate_outputs(node)
            if node.recording is not None:
                self.backend.release_recording(node.recording)
            node.recording = None
            node.checkpoint_state = None
            node.children.clear()
        self._nodes.clear()
        self._roots.clear()
        self._relocation_homes.clear()
        self._current = None
        self._path_state = PathState.NONE
        self.backend.close()
        self._closed = True
        log.info("tree manager on %s closed", self.device)

    def __enter__(self) -> "TreeManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- the call path
    def _call(self, function: GraphedFunction, inputs: Sequence[Any]) -> Any:
        if self._closed:
            raise ManagerClosedError(f"tree manager on {self.device} is closed; cannot run {function.name}")
        gate, self.launch_gate = self.launch_gate, None  # this call's only
        counted = function.top_level and not self._manual_steps
        if counted:
            self._invocation += 1
        variant = function.variants.get(function.key(inputs))
        if variant is None:
            variant = self._new_variant(function, inputs)
        try:
            if gate is not None and (variant.static_skip is not None or variant.cpu_inputs_to_move):
                gate()
                gate = None
            if variant.static_skip is not None:
                return self._run_without_graphs(variant, inputs, variant.static_skip, variant.skip_origin)
            if variant.cpu_inputs_to_move:
                inputs = self._move_cpu_inputs(inputs, variant.cpu_inputs_to_move)
            node = variant.hot_root
            if node is not None and node is self._current:
                new_generation = self._fast_root_replay(variant, node, inputs)  # decides, changes nothing
                if new_generation is not None:
                    if gate is not None:
                        gate()
                    return self._replay(node, inputs, invalidate_path=new_generation)
            if gate is not None:
                gate()
            return self._dispatch(variant, inputs)
        except LaunchVetoed:
            if counted:
                self._invocation -= 1  # the call never happened
            raise
        finally:
            if function.kind is FunctionKind.FORWARD:
                self._pending_backward = True
            elif function.kind is FunctionKind.BACKWARD:
                self._pending_backward = False

    def _dispatch(self, variant: _Variant, inputs: Sequence[Any]) -> Any:
        # A backward's static inputs are its forward's saved outputs: tree-managed by design.
        # Fixed static inputs are never path outputs (the caller's promise): nothing to move.
        if (variant.function.static_input_idxs and variant.function.kind is not FunctionKind.BACKWARD
                and not variant.function.static_inputs_fixed
                and self._current is not None and self._current.path_any_live()):
            self._relocate_kept_outputs(variant, inputs, self._state_positions(variant))
        state = self._path_state
        if state is PathState.WARMUP or state is PathState.RECORDING:
            self._try_end_path()
        if variant.mutated_idxs and not self._mutation_allowed(variant, inputs):
            return self._run_without_graphs(
                variant, inputs, rules.mutation_skip_reason(len(variant.mutated_idxs)), variant.mutation_origin
            )
        if rules.must_warm_up(self.policy, variant.id in self._warmed, self._path_state is PathState.WARMUP):
            if self._path_state is PathState.EXECUTION:
                self._checkpoint()
            return self._warmup(variant, inputs)

        mismatch = None
        if self._path_state is not PathState.RECORDING:
            node, mismatch = self._find_replayable(self._children_of_current(), variant, inputs)
            if node is None and self._current is not None and variant.id in self._roots and self._try_end_path():
                # Lazily ended: an executing path is only given up when the call cannot extend it.
                node, mismatch = self._find_replayable(self._roots, variant, inputs)
            if node is not None:
                return self._replay(node, inputs)

        if mismatch is not None:
            parent_id = getattr(self._current, "graph_id", None)
            variant.rerecords[parent_id] += 1
            self.counters["rerecords"] += 1
            if rules.rerecord_limit_exceeded(self.policy, variant.rerecords[parent_id]):
                label = f"node {parent_id}" if parent_id is not None else "the roots"
                reason = rules.rerecord_skip_reason(self.policy, label, mismatch)
                return self._run_without_graphs(variant, inputs, reason, variant.function.origin)

        if self._path_state is PathState.EXECUTION:
            self._try_end_path()
            if self._current is not None:
                self._checkpoint()
        return self._record(variant, inputs)

    @staticmethod
    def _state_positions(variant: _Variant) -> frozenset[int]:
        """Static inputs that may be caller state kept from a graph's outputs: all of them until
        the first run showed what the function writes, then the static inputs it writes (a
        cache is written by every step; parameters, never), so a graph-broken model's pieces
        do not check every parameter on every call."""
        static = variant.function.static_input_idxs
        if not variant.inspected:
            return static
        return (variant.mutated_idxs | variant.function.written_input_idxs) & static

    def _relocate_kept_outputs(self, variant: _Variant, inputs: Sequence[Any], positions: frozenset[int]) -> None:
        """Static inputs that are live outputs of the current path: the caller kept a graph's
        output as its own state (a KV cache a compiled prefill created, a buffer assigned in a
        compiled region). Pool memory is given up at the next generation, so each such tensor
        is moved onto a copy of its storage outside the pool (``Tensor.set_``: the caller's
        object keeps its identity) before the path can end. Checked on the general dispatch
        while the path holds live outputs (the steady loop's fast path never gets here). A new
        cache of the same size goes where its dead predecessor at that input position was
        (``cgtree.relocation``), so the recordings that read it in place replay."""
        if not positions:
            return
        path_outputs = self._path_storage_positions()
        for idx in positions:
            value = inputs[idx] if idx < len(inputs) else None
            if not isinstance(value, torch.Tensor) or value.untyped_storage().data_ptr() not in path_outputs:
                continue
            reused = self._relocation_homes.move(idx, value)
            self.counters["relocated_outputs"] += 1
            log.info("cgtree: input %d of %s is an output of an earlier graph kept as state: moved out of the pool%s",
                     idx, variant.function.name, " (into its predecessor's place)" if reused else "")

    def _fast_root_replay(self, variant: _Variant, node: RecordedNode, inputs: Sequence[Any]) -> Optional[bool]:
        """The steady state of inference loops, decided without the general dispatch: the
        current path is this variant's lone root, the call cannot extend it (no children), the
        path may end, and the root's invariants hold; ``_dispatch`` would reach the same replay.
        None when the general dispatch must decide; else whether a new generation starts (the
        path's live outputs are then invalidated)."""
        if (
            self._path_state is not PathState.EXECUTION
            or node.children
            # Writes to static inputs (KV caches) are allowed whatever else holds; any other
            # write needs the general dispatch's mutation check.
            or not variant.mutated_idxs <= variant.function.static_input_idxs
            or len(self._roots[node.function_id]) != 1
        ):
            return None
        new_generation = self._can_start_new_generation()
        if not new_generation and node.outputs.any_live():
            return None
        if self._why_not_replayable(node, inputs) is not None:
            return None
        return new_generation

    def _find_replayable(self, candidates: dict, variant: _Variant, inputs: Sequence[Any]):
        """The first recorded node for this variant whose invariants hold, and else the last
        reason one did not (None when there was no candidate)."""
        mismatch = None
        for node in candidates.get(variant.id, ()):
            mismatch = self._why_not_replayable(node, inputs)
            if mismatch is None:
                return node, None
        return None, mismatch

    # ---------------------------------------------------------------- variants and skips
    def _new_variant(self, function: GraphedFunction, inputs: Sequence[Any]) -> _Variant:
        variant = _Variant(FunctionId(next(self._variant_ids)), function)
        variant.cpu_scalars = rules.cpu_scalar_positions(self.device, inputs)
        tensors = [(i, x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and i not in variant.cpu_scalars]
        variant.static_skip = rules.device_skip_reason(
            self.device,
            ((f"arg{i}", x.device) for i, x in tensors),
            move_cpu_inputs=self.policy.move_cpu_inputs_to_device,
        ) or rules.symbolic_skip_reason(self.policy, function.dynamic)
        if variant.static_skip is None:
            leading = next(
                (x.shape[0] for i, x in tensors if i not in function.static_input_idxs and x.dim() > 0), None
            )
            variant.static_skip = rules.capture_size_skip_reason(self.policy, leading)
        if self.device.type == "cuda" and self.policy.move_cpu_inputs_to_device:
            variant.cpu_inputs_to_move = tuple(i for i, x in tensors if x.device.type == "cpu")
        function.variants[function.key(inputs)] = variant
        return variant

    def _move_cpu_inputs(self, inputs: Sequence[Any], idxs: tuple[int, ...]) -> list:
        moved = list(inputs)
        for idx in idxs:
            moved[idx] = moved[idx].to(self.device)
        return moved

    def _run_without_graphs(self, variant: _Variant, inputs: Sequence[Any], reason: SkipReason, origin: str) -> Any:
        before = self.skip_log.total()
        self.skip_log.record(variant.function.log_key, reason, origin)
        self.counters["skips"] += self.skip_log.total() - before
        self.counters["skipped_calls"] += 1
        self.last_execution = Execution(ExecutionMode.SKIPPED, variant.function.name, None, str(reason))
        return variant.function.fn(*inputs)

    def _note_skip_of_this_call(self, variant: _Variant, reason: SkipReason, origin: str) -> None:
        """A call that already ran eagerly (warmup, aborted capture) turned out to need a skip."""
        before = self.skip_log.total()
        self.skip_log.record(variant.function.log_key, reason, origin)
        self.counters["skips"] += self.skip_log.total() - before
        self.counters["skipped_calls"] += 1
        self.last_execution = Execution(ExecutionMode.SKIPPED, variant.function.name, None, str(reason))

    def _managed_idxs(self, inputs: Sequence[Any]) -> frozenset[int]:
        """Inputs that are tree-managed in this call (outputs of the current path)."""
        managed = self._path_storage_positions()
        return frozenset(idx for idx, value in enumerate(inputs)
                         if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in managed)

    def _mutation_allowed(self, variant: _Variant, inputs: Sequence[Any]) -> bool:
        return rules.mutation_allowed(self.policy, variant.mutated_idxs, variant.function.static_input_idxs,
                                      self._managed_idxs(inputs))

    def _absorb_findings(self, variant: _Variant, inspector: Inspector, inputs: Sequence[Any]) -> Optional[SkipReason]:
        """Remember what the first run revealed; return the reason this call should count as skipped."""
        variant.inspected = True
        findings = inspector.findings
        if findings.incompatible_op is not None:
            variant.static_skip = SkipReason(rules.INCOMPATIBLE_OP, f" {findings.incompatible_op}")
            variant.skip_origin = findings.incompatible_origin or variant.function.origin
            return variant.static_skip
        if findings.mutated_input_idxs:
            variant.mutated_idxs = frozenset(findings.mutated_input_idxs)
            variant.mutation_origin = "".join(findings.mutation_origins)
            if not self._mutation_allowed(variant, inputs):
                return rules.mutation_skip_reason(len(variant.mutated_idxs))
        return None

    # ---------------------------------------------------------------- paths and generations
    def _children_of_current(self) -> dict:
        if self._current is None:
            return self._roots
        return self._current.children  # a RecordedNode: warmup paths never get here

    def _can_start_new_generation(self) -> bool:
        return rules.can_start_new_generation(
            self._invocation != self._generation_invocation, self._step_marked, self._pending_backward
        )

    def _try_end_path(self) -> bool:
        """End the current path if a new generation may start or nothing of it is live."""
        if self._current is None:
            return False
        if self._can_start_new_generation():
            self._invalidate_path()
        elif self._current.path_any_live():
            return False
        self._current = None
        self._path_state = PathState.NONE
        return True

    def _enter_generation(self) -> None:
        if self._invocation != self._generation_invocation:
            self._generation += 1
        self._generation_invocation = self._invocation
        self._step_marked = False

    def _invalidate_path(self) -> None:
        for node in self._current.path:
            self._invalidate_outputs(node)

    def _invalidate_outputs(self, node: TreeNode) -> None:
        """The node's live outputs are about to be overwritten: make that visible, free owned blocks."""
        outputs = node.outputs
        if not outputs.refs:
            return
        live = [(ref, owned) for ref, owned in zip(outputs.refs, outputs.owned) if ref is not None and ref.alive()]
        if not live:  # the common case: the caller dropped everything (a live tensor implies a live storage)
            outputs.clear()
            return
        self.counters["overwritten_outputs"] += len(live)
        message = None
        for tensor_ref in outputs.tensors:
            tensor = tensor_ref()
            if tensor is not None:
                message = message or overwritten_message(node.function_name, getattr(node, "graph_id", "warmup"))
                mark_overwritten(tensor, message)
        for ref, owned in live:
            if owned and ref.alive():  # marking may already have released the last reference
                self.backend.release_stale(ref)
        outputs.clear()

    def _path_storage_positions(self) -> dict[int, tuple[int, int]]:
        """Data pointer -> (depth, position) of every live output storage on the current path."""
        positions: dict[int, tuple[int, int]] = {}
        if self._current is None:
            return positions
        for node in self._current.path:
            for pos, ref in enumerate(node.outputs.refs):
                if ref is not None and ref.alive():
                    positions.setdefault(ref.data_ptr, (node.depth, pos))
        return positions

    def _checkpoint(self) -> None:
        """Restore the allocator to the current node's post-recording state (see module doc)."""
        node = self._current
        self.counters["checkpoints"] += 1
        live_storages: list[int] = []
        dead_ptrs: list[int] = []
        keep_alive = []  # strong refs so storages cannot die between the check and the call
        for depth, pos in node.allocated_in_checkpoint:
            ref = node.path[depth].outputs.refs[pos]
            storage = ref.storage() if ref is not None else None
            if storage is not None:
                keep_alive.append(storage)
                live_storages.append(storage._cdata)
            elif ref is not None:
                dead_ptrs.append(ref.data_ptr)
        self.backend.apply_checkpoint(node.checkpoint_state, live_storages, dead_ptrs)
        for path_node in node.path:
            outputs = path_node.outputs
            outputs.owned = [ref is not None and ref.alive() for ref in outputs.refs]

    # ---------------------------------------------------------------- warmup / record / replay
    def _warmup(self, variant: _Variant, inputs: Sequence[Any]) -> Any:
        if variant.cpu_scalars:  # as the recording will see them (its buffers are on the device)
            inputs = self._move_cpu_inputs(inputs, variant.cpu_scalars)
        inspector = None if variant.inspected else Inspector(input_storage_index(inputs))
        outputs = self.backend.warmup(variant.function.fn, inputs, inspector)
        node = WarmupNode(variant.id, variant.function.name, self._current)
        input_ptrs = set(input_storage_index(inputs))
        flat, _ = _flatten(outputs)
        refs, seen, produced = [], set(), []
        for value in flat:
            if isinstance(value, torch.Tensor) and value.device == self.device:
                ptr = value.untyped_storage().data_ptr()
                if ptr in input_ptrs:
                    continue  # an input handed back: the caller's tensor, not ours to invalidate
                produced.append(value)
                if ptr not in seen:
                    seen.add(ptr)
                    refs.append(StorageRef(value.untyped_storage()))
        node.outputs.reset(refs, owned=True, tensors=produced)
        self._current = node
        self._path_state = PathState.WARMUP
        self._warmed.add(variant.id)
        self._enter_generation()
        self.counters["warmups"] += 1
        self.last_execution = Execution(ExecutionMode.WARMUP, variant.function.name)
        if inspector is not None:
            reason = self._absorb_findings(variant, inspector, inputs)
            if reason is not None:
                origin = variant.skip_origin if variant.static_skip else variant.mutation_origin
                self._note_skip_of_this_call(variant, reason, origin)
        return outputs

    def _record(self, variant: _Variant, inputs: Sequence[Any]) -> Any:
        parent = self._current
        assert parent is None or isinstance(parent, RecordedNode), "recording under a warmup node"
        path_positions = self._path_storage_positions()
        managed = frozenset(idx for idx, value in enumerate(inputs)
                            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in path_positions)
        in_place = set(variant.function.static_input_idxs) | managed
        copied = tuple(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and i not in in_place)
        expected_dead = self._dead_path_positions(parent)

        inspector = None
        if not variant.inspected:
            static = variant.function.static_input_idxs

            def abort_if(kind: str, idx: Optional[int]) -> bool:
                if kind == "incompatible":
                    return True
                return not rules.mutation_allowed(self.policy, [idx], static, managed)

            inspector = Inspector({}, abort_if=abort_if)
        try:
            recording, raw_outputs = self.backend.record(variant.function.fn, inputs, copied, inspector,
                                                          exact_layout=variant.function.exact_input_layout)
        except InspectionAbort:
            reason = self._absorb_findings(variant, inspector, inputs)
            origin = variant.skip_origin if variant.static_skip else variant.mutation_origin
            self._note_skip_of_this_call(variant, reason or SkipReason(rules.INCOMPATIBLE_OP), origin)
            return variant.function.fn(*inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure: this variant runs eagerly
            # Something in the function cannot be captured (host syncs, unsupported streams...).
            # Run it eagerly from now on; a genuine bug in the function raises again right here.
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            variant.static_skip = SkipReason(rules.CAPTURE_FAILED, f" ({type(exc).__name__}: {detail})")
            variant.skip_origin = variant.function.origin
            self._note_skip_of_this_call(variant, variant.static_skip, variant.skip_origin)
            return variant.function.fn(*inputs)
        if inspector is not None:
            variant.inspected = True
            variant.mutated_idxs = frozenset(inspector.findings.mutated_input_idxs)
            variant.mutation_origin = "".join(inspector.findings.mutation_origins)

        node = RecordedNode(GraphId(next(self._graph_ids)), variant.id, variant.function.name, parent)
        node.recording = recording
        node.copied_idxs = copied
        node.in_place_idxs = frozenset(in_place)
        node.static_idxs = variant.function.static_input_idxs
        # A function whose static inputs are fixed has only its tree-managed inputs checked.
        checked = managed if variant.function.static_inputs_fixed else in_place
        node.in_place_inputs = InPlaceInputs(
            (idx, inputs[idx].data_ptr()) for idx in sorted(checked) if isinstance(inputs[idx], torch.Tensor)
        )
        node.expected_dead = expected_dead
        node.replay_execution = Execution(ExecutionMode.REPLAYED, variant.function.name, node.graph_id)
        node.variant = variant
        user_flat = self._describe_outputs(node, recording, inputs, raw_outputs)
        # Drop the raw outputs before the allocator state is saved: an output that aliased a
        # copied input is the recording's (owning) input buffer, and a block still held here
        # would be saved as allocated, untracked, and leak at the next checkpoint.
        del raw_outputs
        if parent is None:
            self._roots.setdefault(variant.id, []).append(node)
        else:
            parent.add_child(node)
        self._nodes.append(node)
        node.allocated_in_checkpoint = tuple(
            (n.depth, pos) for n in node.path for pos in n.outputs.live_positions()
        )
        node.checkpoint_state = self.backend.checkpoint_state()
        self._current = node
        self._path_state = PathState.RECORDING
        self._enter_generation()
        self.counters["recordings"] += 1
        self._note_recorded_shape(variant)
        self.last_execution = Execution(ExecutionMode.RECORDED, variant.function.name, node.graph_id)
        return _unflatten(user_flat, node.output_structure)

    def _dead_path_positions(self, parent: Optional[RecordedNode]) -> tuple[tuple[int, int], ...]:
        if parent is None:
            return ()
        return tuple(
            (node.depth, pos)
            for node in parent.path
            for pos, ref in enumerate(node.outputs.refs)
            if ref is None or not ref.alive()
        )

    def _describe_outputs(self, node: RecordedNode, recording, inputs: Sequence[Any], raw_outputs: Any) -> list:
        """Classify each output (pool / input view / constant), remember its geometry, and return
        the flat outputs the caller gets for this recording call."""
        flat, node.output_structure = _flatten(raw_outputs)
        graph_inputs = list(inputs)
        for idx, buffer in recording.buffers.items():
            graph_inputs[idx] = buffer
        input_storage = {}
        for idx, value in enumerate(graph_inputs):
            if isinstance(value, torch.Tensor):
                input_storage.setdefault(value.untyped_storage().data_ptr(), idx)
        storage_index: dict[int, int] = {}
        specs, pool_positions, storages = [], [], []
        for pos, value in enumerate(flat):
            if not isinstance(value, torch.Tensor):
                specs.append(OutputSpec("constant", value=value))
                continue
            storage = value.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in input_storage:
                idx = input_storage[ptr]
                rel = value.storage_offset() - graph_inputs[idx].storage_offset()
                specs.append(OutputSpec("input", index=idx, geometry=TensorGeometry.of(value, rel)))
            elif value.device == self.device and self.backend.is_pool_memory(value):
                if ptr not in storage_index:
                    storage_index[ptr] = len(storages)
                    storages.append(storage)
                specs.append(OutputSpec("pool", index=storage_index[ptr], geometry=TensorGeometry.of(value)))
                pool_positions.append(pos)
            else:
                specs.append(OutputSpec("constant", value=value))
        node.output_specs = specs
        node.pool_positions = tuple(pool_positions)
        node.storage_sizes = [(s.data_ptr(), s.nbytes()) for s in storages]
        self.backend.finish_record(recording, flat, tuple(pool_positions))
        if self.backend.record_outputs_are_owning:
            node.outputs.reset([StorageRef(s) for s in storages], owned=True, tensors=[flat[p] for p in pool_positions])
            for pos, spec in enumerate(specs):
                if spec.kind == "input":  # not a view of the recording's buffer: of the caller's input
                    flat[pos] = _input_view(inputs, spec)
            return flat
        user_flat = self._outputs_over_pool(node, inputs)
        node.outputs.owned = [True] * len(node.outputs.refs)  # as the allocator would: recorded blocks
        return user_flat

    def _outputs_over_pool(self, node: RecordedNode, inputs: Sequence[Any]) -> list:
        """Fresh tensors over the node's recorded output memory (non-owning), tracked weakly."""
        device = self.device
        storages = [non_owning_storage(ptr, nbytes, device) for ptr, nbytes in node.storage_sizes]
        flat = []
        for spec in node.output_specs:
            if spec.kind == "pool":
                flat.append(tensor_on(storages[spec.index], spec.geometry))
            elif spec.kind == "input":
                flat.append(_input_view(inputs, spec))
            else:
                flat.append(spec.value)
        node.outputs.reset(
            [StorageRef(s, ptr, nbytes) for s, (ptr, nbytes) in zip(storages, node.storage_sizes)],
            owned=False,
            tensors=[flat[p] for p in node.pool_positions],
        )
        return flat

    def _why_not_replayable(self, node: RecordedNode, inputs: Sequence[Any]) -> Optional[str]:
        moved = node.in_place_inputs.first_moved(inputs)  # hot path: one C++ call on CUDA builds
        if moved is not None:
            kind = "static" if moved in node.static_idxs else "tree-managed"
            return f"{kind} input {moved} moved"
        if node.expected_dead and not node.expected_dead_still_dead(node.path):
            return "an output this graph may overwrite is still alive"
        return None

    def _replay(self, node: RecordedNode, inputs: Sequence[Any], invalidate_path: bool = False) -> Any:
        # Launch first: everything below is bookkeeping the GPU need not wait for.
        self.backend.replay(node.recording, inputs)
        if invalidate_path:  # the fast path ends the current path here, as _try_end_path would
            self._invalidate_path()
        self._current = node
        self._path_state = PathState.EXECUTION
        self._enter_generation()
        flat = self._outputs_over_pool(node, inputs)
        node.replays += 1
        node.last_mode = "replayed"
        self.counters["replays"] += 1
        self.last_execution = node.replay_execution
        if node.parent is None:
            node.variant.hot_root = node
        return _unflatten(flat, node.output_structure)

    def _note_recorded_shape(self, variant: _Variant) -> None:
        if variant.has_recording:
            return
        variant.has_recording = True
        function = variant.function
        shapes = sum(1 for v in function.variants.values() if v.has_recording)
        if rules.should_warn_dynamic_shapes(self.policy, shapes):
            self.counters["dynamic_shape_warnings"] += 1
            log.warning(
                "cgtree: function %s has been recorded at %d distinct input shapes (more than "
                "dynamic_shape_warn_limit=%d); each shape costs a recording and pool memory. "
                "Consider capture_sizes, padding inputs to a few sizes, or skip_dynamic_graphs.",
                function.name,
                shapes,
                self.policy.dynamic_shape_warn_limit,
            )

    # ---------------------------------------------------------------- status helpers
    def _node_status(self, node: RecordedNode) -> dict:
        return {
            "id": node.graph_id,
            "function": node.function_name,
            "parent": node.parent.graph_id if node.parent is not None else None,
            "children": [child.graph_id for kids in node.children.values() for child in kids],
            "mode": node.last_mode,
            "replays": node.replays,
            "depth": node.depth,
        }

    def _raises_on_overwrite(self) -> bool:
        return CAN_RAISE_ON_OVERWRITTEN_ACCESS and self.backend_name == "cuda"

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"tree manager on {self.device} is closed")


def _input_view(inputs: Sequence[Any], spec: OutputSpec) -> torch.Tensor:
    """The view of the caller's input that an output aliasing that input stands for."""
    base, geometry = inputs[spec.index], spec.geometry
    return base.as_strided(geometry.size, geometry.stride, base.storage_offset() + geometry.offset)


def _flatten(outputs: Any) -> tuple[list, Any]:
    """Flat list of outputs plus what it takes to rebuild them; fast for the common shapes."""
    if isinstance(outputs, torch.Tensor):
        return [outputs], None
    if type(outputs) is tuple:
        return list(outputs), tuple
    if type(outputs) is list:
        return list(outputs), list
    flat, spec = tree_flatten(outputs)
    return flat, spec


def _unflatten(flat: list, structure: Any) -> Any:
    if structure is None:
        return flat[0]
    if structure is tuple:
        return tuple(flat)
    if structure is list:
        return flat
    return tree_unflatten(flat, structure)
