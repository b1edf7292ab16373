"""Prepared submits (``cgtree.daemon.plans``) on the client's side (``Plans``).

A submit reply may offer a plan: the daemon keeps the decoded inputs and the recording, and the
next submit of the same graph on the same packed inputs is a plan run: a few bytes on the lane,
or a ring of the lane's doorbell page (``cgtree.daemon.doorbell``), answered with a generation
number; the outputs are built from the layout kept with the plan.

Invariants:
- A plan is used only for the very inputs it was offered for (``known`` is keyed by the packed
  inputs; ``hot`` by the inputs' identity, checked with ``_same_inputs``).
- Whatever a plan run cannot do (no lane, the plan expired, the session is gone) returns None and
  the general submit path takes over; a plan the daemon would not run is forgotten.
- A doorbell run returns its outputs only once the device wrote its done word, or, with
  stream-ordered outputs (opt-in, ``cgtree.client.stream_order``), once the caller's current
  stream waits for that word.
- The report of a plan run is kept raw (``run``) and turned into ``last_execution`` /
  ``last_timing`` only when they are read (``settle_report``).
- A submit's ``Observation`` (``Client.submit_observing``) runs once per submit; a doorbell run
  runs it between the ring and the answer, while the daemon and the device work.
- A hot plan's doorbell run is *gated* where the daemon's page allows it
  (``cgtree.daemon.doorbell``): the client rings first, then checks that the inputs are the
  plan's, runs the submit's ``Veto`` (``Client.submit_vetoable``) and synchronizes its stream,
  and only then tells the daemon to launch; the daemon has meanwhile done everything up to the
  launch. A run the client vetoed, or whose verdict came too late, did not happen at all.
  Elsewhere the same checks run before anything is sent.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cgtree.client.connection import _decode_reply_for
from cgtree.client.doorbell import DoorbellHangup, DoorbellTimeout, fits_request
from cgtree.client.errors import ClientError, DaemonError
from cgtree.client.gate_backoff import GateBackoff
from cgtree.client.inputs import PACKED_INPUTS_KEPT, _same_inputs
from cgtree.client.lane import MOVED, ClientLane, LaneClosed, LaneTimeout
from cgtree.client.outputs import OVERWRITTEN_MESSAGE, OutputMapping, _mark_stale, _output_slot
from cgtree.client.registration import GraphHandle
from cgtree.daemon.doorbell import ABORTED, ON_LANE, REPLAYED
from cgtree.daemon.plans import pack_plan_request, parse_plan_reply

log = logging.getLogger("cgtree.client")


class Observation:
    """A check of client state run once while the daemon works on a submit; its answer is kept.
    What it raises is kept too and raised by ``result``, after the submit: raised between a
    ring and its answer, it would leave a request in flight on the page."""

    __slots__ = ("_observe", "_ran", "_value", "_error")

    def __init__(self, observe: Callable[[], Any]) -> None:
        self._observe = observe
        self._ran = False
        self._value: Any = None
        self._error: Optional[BaseException] = None

    def run(self) -> None:
        if self._ran:
            return
        self._ran = True
        try:
            self._value = self._observe()
        except Exception as exc:  # noqa: BLE001 - raised by result(), once the submit is over
            self._error = exc

    def result(self) -> Any:
        self.run()
        if self._error is not None:
            raise self._error
        return self._value


class Veto(Observation):
    """A check of client state that decides whether a submit may run at all (the compile
    backend's check that no weight changed since upload, for a graph that writes its inputs: a
    run on stale weights would leave its writes behind). Run once per submit: on a gated doorbell
    run between the ring and the launch, elsewhere before anything is sent. A truthy answer
    vetoes the run, and so does an exception (raised by ``result`` once the submit is over)."""

    __slots__ = ()

    def vetoes(self) -> bool:
        self.run()
        return self._error is not None or bool(self._value)


class Miss(enum.Enum):
    """A hot plan run that did not run, and the general path should (the plan stands)."""

    INPUTS_DIFFER = "the inputs are not the ones the plan was found by"
    GATE_LATE = "the daemon gave up waiting for the verdict"


@dataclass
class Plan:
    """A prepared submit the daemon offered (``cgtree.daemon.plans``), and its outputs' layout."""

    plan_id: int
    buffer_id: int
    slots: list  # per output: (layout, byte offset, bytes) in the buffer
    function: str
    packed: bytes  # the packed inputs it was offered for (its key in Plans.known)
    overwritten: str  # the message an output of an earlier run raises


