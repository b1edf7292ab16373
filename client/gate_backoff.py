"""Whether a client gates its hot plan runs now (``cgtree.client.plans``): a pure policy.

A gated doorbell run rings first and sends its verdict once the client's checks are done; the
daemon waits at most ``GATE_WAIT_MAX_S`` for it (``cgtree.daemon.doorbell``). A verdict later
than that ("late") costs the run: nothing launched, and the submit goes the general way. A client
that is late often (its checks are slow, or its stream holds work that the settle waits for, as
with stream-ordered outputs submitted back to back) is better off checking before it rings.

Policy:
- "Often" is ``LATE_LIMIT`` of the last ``WINDOW`` gated runs, not a count over the client's
  life: a long-lived client on a host that stalls now and then is late now and then, and must
  not lose gating for good (the first form of this policy, a lifetime count of 16, turned
  gating off in a benchmark that switched paths 20 times).
- A client that backed off checks before ringing for ``RETRY_AFTER`` hot runs, then gates
  again with a clean window: what made it late (a burst of host stalls, a phase of back-to-back
  submits) may have passed.

Invariants: ``allows`` is asked once per hot run that could be gated, and ``record`` is told the
outcome of each gated run; nothing here reads clocks or touches the page.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64
LATE_LIMIT = 16
RETRY_AFTER = 4096


class GateBackoff:
    """The gating decision of one client, from the outcomes of its recent gated runs."""

    def __init__(self, window: int = WINDOW, late_limit: int = LATE_LIMIT, retry_after: int = RETRY_AFTER) -> None:
        if not 0 < late_limit <= window:
            raise ValueError(f"late_limit must be in 1..window ({window}), got {late_limit}")
        self.late_limit = late_limit
        self.retry_after = retry_after
        self.recent: deque[bool] = deque(maxlen=window)  # True: that gated run was late
        self.ungated_left = 0  # hot runs still to check before ringing
        self.late_total = 0
        self.backoffs = 0

    @property
    def gating(self) -> bool:
        return self.ungated_left == 0

    def allows(self) -> bool:
        """Whether this hot run may be gated; a run while backing off counts toward the retry."""
        if self.ungated_left:
            self.ungated_left -= 1
            return False
        return True

    def record(self, late: bool) -> bool:
        """One gated run's outcome; True when this one made the client back off."""
        self.recent.append(late)
        if not late:
            return False
        self.late_total += 1
        if sum(self.recent) < self.late_limit:
            return False
        self.backoffs += 1
        self.ungated_left = self.retry_after
        self.recent.clear()
        return True

    def describe(self) -> dict:
        return {"gating": self.gating, "late": self.late_total, "backoffs": self.backoffs,
                "late_in_window": sum(self.recent), "ungated_left": self.ungated_left}
