"""Decoded submit inputs, remembered by the bytes that described them.

A client in a loop sends the same descriptors on every submit: the same CUDA IPC exports at the
same offsets and shapes (its input buffers, its KV caches), only the data in them changes.
Decoding them again (type checks, IPC map lookups, building views, checking them against the
graph's input specs) costs several microseconds per input on every call. When the client sends
its descriptor list pre-packed (``"inputs": <msgpack bytes>``), the daemon keys the decoded
tensors on those bytes and skips all of that when they repeat.

Invariants:
- Only descriptor lists of ``cuda`` and ``scalar`` inputs are remembered: a ``cpu`` input's
  data arrives in new frames with every request, and an ``output`` input is valid only for its
  buffer's current generation, so both are decoded every time.
- An entry is stored only after the inputs passed every check the uncached path applies
  (descriptors, IPC handles, the graph's input specs): a hit is exactly what a miss would have
  produced, without the work.
- Entries pin the IPC mappings their views use; the memo is small (``MAX_ENTRIES_PER_GRAPH``
  per graph, least recently used evicted) and is cleared with the session's IPC handles.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

MAX_ENTRIES_PER_GRAPH = 4
MEMOIZABLE_KINDS = frozenset({"cuda", "scalar"})


def memoizable(descs: list) -> bool:
    return all(isinstance(d, dict) and d.get("kind") in MEMOIZABLE_KINDS for d in descs)


class InputMemo:
    """graph id -> (packed descriptor bytes -> what decoding them gave), per session and device."""

    def __init__(self) -> None:
        self._by_graph: dict[str, OrderedDict[bytes, Any]] = {}

    def get(self, graph_id: str, packed: bytes) -> Any:
        entries = self._by_graph.get(graph_id)
        if entries is None:
            return None
        inputs = entries.get(packed)
        if inputs is not None:
            entries.move_to_end(packed)
        return inputs

    def put(self, graph_id: str, packed: bytes, decoded: Any) -> None:
        entries = self._by_graph.setdefault(graph_id, OrderedDict())
        entries[packed] = decoded
        entries.move_to_end(packed)
        while len(entries) > MAX_ENTRIES_PER_GRAPH:
            entries.popitem(last=False)

    def forget(self, graph_id: Optional[str] = None) -> None:
        if graph_id is None:
            self._by_graph.clear()
        else:
            self._by_graph.pop(graph_id, None)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_graph.values())
