"""Graphs and their weights to the daemon (``Registration``), and the handles for them.

A graph is lowered and encoded once per source and input spec (``by_source``), registered in
messages under the daemon's size limit (the graph, then only the weights it lacks), and waited
for while cgtreed compiles it. ``GraphHandle`` keeps the encoded payload, so a graph can be
registered again whenever the daemon does not know it (a restart).

Invariants:
- Nothing is sent that the daemon did not ask for: weights go only when listed missing, in
  batches of at most ``max_message_bytes`` (less ``ENVELOPE_ALLOWANCE``).
- ``registered`` holds what this session registered; it is cleared with the session.
- A compile wait has no overall deadline (the daemon bounds a compile); each ask is an ordinary
  request under ``timeout_s``, so a daemon that died is still noticed.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from cgtree.client.errors import ClientError, DaemonError

log = logging.getLogger("cgtree.client")

# Room for the envelope next to data frames when splitting uploads under max_message_bytes.
ENVELOPE_ALLOWANCE = 64 * 1024
# A graph cgtreed is compiling (its compile worker, off the serving loop) is asked for again
# after 50 ms, then at most every 0.5 s; the wait is said in the log at once (INFO) and, when it
# lasts, every COMPILE_NOTE_EVERY_S (WARNING: a user sees why the first call takes seconds).
COMPILE_POLL_FIRST_S = 0.05
COMPILE_POLL_MAX_S = 0.5
COMPILE_NOTE_EVERY_S = 10.0


@dataclass
class GraphHandle:
    """A graph registered with the daemon: its id, device, and the payload kept for re-registering."""

    graph_id: str
    device: str
    encoded: Any  # cgtree.payload.EncodedGraph
    num_inputs: Optional[int] = None
    name: Optional[str] = None  # a label for cgtreectl and the daemon's logs (the model's class)
    # User inputs the graph writes in place, as the daemon decoded it; None until registered
    # (and then treated as "may mutate": such a submit is never re-sent after a restart).
    mutated_inputs: Optional[tuple[int, ...]] = None

    @property
    def short_name(self) -> str:
        return "g" + self.graph_id[:12]


class Registration:
    """What this client registered with the daemon, and how it registers."""

    def __init__(self, client: Any, graph_cache: Any) -> None:
        self.client = client
        self.by_source: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
        self.by_id: dict[tuple[str, str], GraphHandle] = {}
        self.registered: set[tuple[str, str]] = set()
        self.graph_cache = graph_cache

    def cache_for(self, graph: Any) -> Optional[dict]:
        if _is_encoded(graph):
            return None
        try:
            return self.by_source.setdefault(graph, {})
        except TypeError:  # not weak-referenceable: lower every time
            return None

    def ensure(self, handle: GraphHandle) -> None:
        if (handle.device, handle.graph_id) in self.registered and self.client.session_id is not None:
            return
        self.register_payload(handle)

    def register_payload(self, handle: GraphHandle) -> None:
        """Send the graph; then, in messages under the size limit, the weights the daemon lacks;
        then wait while the daemon compiles it."""
        reply = self.send_graph(handle)
        if reply.get("compiling"):
            reply = self.wait_for_compile(handle, reply)
            if reply.get("need_payload"):  # the daemon restarted while it compiled: send it all again
                reply = self.wait_for_compile(handle, self.send_graph(handle))
        if not reply.get("registered"):
            raise ClientError(f"graph {handle.short_name} was not registered: daemon still lacks {reply.get('missing_weights')}")
        if reply.get("graph") != handle.graph_id:
            raise ClientError(f"the daemon registered {reply.get('graph')} for graph {handle.graph_id}")
        if reply.get("mutated_inputs") is not None:
            handle.mutated_inputs = tuple(reply["mutated_inputs"])
        self.registered.add((handle.device, handle.graph_id))

    def send_graph(self, handle: GraphHandle) -> dict:
        encoded = handle.encoded
        base = {"device": self.client.encoder.wire_device(handle.device), "graph": handle.graph_id, "payload": 0, "name": handle.name}
        reply, _ = self.client.session.call("register", {**base, "weights": {}}, [encoded.graph_bytes])
        limit = (self.client.max_message_bytes or 2**62) - ENVELOPE_ALLOWANCE - len(encoded.graph_bytes)
        for batch in _batches(reply.get("missing_weights") or [], encoded.weights, limit):
            frames = [encoded.graph_bytes] + [encoded.weights[h].data for h in batch]
            weights = {h: i + 1 for i, h in enumerate(batch)}
            reply, _ = self.client.session.call("register", {**base, "weights": weights}, frames)
        return reply

    def wait_for_compile(self, handle: GraphHandle, reply: dict) -> dict:
        """Ask for ``handle``'s graph again (by id only) while cgtreed compiles it; the last reply.
        No overall deadline: the daemon bounds a compile (``daemon.compile_timeout_s``) and each
        ask is an ordinary request under ``timeout_s``, so a daemon that died is still noticed."""
        body = {"device": self.client.encoder.wire_device(handle.device), "graph": handle.graph_id, "name": handle.name, "weights": {}}
        started = time.monotonic()
        delay, note_at = COMPILE_POLL_FIRST_S, started + COMPILE_NOTE_EVERY_S
        log.info("cgtreed is compiling graph %s (%s)", handle.short_name, _compile_progress(reply["compiling"]))
        while reply.get("compiling"):
            time.sleep(delay)
            delay = min(2 * delay, COMPILE_POLL_MAX_S)
            reply, _ = self.client.session.call("register", body)
            now = time.monotonic()
            if reply.get("compiling") and now >= note_at:
                note_at = now + COMPILE_NOTE_EVERY_S
                log.warning("cgtreed is still compiling graph %s: %s (once per graph: later clients and a restarted "
                            "daemon load it compiled)", handle.short_name, _compile_progress(reply["compiling"]))
        if reply.get("registered"):
            log.info("graph %s compiled by cgtreed: registered after %.1f s, runs %s kernels", handle.short_name,
                     time.monotonic() - started, reply.get("kernels") or "its")
        return reply


def _graph_label(graph: Any) -> Optional[str]:
    """A short label for the daemon's tables and logs: the model's class name."""
    if _is_encoded(graph):
        return None
    name = type(graph).__name__
    return name[:64] if name.isprintable() else None


def _spec_key(inputs: list, device: str) -> tuple:
    return (device,) + tuple(
        (str(v.dtype), tuple(v.shape), v.device.type) if isinstance(v, torch.Tensor) else (type(v).__name__,) for v in inputs
    )


def _is_encoded(graph: Any) -> bool:
    return all(hasattr(graph, a) for a in ("graph_id", "graph_bytes", "weights", "weight_hashes"))


def _lower_and_encode(graph: Any, inputs: list, cache: Any = None) -> Any:
    # Plain nn.Modules go through the graph cache when one is enabled (cgtree.client.graph_cache).
    from cgtree.client import graph_cache

    return graph_cache.lower_and_encode(graph, inputs, cache=cache)


def _compile_progress(progress: dict) -> str:
    ahead = progress.get("ahead") or 0
    queue = f", {ahead} graph{'s' if ahead != 1 else ''} ahead of it" if ahead else ""
    return f"{progress.get('state', 'compiling')} for {progress.get('elapsed_s', 0)} s{queue}"


def _batches(missing: list, blobs: dict, limit: int) -> list[list]:
    """Group missing weight hashes into uploads of at most ``limit`` bytes each."""
    batches: list[list] = []
    current, size = [], 0
    for weight_hash in missing:
        blob = blobs.get(weight_hash)
        if blob is None:
            raise ClientError(f"the daemon asked for weight {weight_hash}, which this graph does not have")
        nbytes = len(blob.data)
        if nbytes > limit:
            raise DaemonError("too_large", f"weight {weight_hash} is {nbytes} bytes; raise daemon.max_message_bytes above it", "register")
        if current and size + nbytes > limit:
            batches.append(current)
            current, size = [], 0
        current.append(weight_hash)
        size += nbytes
    if current:
        batches.append(current)
    return batches