class Plans:
    """The plans the daemon offered, the one each graph's loop runs now, and the last run's report."""

    def __init__(self, client: Any, doorbell: Optional[bool]) -> None:
        self.client = client
        # A plan run's report, turned into last_execution / last_timing only when they are read:
        # building two dicts per submit is a measurable share of a tiny graph's round trip.
        self.run: Optional[tuple] = None  # (plan, node id, daemon_us, started, sent, answered, done)
        self.known: dict[tuple, Plan] = {}  # (device, graph id, packed inputs) -> prepared submit
        # (device, graph id) -> the plan its last submit ran and the identity of those inputs: a
        # loop over the same tensors finds its plan without describing or packing anything.
        self.hot: dict[tuple[str, str], tuple[list, Plan]] = {}
        self.use_doorbell = (os.environ.get("CGTREE_DOORBELL", "1") not in ("0", "off", "false")) if doorbell is None \
            else bool(doorbell)
        # When gated runs are late too often, check before ringing for a while (a pure policy).
        self.gates = GateBackoff()

    def settle_report(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        plan, node_id, daemon_us, started, sent, answered, done = run
        self.client._last_execution = {"mode": "replayed", "node_id": node_id, "function": plan.function,
                                       "skip_reason": None, "daemon_us": daemon_us, "plan": plan.plan_id}
        self.client._last_timing = _timing(started, sent, answered, done)

    def remember(self, handle: GraphHandle, packed: bytes, reply: dict) -> None:
        """Keep the plan a submit reply offered (``cgtree.daemon.plans``) with its outputs' layout."""
        buffer_id = self.client.buffers.graph_buffer.get((handle.device, handle.graph_id))
        mapping = self.client.buffers.mappings.get(buffer_id) if buffer_id is not None else None
        if mapping is None or self.client.connection.lane.offer is None:
            return
        slots = [_output_slot(desc, mapping, f"output {i}") for i, desc in enumerate(reply.get("outputs") or [])]
        if len(self.known) >= PACKED_INPUTS_KEPT:
            self.known.clear()
            self.hot.clear()
        execution = reply.get("execution") or {}
        self.known[(handle.device, handle.graph_id, packed)] = Plan(
            reply["plan"], buffer_id, slots, execution.get("function", ""), packed,
            OVERWRITTEN_MESSAGE.format(graph=handle.short_name))

    def forget(self, handle: GraphHandle, plan: "Plan") -> None:
        """The daemon would not run ``plan`` (expired, no lane...): the general way from now on."""
        self.known.pop((handle.device, handle.graph_id, plan.packed), None)
        key = (handle.device, handle.graph_id)
        hot = self.hot.get(key)
        if hot is not None and hot[1] is plan:
            del self.hot[key]

    def submit_planned(self, handle: GraphHandle, plan: "Plan", started: float,
                       observation: Optional[Observation] = None, *, identity: Optional[tuple] = None,
                       veto: Optional[Veto] = None) -> Any:
        """The submit as a plan run on the lane: its outputs (a tuple), or why not. None: it must
        go the general way and the plan is gone (no lane, the plan expired, the session is gone:
        the general path deals with each). A ``Miss``: the general way, the plan stands.
        ``veto`` itself: it vetoed, nothing ran. ``identity`` (marks, inputs): the hot plan's
        inputs to check; they and ``veto`` are checked after the ring on a gated doorbell run,
        before anything is sent otherwise."""
        self.client.connection.check_daemon_before_send("submit", started)
        lane = (self.client.connection.lane.attached if self.client.connection.lane.attached is not None
                else self.client.connection.lane.for_request("submit", [b""]))
        mapping = self.client.buffers.mappings.get(plan.buffer_id)
        if lane is None or mapping is None or self.client.session_id is None:
            return None
        doorbell = lane.doorbell
        # A sleeping daemon is rung too, and kicked (``ClientDoorbell.rouse``): its wake-up costs
        # what a lane request's would, and the run still answers at its launch, with no host
        # synchronize in the daemon and the outputs built while the device works.
        rings = self.use_doorbell and doorbell is not None and fits_request(plan.plan_id)
        if rings and (identity is not None or veto is not None) and doorbell.gates(plan.plan_id) and self.gates.allows():
            return self.submit_rung(handle, plan, lane, mapping, started, observation, identity, veto)
        if identity is not None and not _same_inputs(*identity):
            return Miss.INPUTS_DIFFER
        if veto is not None and veto.vetoes():
            return veto
        if rings:
            return self.submit_rung(handle, plan, lane, mapping, started, observation)
        self.client.encoder.settle(handle.device)
        request_id = next(self.client.connection.ids)
        message = [pack_plan_request(request_id, plan.plan_id)]
        sent = time.perf_counter()
        raw = self.client.connection.lane.exchange(lane, "submit", message, self.client.timeout_s)
        if raw is None:
            return None
        answered = time.perf_counter()
        fast = parse_plan_reply(raw[0]) if raw is not MOVED and len(raw) == 1 else None
        if fast is None:
            return self.general_outcome(handle, plan, raw, request_id, message, (started, sent, answered))
        reply_id, generation, node_id, daemon_us = fast
        if reply_id != request_id:
            self.client.connection.lane.close()
            raise ClientError("the daemon answered a plan run with another request's reply")
        outputs = self.outputs_of(mapping, plan, generation)
        self.client.connection.last_reply_at = done = time.perf_counter()
        self.run = (plan, node_id, daemon_us, started, sent, answered, done)
        return outputs

    def submit_rung(self, handle: GraphHandle, plan: "Plan", lane: ClientLane, mapping: "OutputMapping",
                    started: float, observation: Optional[Observation] = None, identity: Optional[tuple] = None,
                    veto: Optional[Veto] = None) -> Any:
        """The plan run through the lane's doorbell page (``cgtree.daemon.doorbell``): the
        observation runs and the outputs are built while the daemon and the device work, then
        they are returned once the device wrote its done word. With ``identity`` or ``veto`` the
        request is gated: rung first, launched once they passed (``submit_planned`` says what
        it returns)."""
        doorbell = lane.doorbell
        gated = identity is not None or veto is not None
        try:
            if gated:
                seq = doorbell.ring(plan.plan_id, gated=True)
                kicked = doorbell.rouse(lane)
                sent = time.perf_counter()
                miss, failure = self._judge(handle, doorbell, seq, identity, veto)
            else:
                self.client.encoder.settle(handle.device)
                seq = doorbell.ring(plan.plan_id)
                kicked = doorbell.rouse(lane)
                sent = time.perf_counter()
                miss = failure = None
            if observation is not None and miss is None:
                observation.run()
            status, (generation, node_id, daemon_us, device_index) = doorbell.wait_ack(
                seq, lane, self.client.timeout_s, self.client.connection.lane.spin_now, kicked=kicked)
            answered = time.perf_counter()
            if gated:
                self._gate_outcome(late=status == ABORTED and miss is None)
            if status == ABORTED or miss is not None:
                if status == ON_LANE:
                    lane.receive(self.client.timeout_s, self.client.connection.lane.spin_now)  # refused before the gate
                elif status == REPLAYED:
                    self.client.connection.lane.close()
                    raise ClientError(f"the daemon launched gated request {seq}, which this client did not let it")
                if failure is not None:
                    raise failure
                return miss if miss is not None else Miss.GATE_LATE  # the daemon gave up waiting: the general way
            if status != REPLAYED:
                raw = lane.receive(self.client.timeout_s, self.client.connection.lane.spin_now)  # sent before the ack
                return self.general_outcome(handle, plan, raw, seq, [], (started, sent, answered))
            outputs = self.outputs_of(mapping, plan, generation)
            if not self.ordered_on_stream(handle, doorbell, lane, device_index, seq):
                doorbell.wait_done(device_index, seq, lane, self.client.timeout_s, self.client.connection.lane.spin_now)
        except (DoorbellTimeout, LaneTimeout, DoorbellHangup, LaneClosed) as exc:
            raise self.client.connection.lane.failed(exc, "submit", self.client.timeout_s, "doorbell") from None
        self.client.connection.last_reply_at = done = time.perf_counter()
        self.run = (plan, node_id, daemon_us, started, sent, answered, done)
        return outputs

    def _judge(self, handle: GraphHandle, doorbell: Any, seq: int, identity: Optional[tuple],
               veto: Optional[Veto]) -> tuple[Any, Optional[BaseException]]:
        """A gated request's checks, then its verdict: (miss, failure), both None to launch.
        Before the launch the inputs must be written (the stream synchronized): the daemon reads
        them as it launches. What fails here vetoes, and is raised once the ack is in: the
        request must be answered before the next one rings."""
        miss: Any = None
        failure: Optional[BaseException] = None
        try:
            if identity is not None and not _same_inputs(*identity):
                miss = Miss.INPUTS_DIFFER
            elif veto is not None and veto.vetoes():
                miss = veto
            else:
                self.client.encoder.settle(handle.device)
        except BaseException as exc:  # noqa: BLE001 - raised by submit_rung after the ack
            miss, failure = Miss.INPUTS_DIFFER, exc
        doorbell.verdict(seq, miss is None)
        return miss, failure

    def _gate_outcome(self, late: bool) -> None:
        """Tell the backoff policy how a gated run went; say so when it stops gating."""
        if self.gates.record(late):
            log.warning("cgtree: %d of the last %d gated doorbell runs reached the daemon's launch before this "
                        "client's checks were done; checking before ringing for the next %d hot runs",
                        self.gates.late_limit, self.gates.recent.maxlen, self.gates.retry_after)

    def ordered_on_stream(self, handle: GraphHandle, doorbell: Any, lane: ClientLane, device_index: int,
                          seq: int) -> bool:
        """Whether the caller's stream now waits for run ``seq``'s done word instead of this thread
        (``cgtree.client.stream_order``: opt-in, CUDA outputs in a process with a CUDA context)."""
        stream_order = self.client.stream_order
        if not stream_order.enabled or not handle.device.startswith("cuda") or not torch.cuda.is_initialized():
            return False
        return stream_order.wait_on_stream(doorbell, lane.sock, device_index, seq, _cuda_index(handle.device),
                                           self.client.connection.watch.bound)

    def outputs_of(self, mapping: "OutputMapping", plan: "Plan", generation: int) -> tuple:
        """The plan's outputs in its buffer's slots, written by generation ``generation``."""
        _mark_stale(mapping, plan.overwritten)  # the previous submit's outputs
        mapping.generation = generation
        outputs = tuple([self.client.buffers.view_at(mapping, slot) for slot in plan.slots])
        mapping.handed_out = [weakref.ref(t) for t in outputs]
        return outputs

    def general_outcome(self, handle: GraphHandle, plan: "Plan", raw: Any, request_id: int, message: list,
                        stamps: tuple) -> Optional[tuple]:
        """A plan run answered with the full submit reply (a recording, a skip, new outputs) or a
        refusal: its outputs, or None when the plan is gone (the general path takes over)."""
        started, sent, answered = stamps
        try:
            if raw is MOVED:
                reply, reply_frames = self.client.connection.zmq.call("submit", request_id, message, self.client.timeout_s,
                                                                      send=False)
            else:
                decoded = _decode_reply_for(raw, request_id, "submit")
                if decoded is None:
                    self.client.connection.lane.close()
                    raise ClientError("the daemon answered a plan run with another request's reply")
                reply, reply_frames = decoded
        except DaemonError as exc:
            if exc.code in ("plan_expired", "no_session", "unknown_graph"):
                return None
            raise
        execution = reply.get("execution")
        if reply.get("plan") == plan.plan_id and isinstance(execution, dict):
            execution = {**execution, "plan": plan.plan_id}  # the plan stands; this run did not replay
            # What its fast replies run from now on (the plan's in-place recording, once made).
            plan.function = str(execution.get("function") or plan.function)
        self.client.last_execution = execution
        outputs = tuple(self.client.buffers.decode(handle, reply, reply_frames))
        self.client.connection.last_reply_at = done = time.perf_counter()
        self.client.last_timing = _timing(started, sent, answered, done)
        return outputs


@functools.lru_cache(maxsize=64)
def _named_index(device: str) -> Optional[int]:
    return torch.device(device).index


def _cuda_index(device: str) -> int:
    index = _named_index(device)
    return torch.cuda.current_device() if index is None else index


def _timing(started: float, sent: float, answered: float, done: float) -> dict:
    return {"prepare_us": (sent - started) * 1e6, "request_us": (answered - sent) * 1e6, "outputs_us": (done - answered) * 1e6}
