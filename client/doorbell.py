"""The client's end of a lane's doorbell page (layout and protocol: ``cgtree.daemon.doorbell``).

``ring`` stores a plan run's request; ``rouse`` kicks a daemon that sleeps at that moment, so
that its wake-up overlaps what the caller does next; ``wait_ack`` spins until the daemon
answered it (kicking a daemon that fell asleep meanwhile); ``wait_done`` spins until the device
wrote the run's done word, i.e. its outputs are ready.

Waiting: without sleeping for ``spin_s`` (a GPU step of a few hundred microseconds is answered
within it, and a sleeping thread costs a wake-up), then in 50 us sleeps. Every millisecond or
so, and on every sleep, the lane is asked whether the daemon is gone (``peer_closed``: its end
hung up, or the client's ``cgtree.client.watch`` says so): a daemon that died never writes the
word, and one that is still exiting may not have closed its end yet.

Gated requests (``ring(..., gated=True)``, where the page's ``FEATURES`` say the daemon
understands them): the daemon launches the run only once ``verdict(seq, True)`` is stored, so
the caller checks after ringing what the run depends on; ``verdict(seq, False)`` vetoes it. The
ack is then ``ABORTED`` when nothing ran (a veto, or a verdict later than the daemon waits).

Invariants: the client writes only ``REQUEST`` and ``VERDICT``; one request in flight (the
``Client``'s lock); ``seq`` never repeats the previous one and is never 0; a gated request gets
exactly one verdict, before its ack is waited for.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import time
from typing import Any, Callable, Optional

from cgtree.daemon.doorbell import (
    ACK,
    AWAKE,
    FEATURE_GATE,
    FEATURES,
    MAX_GATED_PLAN_ID,
    REQUEST,
    SEQ_MASK,
    VERDICT,
    done_word,
    map_page,
    next_seq,
    pack_request,
    pack_verdict,
    unmap_page,
    unpack_reply,
)

SLEEP_S = 50e-6
CHECKS_EVERY = 2048  # spin iterations between two clock reads (~0.1-0.2 ms of spinning)
MAX_PLAN_ID = SEQ_MASK  # plan ids above this do not fit the request word: those go by lane


class DoorbellTimeout(TimeoutError):
    """The word was not written in time."""


class DoorbellHangup(ConnectionError):
    """The daemon went away while waiting: its lane closed, or the client's watch saw it go."""


class ClientDoorbell:
    def __init__(self, fd: int) -> None:
        try:
            self._page, self._words = map_page(fd)
        finally:
            os.close(fd)  # the mapping keeps the page
        # Numbered from a random point in the upper half: a doorbell request's number is also its
        # request id on the lane and on ZeroMQ, where the client's own ids count up from 1.
        self._seq = SEQ_MASK // 2 + 1 + secrets.randbelow(SEQ_MASK // 4)
        self._address: Optional[int] = None  # the mapping's address, once asked for
        # Asked at close() whether the page must stay mapped for now (True: it takes it over).
        self.keeper: Optional[Callable[["ClientDoorbell"], bool]] = None

    def awake(self) -> bool:
        """Whether the daemon looks at the page without a kick right now."""
        return self._words[AWAKE] == 1

    def gates(self, plan_id: int) -> bool:
        """Whether a request for ``plan_id`` may be gated: the daemon understands gates, and the
        plan id fits a gated request."""
        return bool(self._words[FEATURES] & FEATURE_GATE) and 0 < plan_id <= MAX_GATED_PLAN_ID

    def ring(self, plan_id: int, gated: bool = False) -> int:
        """Store the request for ``plan_id``; its sequence number. A gated one launches only
        after ``verdict(seq, True)``."""
        self._seq = seq = next_seq(self._seq)
        self._words[REQUEST] = pack_request(seq, plan_id, gated)
        return seq

    def rouse(self, lane: Any) -> bool:
        """Right after ``ring``: kick the daemon if its loop sleeps (``AWAKE`` 0), so that it wakes
        up while the caller checks and builds; True when it kicked. One kick is enough: the
        datagram is sent after the request's store, and the daemon looks at the page when it
        reads it. A daemon that fell asleep after this look is kicked by ``wait_ack``."""
        if self._words[AWAKE] == 1:
            return False
        lane.kick()
        return True

    def verdict(self, seq: int, launch: bool) -> None:
        """Gated request ``seq`` may launch (``launch``), or must not."""
        self._words[VERDICT] = pack_verdict(seq, launch)

    def wait_ack(self, seq: int, lane: Any, timeout_s: float, spin_s: float, *,
                 kicked: bool = False) -> tuple[int, tuple]:
        """(status, (generation, node id, daemon_us, device index)) of request ``seq``;
        ``kicked``: ``rouse`` kicked the daemon for it already."""
        ack = self._wait(ACK, seq, lane, timeout_s, spin_s, kick=not kicked)
        return ack >> 32, unpack_reply(self._words)

    def wait_done(self, device_index: int, seq: int, lane: Any, timeout_s: float, spin_s: float) -> None:
        self._wait(done_word(device_index), seq, lane, timeout_s, spin_s, kick=False)

    def done(self, device_index: int, seq: int) -> bool:
        """Whether the device wrote run ``seq``'s done word (a page already closed: False)."""
        words = self._words
        return words is not None and words[done_word(device_index)] & SEQ_MASK == seq

    def page_address(self) -> int:
        """Where the page is mapped in this process (for registering it with CUDA)."""
        if self._address is None:
            anchor = ctypes.c_char.from_buffer(self._page)
            self._address = ctypes.addressof(anchor)
            del anchor  # only the address is kept: the mapping outlives it until release()
        return self._address

    def _wait(self, index: int, seq: int, lane: Any, timeout_s: float, spin_s: float, *, kick: bool) -> int:
        words = self._words
        word = words[index]
        if word & SEQ_MASK == seq:
            return word
        clock = time.perf_counter
        started = clock()
        spin_until, deadline = started + spin_s, started + timeout_s
        kicked = not kick
        while True:
            for _ in range(CHECKS_EVERY):
                word = words[index]
                if word & SEQ_MASK == seq:
                    return word
            if not kicked and words[AWAKE] != 1:
                # The daemon went to sleep after we looked: it may not have seen the request.
                lane.kick()
                kicked = True
            now = clock()
            if now >= spin_until:
                time.sleep(SLEEP_S)
                now = clock()
            if lane.peer_closed():
                raise DoorbellHangup("the daemon is gone (its submit lane hung up, or its process or socket file did) "
                                     "while a doorbell request was in flight")
            if now >= deadline:
                raise DoorbellTimeout(f"no answer on the doorbell within {timeout_s:g} s")

    def close(self) -> None:
        """Unmap the page, unless ``keeper`` (``cgtree.client.stream_order``) keeps it: a caller's
        stream may still wait on one of its words, and unmapping it under that wait is a fault."""
        if self._words is None:
            return
        if self.keeper is not None and self.keeper(self):
            return
        self.release()

    def release(self) -> None:
        """Unmap the page now (its last user is done with it)."""
        if self._words is not None:
            unmap_page(self._page, self._words)
            self._words = None


def fits_request(plan_id: Optional[int]) -> bool:
    return isinstance(plan_id, int) and 0 < plan_id <= MAX_PLAN_ID
