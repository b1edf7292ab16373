"""How cgtreed's loop waits for work: spinning (polling without sleeping) for ``daemon.spin_us``
after an answer, sleeping in poll otherwise, at most until the next chore.

``Waiter`` owns what the loop waits on: the ZeroMQ poller (the socket, the signal wake-up pipe,
every lane fd), the spin loop's ``select.poll`` over the raw fds, and the wake-up pipe itself.
The transports register lane fds through ``watch_fd`` / ``unwatch_fd``.

Invariants:
- ``wait_for_events`` returns at the latest when housekeeping or the watchdog ping is due
  (``MAX_LOOP_WAIT_S`` at most), and drains the wake-up pipe when it was written.
- Spinning happens only within the spin window (``spin_until``), or while a doorbell run
  answered at its launch may still be on the device (``awaiting_done``, at most
  ``DONE_SPIN_MAX_S`` after the answer): a page whose done word its client overwrote cannot keep
  a core busy for good.
- Doorbell pages say the daemon is asleep only while it is (``cgtree.daemon.doorbell``), and
  are looked at once more after saying so: a request stored just before is still seen.
- Before sleeping with doorbell runs in flight, every CUDA device is settled, so that a sticky
  error in a doorbell run is found (and ends the daemon) before the loop sleeps.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from typing import Any, Optional

import zmq

log = logging.getLogger("cgtree.daemon.server")

MAX_LOOP_WAIT_S = 1.0
DOORBELLS = "doorbells"  # the key wait_for_events reports a rung doorbell under
DONE_RECHECK_S = 20e-6  # how often a spinning loop looks whether a doorbell run finished
# The longest the loop spins for a doorbell run to finish: a longer graph's client pays one
# wake-up (small beside such a graph), and a page whose done word its client overwrote cannot
# keep a core busy for good.
DONE_SPIN_MAX_S = 0.1


class Waiter:
    """The daemon loop's waiting (state of the daemon it waits for: ``daemon``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.spin_until = 0.0  # perf_counter() until which the loop polls without sleeping
        self.awaiting_done = False  # a doorbell run answered at launch may still be on the device
        self.awaiting_done_until = 0.0
        self._poller: Optional[zmq.Poller] = None
        self._spin_poller: Any = None  # select.poll over the raw fds (lanes, wake-up pipe), for spinning
        self.wake_r: Optional[socket.socket] = None
        self.wake_w: Optional[socket.socket] = None

    def open(self, sock: zmq.Socket) -> None:
        """The wake-up pipe and the pollers, watching ``sock`` (the bound ROUTER socket)."""
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.wake_r.fileno(), zmq.POLLIN)
        # The spin loop's poller: the raw fds only (one C call), the ZeroMQ socket is asked for
        # its events directly; zmq.Poller costs several times more per turn.
        self._spin_poller = select.poll()
        self._spin_poller.register(self.wake_r.fileno(), select.POLLIN)

    def close(self) -> None:
        for sock in (self.wake_r, self.wake_w):
            if sock is not None:
                sock.close()
        self.wake_r = self.wake_w = None

    def spins(self) -> bool:
        """Whether the loop polls without sleeping after an answer: CUDA daemons, and CPU ones
        that were told to ring doorbells (their clients would otherwise kick every request)."""
        daemon = self.daemon
        if not daemon.config.daemon.spin_us:
            return False
        return daemon._serves_cuda or (daemon.lanes is not None and bool(daemon.lanes.ringing))

    def watch_fd(self, fd: int) -> None:
        self._poller.register(fd, zmq.POLLIN)
        self._spin_poller.register(fd, select.POLLIN)

    def unwatch_fd(self, fd: int) -> None:
        self._poller.unregister(fd)
        try:
            self._spin_poller.unregister(fd)
        except KeyError:
            pass

    def wait_for_events(self) -> dict:
        """What is ready (socket or fd -> events), after at most the time to the next chore.
        Within ``daemon.spin_us`` of the last answer it polls without sleeping: a client that
        sends its next request right away finds the daemon awake (no thread wake-up)."""
        daemon = self.daemon
        wake_at = min(daemon._next_housekeeping, daemon.watchdog.next_due)
        timeout_s = min(max(0.0, wake_at - daemon.clock()), MAX_LOOP_WAIT_S)
        try:
            ready = self._poll_spinning()
            if not ready:
                ready = self._sleep(timeout_s)
        except zmq.ZMQError as exc:  # EINTR is retried by pyzmq; anything else: next turn
            log.debug("poll: %s", exc)
            return {}
        if self.wake_r.fileno() in ready:
            try:
                while self.wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        return ready

    def _poll_spinning(self) -> dict:
        clock, poll_fds, sock = time.perf_counter, self._spin_poller.poll, self.daemon.zmq_transport.socket
        hub = self.daemon.lanes
        ringing = hub is not None and bool(hub.ringing)  # lanes attach and close between calls only
        while True:
            if clock() >= self.spin_until:
                if not self.awaiting_done:
                    return {}
                # A doorbell run was answered at its launch: its client comes back only after
                # the device finished it, so the window runs on until spin_us after that.
                if not ringing or hub.all_settled():
                    self.awaiting_done = False
                    self.spin_until = clock() + self.daemon.config.daemon.spin_us * 1e-6
                elif clock() < self.awaiting_done_until:
                    self.spin_until = clock() + DONE_RECHECK_S
                else:
                    self.awaiting_done = False
                    return {}
            found = poll_fds(0)
            zmq_ready = sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
            rung = ringing and hub.any_rung()
            if found or zmq_ready or rung:
                ready = dict(found)
                if zmq_ready:
                    ready[sock] = zmq.POLLIN
                if rung:
                    ready[DOORBELLS] = zmq.POLLIN
                return ready

    def _sleep(self, timeout_s: float) -> dict:
        """Block in poll until something is ready. Doorbell pages say the daemon is asleep while
        it is (their clients kick it over the lane then), and are looked at once more after saying
        so: a request stored just before is still seen (``cgtree.daemon.doorbell``)."""
        hub = self.daemon.lanes
        if hub is None or not hub.ringing:
            return dict(self._poller.poll(timeout=timeout_s * 1000.0))
        if not hub.all_settled():
            self.daemon._settle_devices()  # a sticky error in a doorbell run is found before sleeping
            if self.daemon.exit_code is not None:
                return {}
            hub.forget_in_flight()  # every device is idle: whatever the pages' done words say
        hub.set_awake(False)
        if hub.any_rung():
            ready = {DOORBELLS: zmq.POLLIN}
        else:
            ready = dict(self._poller.poll(timeout=timeout_s * 1000.0))
        hub.set_awake(True)
        return ready
