"""Doorbell pages on cgtreed's side: whether a lane gets one (``daemon.doorbell``), and serving
the requests rung on them (``cgtree.daemon.doorbell`` holds the page itself).

A doorbell is a page of shared memory beside a lane: its client stores a prepared submit (seq,
plan id) and the loop, spinning, sees it without a system call. Its requests reach the daemon
through the lane transport too (a kick when the daemon fell asleep), and at stop the lane
transport refuses what a page holds, connection by connection.

Invariants:
- Doorbells are handed out only where the policy allows (``doorbell_policy``: CUDA devices, or
  a spinning loop), decided when a lane attaches, with the live configuration.
- A replayed plan run is answered in the page (its outputs are ready when the device writes the
  done word); anything else is answered on the lane (ZeroMQ when too large), then acknowledged
  in the page (``ON_LANE``).
- After answering a replay at its launch the loop keeps spinning until the run is done, at most
  ``DONE_SPIN_MAX_S`` (``Waiter.awaiting_done``).
- A request rung on a lane whose session ended gets ``no_session`` and the lane is closed.
- A gated request launches only once its client said so (``LaunchGate``); one it did not is
  acked ``ABORTED``, and nothing of it ran.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Optional

from cgtree.daemon.doorbell import ABORTED, ON_LANE, REPLAYED, Doorbell, LaunchGate, doorbell_policy
from cgtree.daemon.lane import LaneConnection
from cgtree.daemon.plans import PlanReplayed, PlanVetoed
from cgtree.daemon.protocol import encode_error
from cgtree.daemon.waiting import DONE_SPIN_MAX_S


class DoorbellTransport:
    """Serves the doorbells of ``daemon.lanes`` (state of the daemon it serves: ``daemon``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def doorbell_decision(self) -> tuple[bool, str]:
        """Whether a lane attaching now gets a doorbell, and why (``daemon.doorbell``, live)."""
        daemon = self.daemon
        return doorbell_policy(daemon.config.daemon.doorbell, serves_cuda=daemon._serves_cuda,
                               spins=daemon.config.daemon.spin_us > 0)

    def make_doorbell(self) -> Optional[Doorbell]:
        if not self.doorbell_decision()[0]:
            return None
        return Doorbell([name for name, runtime in self.daemon.devices.items() if runtime.is_cuda])

    def serve(self, ready: Optional[dict]) -> None:
        """Every rung doorbell (``ready`` is not needed: the pages themselves say which rang)."""
        daemon = self.daemon
        if daemon.lanes is None or not daemon.lanes.ringing:
            return
        for connection in list(daemon.lanes.ringing):
            if daemon._pending_signals or daemon.exit_code is not None:
                return
            if connection.doorbell is not None and connection.doorbell.rung():
                self.serve_doorbell(connection)

    def serve_doorbell(self, connection: LaneConnection) -> None:
        """Answer the request rung on ``connection``'s doorbell, if any: a replayed plan run in
        the page (outputs ready when the device writes its done word), anything else on the lane."""
        daemon = self.daemon
        doorbell = connection.doorbell
        taken = doorbell.take()
        if taken is None:
            return
        seq, plan_id, gated = taken
        session = connection.session
        session.counters["doorbell_requests"] += 1
        if session.state != "live" or session.identity is None:
            self.answer_on_lane_instead(connection, seq, [encode_error(seq, "no_session", "the session of this lane has ended")])
            daemon.lanes.close(connection)
            return
        gate = LaunchGate(doorbell, seq) if gated else None
        if gated:
            session.counters["gated_requests"] += 1
        outcome = daemon.dispatcher.answer_plan(session, None, plan=(seq, plan_id), gate=gate,
                                                settle=partial(doorbell.signal_done, seq=seq))
        if isinstance(outcome, PlanVetoed):
            doorbell.answer(seq, ABORTED)  # nothing ran; the client submits the general way
        elif isinstance(outcome, PlanReplayed):
            daemon.waiting.awaiting_done = daemon.waiting.spins()
            daemon.waiting.awaiting_done_until = time.perf_counter() + DONE_SPIN_MAX_S
            doorbell.answer(seq, REPLAYED, generation=outcome.generation, node_id=outcome.node_id,
                            daemon_us=outcome.daemon_us, device_index=outcome.device_index)
        else:
            self.answer_on_lane_instead(connection, seq, outcome)

    def answer_on_lane_instead(self, connection: LaneConnection, seq: int, reply: list) -> None:
        """A doorbell request's full reply: on the lane (ZeroMQ when too large), then the ack."""
        self.daemon.lane_transport.reply_on_lane(connection, reply)
        if connection.doorbell is not None:
            connection.doorbell.answer(seq, ON_LANE)
