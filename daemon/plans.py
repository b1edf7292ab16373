"""Prepared submits: the steady state of a submit loop as one 20-byte datagram on the session's
lane, instead of an envelope the daemon decodes, checks and dispatches every time.

A submit whose inputs came packed and were remembered (``cgtree.daemon.input_memo``), whose
outputs all went to the graph's output buffer and that wrote no CPU input is offered a plan:
``"plan": <id>`` in its reply. ``PLAN_REQUEST(request id, plan id)`` on the lane then runs the
same graph on the same input views into the same output buffer. When that call replays and its
outputs fit the buffer's slots, the answer is ``PLAN_REPLY(request id, buffer generation, node
id, daemon_us)``: the client already knows the outputs' layout from the reply that offered the
plan. Anything else (a warmup, a recording, a skip, outputs of another shape) is answered with
the full submit reply, as the general path would. A plan that no longer stands for that submit
is answered with the error ``plan_expired``; the client then submits the general way, which
may offer a new plan.

In-place recordings. A plan's inputs are fixed views (the client's CUDA buffers, mapped once)
and its outputs go to a fixed buffer, so after ``DIRECT_AFTER_RUNS`` (50) runs a plan gets a
recording of its own in the session's tree: the graph with every input static (read where the
client keeps it, no copy into recording buffers) and the copies into the output buffer captured
at its end. A run is then one replay and a host synchronize; the general way costs an input
copy, the replay, and a copy per output, each a kernel launch from Python. The recording is a
root of its own (named ``<graph> [plan]``; warmups, recordings and replays count as any
other's). Its key is every address, geometry and scalar it baked in, so a plan made again
later over the same memory finds it; at most ``MAX_DIRECT_RECORDINGS`` per session device
(recordings cannot be dropped one by one), after which plans run the general way. Because
whoever runs it passes exactly those addresses, the tree checks them once, at recording
(``static_inputs_fixed``), not before every replay: a model's hundreds of weights would cost
60-100 ns each per run.

Why: on the H200 host a steady-state submit of a tiny graph spent ~75 us outside the command
itself, in envelope encode/decode, dispatch and descriptor handling on both sides
(docs/PERFORMANCE.md section 6); a plan skips all of it. The in-place recording then saves the
copies: ~25 us of the daemon's ~60 us on the tiny model (section 8).

Invariants:
- A plan run is exactly the submit it stands for. It holds the function, weights, input views
  and output buffer of that submit; it is valid while the session still maps the same function
  for the graph and the same output buffer (checked on every run by identity), and it is
  forgotten with the session's client-visible state (parking, releasing outputs, closing).
- An in-place recording reads and writes only memory its plan holds references to (the views
  keep the client's mappings open, the plan keeps the buffer), at the addresses its key names.
- Wire formats are fixed-size structs whose 4-byte magic starts with 0xc1, a byte msgpack never
  uses: a plan datagram can never be read as an envelope, nor an envelope as a plan.
- Plan ids are daemon-unique and looked up only in the requesting session: no session can run
  another's plan.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cgtree.daemon.protocol import ProtocolError
from cgtree.errors import LaunchVetoed

PLAN_REQUEST_MAGIC = b"\xc1PQ1"
PLAN_REPLY_MAGIC = b"\xc1PR1"
# magic, request id, plan id
PLAN_REQUEST = struct.Struct("<4sqQ")
# magic, request id, output buffer generation, node id (-1: none), daemon_us
PLAN_REPLY = struct.Struct("<4sqQqd")
MAX_PLANS_PER_DEVICE = 64
# Plan runs the general way before a plan gets its in-place recording. That recording warms up
# and records like any (two calls that do not replay, reported as such); only a long loop earns
# it back, and a short one keeps the modes it would see without it.
DIRECT_AFTER_RUNS = 50
MAX_DIRECT_RECORDINGS = 8
# In-place runs that did not replay (warmup, recording) before the plan goes back for good.
MAX_DIRECT_MISSES = 4

log = logging.getLogger("cgtree.daemon.plans")

_plan_ids = itertools.count(1)


@dataclass(frozen=True)
class PlanServices:
    """What a plan run needs of the daemon, resolved once (no per-request context)."""

    devices: dict  # device name -> DeviceRuntime
    keepalive: Callable[[], None]
    metrics: Any


def is_plan_request(frames: list) -> bool:
    return len(frames) == 1 and len(frames[0]) == PLAN_REQUEST.size and bytes(frames[0][:4]) == PLAN_REQUEST_MAGIC


def parse_plan_request(frame: Any) -> tuple[int, int]:
    """(request id, plan id) of a datagram ``is_plan_request`` accepted."""
    _, request_id, plan_id = PLAN_REQUEST.unpack(bytes(frame))
    return request_id, plan_id


def pack_plan_request(request_id: int, plan_id: int) -> bytes:
    return PLAN_REQUEST.pack(PLAN_REQUEST_MAGIC, request_id, plan_id)


def pack_plan_reply(request_id: int, generation: int, node_id: Optional[int], daemon_us: float) -> bytes:
    return PLAN_REPLY.pack(PLAN_REPLY_MAGIC, request_id, generation, -1 if node_id is None else node_id, daemon_us)


def parse_plan_reply(frame: Any) -> Optional[tuple[int, int, Optional[int], float]]:
    """(request id, generation, node id, daemon_us) of a plan reply; None for any other frame."""
    if len(frame) != PLAN_REPLY.size or bytes(frame[:4]) != PLAN_REPLY_MAGIC:
        return None
    _, request_id, generation, node_id, daemon_us = PLAN_REPLY.unpack(bytes(frame))
    return request_id, generation, None if node_id < 0 else node_id, daemon_us


@dataclass(eq=False)
class SubmitPlan:
    """What a plan run needs: the submit it stands for, resolved once."""

    plan_id: int
    graph_id: str
    function_key: tuple  # the session device's key of ``fn`` (graph id, in-place inputs)
    fn: Callable  # the session's GraphedFunction for the graph
    weights: list
    inputs: list
    buffer: Any  # the OutputBuffer the outputs go to
    runs: int = 0
    direct: Optional[Callable] = None  # the in-place recording's GraphedFunction, once made
    direct_args: tuple = ()
    direct_refused: bool = False  # no in-place recording for this plan (cap, capture failure...)
    direct_misses: int = 0
    # Whether its last run the general way replayed: the graph runs under graphs for these
    # inputs with every policy in force (skips, capture sizes, mutation support) applied.
    replayed_last: bool = False


class PlanBook:
    """One session device's plans: by id, and by (graph id, packed inputs) so that the same
    submit is offered the same plan again; and its in-place recordings, which outlive plans."""

    def __init__(self) -> None:
        self.by_id: dict[int, SubmitPlan] = {}
        self._by_submit: dict[tuple[str, bytes], int] = {}
        self.direct: dict[tuple, Callable] = {}  # (function key, buffer id, what it baked in) -> GraphedFunction

    def offer(self, graph_id: str, packed: bytes, function_key: tuple, fn: Callable, weights: list, inputs: list,
              buffer: Any) -> SubmitPlan:
        known = self.by_id.get(self._by_submit.get((graph_id, packed), -1))
        if known is not None and known.fn is fn and known.buffer is buffer and known.inputs is inputs:
            return known
        if len(self.by_id) >= MAX_PLANS_PER_DEVICE:
            self.forget()  # plans are cheap to offer again; a loop keeps only its current one
        plan = SubmitPlan(next(_plan_ids), graph_id, function_key, fn, list(weights), inputs, buffer)
        self.by_id[plan.plan_id] = plan
        self._by_submit[(graph_id, packed)] = plan.plan_id
        return plan

    def forget(self) -> None:
        """Forget the plans (the in-place recordings stay: the tree keeps them anyway)."""
        self.by_id.clear()
        self._by_submit.clear()

    def __len__(self) -> int:
        return len(self.by_id)


def find_plan(session: Any, plan_id: int) -> tuple[Any, SubmitPlan]:
    """(session device, plan) for ``plan_id`` in ``session``, still standing for its submit;
    raises ``plan_expired`` otherwise."""
    for state in session.devices.values():
        plan = state.plans.by_id.get(plan_id)
        if plan is None:
            continue
        if state.functions.get(plan.function_key) is not plan.fn or state.output_buffers.get(plan.graph_id) is not plan.buffer:
            state.plans.by_id.pop(plan_id, None)
            break
        return state, plan
    raise ProtocolError("plan_expired", f"plan {plan_id} is not (or no longer) one of this session's: submit normally")


@dataclass(frozen=True)
class PlanReplayed:
    """A plan run that replayed into its slots (what ``PLAN_REPLY`` and a doorbell carry)."""

    generation: int
    node_id: Optional[int]
    daemon_us: float
    device_index: int


@dataclass(frozen=True)
class PlanVetoed:
    """A gated plan run that did not launch (``cgtree.daemon.doorbell.LaunchGate``): nothing ran."""

    refusal: str  # "vetoed" (by the client) or "late" (no verdict in time)


def run_plan(services: PlanServices, session: Any, request_id: int, plan_id: int, *, finish_general: Callable,
             settle: Optional[Callable[[Any], None]] = None, gate: Any = None) -> Any:
    """Run a plan: ``PlanReplayed`` when it replayed into the same slots, else the frames of the
    general submit reply (``finish_general(state, runtime, graph_id, outputs, received)``).

    ``settle(runtime)`` makes a replayed run's outputs readable by the client: by default a host
    synchronize before the answer; a doorbell enqueues its done-write instead. ``gate`` (a gated
    doorbell request's ``LaunchGate``) is called by the tree manager where the run would launch;
    when it refuses, nothing ran and the answer is ``PlanVetoed``."""
    try:
        return _run_plan(services, session, plan_id, finish_general, settle, gate)
    except LaunchVetoed:  # only a gate raises it
        session.counters["gate_" + (gate.refusal or "vetoed")] += 1
        return PlanVetoed(gate.refusal or "vetoed")


def _run_plan(services: PlanServices, session: Any, plan_id: int, finish_general: Callable,
              settle: Optional[Callable[[Any], None]], gate: Any) -> Any:
    received = time.perf_counter()
    state, plan = find_plan(session, plan_id)
    runtime = services.devices[state.device]
    plan.runs += 1
    # Only a plan whose general runs replay gets one: the in-place recording has every input
    # static, so it must not stand in for a call the policies send elsewhere.
    if (plan.direct is None and not plan.direct_refused and plan.replayed_last and plan.runs > DIRECT_AFTER_RUNS
            and runtime.is_cuda):
        try:
            attach_direct(state, plan)
        except Exception:  # noqa: BLE001 - an optimization: its failure must not fail the submit
            plan.direct_refused = True
            log.exception("plan %d: no in-place recording; it runs the general way", plan.plan_id)
    if plan.direct is not None:
        services.keepalive()
        try:
            _gated_call(state.manager, gate, plan.direct, plan.direct_args)
        except DirectPlanMismatch:
            plan.direct, plan.direct_refused = None, True  # and this call the general way, below
        else:
            services.keepalive()
            execution = state.manager.last_execution
            mode = getattr(getattr(execution, "mode", None), "value", None)
            if mode == "replayed":
                plan.buffer.generation += 1  # the replay wrote the buffer
                return _replayed(services, session, runtime, plan, execution, received, settle)
            plan.direct_misses += 1
            if mode not in ("warmup", "recorded") or plan.direct_misses > MAX_DIRECT_MISSES:
                plan.direct, plan.direct_refused = None, True  # ran without graphs: the general way from now on
            # The outputs are in the buffer already; the general reply describes them and says
            # what happened (a warmup or a recording of the in-place graph). Its copy_in copies
            # the slots onto themselves: two calls per recording, not worth a path of their own.
            return finish_general(state, runtime, plan.graph_id, list(plan.buffer.views()), received)
    services.keepalive()
    outputs = _gated_call(state.manager, gate, plan.fn, (*plan.weights, *plan.inputs))
    services.keepalive()
    execution = state.manager.last_execution
    flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    del outputs
    mode = getattr(getattr(execution, "mode", None), "value", None)
    plan.replayed_last = mode == "replayed"
    if mode != "replayed" or not _all_on(flat, runtime.device) or not plan.buffer.fits(flat):
        return finish_general(state, runtime, plan.graph_id, flat, received)
    plan.buffer.copy_in(flat)
    del flat  # the tree must see replay outputs dead: nothing of the pool is kept here
    return _replayed(services, session, runtime, plan, execution, received, settle)


def _gated_call(manager: Any, gate: Any, fn: Callable, args: tuple) -> Any:
    """``fn(*args)``, its manager call passing ``gate`` first (a gate already passed lets it
    through at once); the gate never outlives the call, whether or not the call reached it."""
    if gate is None:
        return fn(*args)
    manager.launch_gate = gate
    try:
        return fn(*args)
    finally:
        manager.launch_gate = None


def _replayed(services: PlanServices, session: Any, runtime: Any, plan: SubmitPlan, execution: Any, received: float,
              settle: Optional[Callable[[Any], None]]) -> PlanReplayed:
    if settle is None:
        runtime.synchronize()  # the client reads the outputs as soon as it has the reply
    else:
        settle(runtime)
    session.counters["submits"] += 1
    daemon_us = (time.perf_counter() - received) * 1e6
    services.metrics.observe_submit(daemon_us * 1e-6, "replayed", None)
    return PlanReplayed(plan.buffer.generation, getattr(execution, "node_id", None), round(daemon_us, 1),
                        runtime.device.index if runtime.is_cuda else 0)


# ---------------------------------------------------------------------------------------------
# In-place recordings


class DirectPlanMismatch(RuntimeError):
    """The graph's outputs no longer fit the plan's output buffer (raised inside the recorded
    function, so the tree never records such a call)."""


def attach_direct(state: Any, plan: SubmitPlan) -> None:
    """Give ``plan`` its in-place recording: found by key, made if under the cap, else refused."""
    views = plan.buffer.views()
    args = (*plan.weights, *plan.inputs, *views)
    key = (plan.function_key, plan.buffer.buffer_id, tuple(_baked(value) for value in args))
    direct = state.plans.direct.get(key)
    if direct is None:
        if len(state.plans.direct) >= MAX_DIRECT_RECORDINGS:
            plan.direct_refused = True
            return
        graphed = plan.fn
        direct = state.manager.cudagraphify(
            writing_into(graphed.fn, len(args) - len(views)), args, static_input_idxs=range(len(args)),
            name=f"{graphed.name} [plan]", kind="inference", dynamic=graphed.dynamic,
            # Its key is every argument's address: whoever finds it by key passes those.
            static_inputs_fixed=True,
        )
        state.plans.direct[key] = direct
    plan.direct, plan.direct_args = direct, args


def writing_into(fn: Callable, n_args: int) -> Callable:
    """``fn`` over the first ``n_args`` arguments, its outputs copied into the remaining ones
    (the output buffer's slot views); returns nothing, so the tree keeps no output alive."""

    def run_into_buffer(*args: Any) -> tuple:
        outputs = fn(*args[:n_args])
        flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        views = args[n_args:]
        if len(flat) != len(views) or not all(
            isinstance(value, torch.Tensor) and value.shape == view.shape and value.dtype == view.dtype
            for value, view in zip(flat, views)
        ):
            raise DirectPlanMismatch("the graph's outputs do not fit the plan's output buffer")
        for view, value in zip(views, flat):
            view.copy_(value)
        return ()

    return run_into_buffer


def _baked(value: Any) -> tuple:
    """What a recording bakes in about one argument: a tensor's address and geometry, a
    number's value."""
    if isinstance(value, torch.Tensor):
        return (value.data_ptr(), value.dtype, tuple(value.shape), value.stride(), value.device)
    return (type(value), value)


def _all_on(tensors: list, device: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device == device for t in tensors)
