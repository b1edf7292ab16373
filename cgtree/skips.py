"""Skip reasons: log each once per function, count them by reason.

Invariants:
- A (function, reason kind) pair is logged at most once, as
  ``skipping cudagraphs due to <reason>`` followed by where it came from; PyTorch's users
  grep for exactly this text, so it is kept verbatim.
- ``counts`` counts distinct (function, reason kind) decisions, as PyTorch's
  ``cudagraph_skips`` counter does; ``calls`` counts every call that ran without graphs.
- A reason is a kind (the counter key: ``mutated inputs``, ``cpu device``, ``multiple devices``,
  ``graph with symbolic shapes inputs``, ``incompatible op`` ...) plus an optional detail
  (`` (arg1)``, `` aten.nonzero.default``), logged together.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("cgtree.skips")




@dataclass(frozen=True)
class SkipReason:
    """Why a call runs without graphs: ``kind`` is counted, ``kind + detail`` is logged."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return self.kind + self.detail


class SkipLog:
    """Remembers which functions were logged for which reason and counts skips."""

    def __init__(self) -> None:
        self._logged: set[tuple[str, str]] = set()
        self.counts: Counter[str] = Counter()  # reason kind -> distinct (function, reason) skips
        self.calls: Counter[str] = Counter()  # reason kind -> calls run without graphs

    def record(self, function_key: str, reason: SkipReason, origin: str) -> None:
        """Note one call that runs without graphs; log and count it the first time per function."""
        kind = reason.kind
        self.calls[kind] += 1
        key = (function_key, kind)
        if key in self._logged:
            return
        self._logged.add(key)
        self.counts[kind] += 1
        message = f"skipping cudagraphs due to {reason}"
        if origin:
            message += f". Found from : \n{origin}"
        log.warning(message)

    def total(self) -> int:
        return sum(self.counts.values())
