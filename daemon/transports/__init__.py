"""How requests reach cgtreed: the transports the loop serves, each in its module.

- ``zmq``: the ZeroMQ ROUTER endpoint (every request may come this way);
- ``lanes``: submit lanes, one SOCK_SEQPACKET connection per session (``cgtree.daemon.lane``);
- ``doorbells``: doorbell pages shared with a lane's client (``cgtree.daemon.doorbell``).

Each transport holds the behaviour; the state the loop and the others share (the lane hub
``Daemon.lanes``, the counters, the pending signals) stays on the ``Daemon`` they are given.
All three answer ``serve(ready)``: answer what ``Waiter.wait_for_events`` found ready (None:
everything), stopping early when a signal is pending or the daemon must exit. The ZeroMQ and
lane transports also answer ``refuse_pending(until)`` (at stop: queued requests get the
retryable ``unavailable``; the lane one refuses doorbell pages too, connection by connection)
and ``close()``. What to wait on is registered with the ``Waiter`` as it comes and goes
(``watch_fd`` / ``unwatch_fd``), not asked for.

Invariants:
- A turn answers at most ``MAX_REQUESTS_PER_TURN`` requests per transport, then signals and
  housekeeping get a look in.
- Sends never block the loop: a client that vanished or stopped reading loses its reply.
- Every request goes through the ``Dispatcher`` (``cgtree.daemon.dispatch``), whatever its
  transport.
"""

MAX_REQUESTS_PER_TURN = 64  # then signals and housekeeping get a look in
