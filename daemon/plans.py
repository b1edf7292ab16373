"""Prepared submits: the steady state of a submit loop as one 20-byte datagram on the session's
lane, instead of an envelope the daemon decodes, checks and dispatches every time.

A submit whose inputs came packed and were remembered (``cgtree.daemon.input_memo``), whose
outputs all went to the graph's output buffer and that wrote no CPU input is offered a plan:
``"plan": <id>`` in its reply. ``PLAN_REQUEST(request id, plan id)`` on the lane then runs the
same graphed function on the same input views into the same output buffer. When that call
replays and its outputs fit the buffer's slots, the answer is ``PLAN_REPLY(request id, buffer
generation, node id, daemon_us)``: the client already knows the outputs' layout from the reply
that offered the plan. Anything else (a warmup, a recording, a skip, outputs of another shape)
is answered with the full submit reply, as the general path would. A plan that no longer
stands for that submit is answered with the error ``plan_expired``; the client then submits
the general way, which may offer a new plan.

Why: on the H200 host a steady-state submit of a tiny graph spent ~75 us outside the command
itself, in envelope encode/decode, dispatch and descriptor handling on both sides
(docs/PERFORMANCE.md section 6); a plan skips all of it.

Invariants:
- A plan run is exactly the submit it stands for. It holds the function, weights, input views
  and output buffer of that submit; it is valid while the session still maps the same function
  for the graph and the same output buffer (checked on every run by identity), and it is
  forgotten with the session's client-visible state (parking, releasing outputs, closing).
- Wire formats are fixed-size structs whose 4-byte magic starts with 0xc1, a byte msgpack never
  uses: a plan datagram can never be read as an envelope, nor an envelope as a plan.
- Plan ids are daemon-unique and looked up only in the requesting session: no session can run
  another's plan.
"""

from __future__ import annotations

import itertools
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cgtree.daemon.protocol import ProtocolError

PLAN_REQUEST_MAGIC = b"\xc1PQ1"
PLAN_REPLY_MAGIC = b"\xc1PR1"
# magic, request id, plan id
PLAN_REQUEST = struct.Struct("<4sqQ")
# magic, request id, output buffer generation, node id (-1: none), daemon_us
PLAN_REPLY = struct.Struct("<4sqQqd")
MAX_PLANS_PER_DEVICE = 64

_plan_ids = itertools.count(1)


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
    fn: Callable
    weights: list
    inputs: list
    buffer: Any  # the OutputBuffer the outputs go to


class PlanBook:
    """One session device's plans: by id, and by (graph id, packed inputs) so that the same
    submit is offered the same plan again."""

    def __init__(self) -> None:
        self.by_id: dict[int, SubmitPlan] = {}
        self._by_submit: dict[tuple[str, bytes], int] = {}

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


def run_plan(ctx: Any, session: Any, request_id: int, plan_id: int, *, finish_general: Callable) -> list:
    """Run a plan: ``[PLAN_REPLY]`` when it replayed into the same slots, else the frames of the
    general submit reply (``finish_general(state, runtime, graph_id, outputs, received)``)."""
    received = time.perf_counter()
    state, plan = find_plan(session, plan_id)
    runtime = ctx.devices[state.device]
    ctx.keepalive()
    outputs = plan.fn(*plan.weights, *plan.inputs)
    ctx.keepalive()
    execution = state.manager.last_execution
    flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    del outputs
    mode = getattr(getattr(execution, "mode", None), "value", None)
    if mode != "replayed" or not _all_on(flat, runtime.device) or not plan.buffer.fits(flat):
        return finish_general(state, runtime, plan.graph_id, flat, received)
    plan.buffer.copy_in(flat)
    del flat  # the tree must see replay outputs dead: nothing of the pool is kept here
    runtime.synchronize()  # the client reads the outputs as soon as it has the reply
    session.counters["submits"] += 1
    daemon_us = (time.perf_counter() - received) * 1e6
    ctx.metrics.observe_submit(daemon_us * 1e-6, mode, None)
    return [pack_plan_reply(request_id, plan.buffer.generation, getattr(execution, "node_id", None), round(daemon_us, 1))]


def _all_on(tensors: list, device: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device == device for t in tensors)
