"""Per-device graph and weight store, and the device runtime the daemon serves.

A graph is registered from the codec's payload (``cgtree.payload``): graph bytes plus weight
blobs named by content hash. A blob travels as its raw C-contiguous bytes in one frame; its
dtype and shape come from the graph's weight specs, and the codec checks length and hash. The daemon decodes the payload with
``decode_graph(bytes, allowed_namespaces=...)`` (operators resolved against an allow-list; no
pickle, no eval, never ``torch.export.load``) and identifies the graph by the hash the codec
computes over the bytes, not by what the client claims.

Invariants:
- One ``DeviceGraphs`` per served device. A graph id maps to at most one decoded graph and a
  weight hash to exactly one tensor on the device: two clients registering the same model
  share one copy of every weight (content-addressed, verified by re-hashing each blob).
- Reference counts: a session holds one reference per (device, graph) it registered; a graph
  holds one per weight it uses. A graph is dropped when its last session lets go; a weight
  when its last graph does. Nothing else frees them.
- Weights are static inputs: allocated once, outside every graph pool, never written.
- A graph's kernels are chosen once, when it is registered (``_choose_kernels``): with
  ``daemon.compile`` resolving to inductor it is *compiling* (``entry.compiling``) until the
  compile worker's artifact is loaded, and nobody submits it meanwhile (the register command
  answers "compiling" and submit refuses it); a failed compile leaves its ATen code.
- Sharing across users needs the bytes (``cgtree.daemon.tenancy.may_use_content``): a graph or
  weight records the uids that sent it (``provers``); a uid gets a known graph by its id alone,
  or a known weight without its blob, only once it is among them. Anyone else is asked for the
  payload and the blobs as if the device lacked them; a blob that re-hashes to its name then
  proves the uid holds it and the device's one copy is shared (nothing is stored twice).
- ``DeviceRuntime.backend`` is the tree manager's own ``backend_name`` (``cuda`` or
  ``cpu-replay``): what the logs and status say is what runs.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from cgtree.daemon.compiling import (artifact_dir, artifact_name, compile_in_process, describe_failure, has_symbolic_shapes,
                                     load_artifact, resolve_compile_mode)
from cgtree.daemon.protocol import ProtocolError
from cgtree.daemon.tenancy import may_use_content

log = logging.getLogger("cgtree.daemon.graphs")

_HEX_ID = re.compile(r"^[0-9a-zA-Z_:.-]{8,160}$")
_device_synchronize = getattr(torch._C, "_cuda_synchronize", None)


def tree_manager_class() -> type:
    try:
        from cgtree import TreeManager  # the public name (ARCHITECTURE.md)
    except ImportError:
        from cgtree.manager import TreeManager
    return TreeManager


def payload_codec() -> Any:
    import cgtree.payload as codec

    return codec


MAX_GRAPH_NAME_CHARS = 64


def check_graph_name(name: Any) -> Optional[str]:
    """A graph's label: None, or a short printable string (it ends up in logs and tables)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name or len(name) > MAX_GRAPH_NAME_CHARS or not name.isprintable():
        raise ProtocolError("bad_request", f"graph name must be a printable string of 1..{MAX_GRAPH_NAME_CHARS} characters, got {name!r}")
    return name


def check_graph_id(graph_id: Any, what: str = "graph") -> str:
    if not isinstance(graph_id, str) or not _HEX_ID.match(graph_id):
        raise ProtocolError("bad_request", f"{what} id must be a hash string, got {graph_id!r}")
    return graph_id


@dataclass
class WeightEntry:
    tensor: torch.Tensor
    nbytes: int
    refs: int = 0
    provers: set = field(default_factory=set)  # uids that sent these bytes (tenancy)


@dataclass
class GraphEntry:
    """A decoded graph on one device, with its weights resolved to device tensors."""

    graph_id: str
    decoded: Any  # cgtree.payload.DecodedGraph
    weight_hashes: tuple[str, ...]
    weights: list[torch.Tensor]
    fn: Callable  # (*weights, *user_inputs) -> flat tuple; compiled when daemon.compile = inductor
    refs: int = 0
    input_specs: Any = None
    dynamic: bool = False
    name: Optional[str] = None  # a label from the first client that named it (e.g. the model's class)
    kernels: str = "aten"  # what fn runs: "aten" (the decoded module) or "inductor"
    kernels_note: str = ""  # how it came to run them (status, cgtreectl graphs, the logs)
    compiling: Any = None  # the CompileJob while the compile worker compiles it (not usable yet)
    provers: set = field(default_factory=set)  # uids that sent the payload and every weight (tenancy)

    @property
    def short_name(self) -> str:
        return "g" + self.graph_id[:12]

    @property
    def display_name(self) -> str:
        """What logs, skip messages and ``cgtreectl tree`` call it: ``MLP (g1a2b3c4d5e6f)``."""
        return f"{self.name} ({self.short_name})" if self.name else self.short_name

    @property
    def mutated_inputs(self) -> tuple[int, ...]:
        """Indices of user inputs the graph writes in place (from the decoded payload)."""
        return tuple(getattr(self.decoded, "mutated_inputs", ()) or ())


@dataclass
class RegisterOutcome:
    graph_id: Optional[str]
    entry: Optional[GraphEntry] = None
    missing_weights: list[str] = field(default_factory=list)
    need_payload: bool = False
    new: bool = False
    weights_added: int = 0


class DeviceGraphs:
    """Decoded graphs and content-addressed weights of one device."""

    def __init__(self, device: torch.device, *, allowed_namespaces: Callable[[], Sequence[str]],
                 compile_mode: Callable[[], str] = lambda: "eager", compiler: Any = None) -> None:
        self.device = device
        self._allowed_namespaces = allowed_namespaces
        self._compile_mode = compile_mode
        # A CompileService (cgtree.daemon.compile_service): compiles happen in its worker; None
        # compiles here, in the caller's thread (direct use, tests).
        self._compiler = compiler
        self.graphs: dict[str, GraphEntry] = {}
        self.weights: dict[str, WeightEntry] = {}

    # -- registration --------------------------------------------------------------------------

    def register(self, payload: Optional[memoryview], claimed_id: Optional[str], blobs: dict[str, memoryview],
                 staged: Optional[dict[str, torch.Tensor]] = None, name: Optional[str] = None,
                 uid: Optional[int] = None) -> RegisterOutcome:
        """Make a graph usable on this device for uid ``uid``. Without ``payload`` only an
        already known ``claimed_id`` that ``uid`` proved can be registered. Returns what is
        missing if anything is: to ``uid``, a graph or weight it has not sent itself is missing
        exactly as if the device lacked it (the answer tells nothing about other users).

        ``staged`` holds verified weights this client uploaded for a graph still missing
        others (large models arrive in several messages under ``max_message_bytes``); the
        caller owns it (per session) and it is consumed when the graph is complete.
        ``name`` labels a graph that has none yet (the first client to name it wins).
        """
        staged = {} if staged is None else staged
        if payload is None:
            known = self.graphs.get(claimed_id) if claimed_id is not None else None
            if known is not None and may_use_content(uid, known.provers):
                return RegisterOutcome(claimed_id, self._named(known, name))
            return RegisterOutcome(claimed_id, need_payload=True)
        codec = payload_codec()
        try:
            # device=: factory-op device constants follow the device the graph runs on.
            decoded = codec.decode_graph(bytes(payload), allowed_namespaces=tuple(self._allowed_namespaces()), device=self.device)
        except codec.PayloadError as exc:
            raise ProtocolError("payload_rejected", str(exc)) from None
        graph_id = str(decoded.graph_id)
        if claimed_id is not None and claimed_id != graph_id:
            raise ProtocolError("payload_rejected", f"the payload hashes to {graph_id}, not to the claimed {claimed_id}")
        known = self.graphs.get(graph_id)
        if known is not None and may_use_content(uid, known.provers):
            return RegisterOutcome(graph_id, self._named(known, name))
        specs = {spec.hash: spec for spec in decoded.weight_specs}
        weight_hashes = tuple(str(h) for h in decoded.weight_hashes)
        for weight_hash, blob in blobs.items():
            if weight_hash not in specs:
                raise ProtocolError("payload_rejected", f"weight {weight_hash} is not one of graph {graph_id[:12]}'s weights")
            held = self.weights.get(weight_hash)
            if held is not None:
                if not may_use_content(uid, held.provers):
                    self._verify_weight(codec, specs[weight_hash], blob)  # the proof; the device's copy is shared
                    held.provers.add(uid)
            elif weight_hash not in staged:
                staged[weight_hash] = self._materialize_weight(codec, specs[weight_hash], blob)
        missing = [h for h in dict.fromkeys(weight_hashes) if h not in staged
                   and (h not in self.weights or not may_use_content(uid, self.weights[h].provers))]
        if missing:
            return RegisterOutcome(graph_id, missing_weights=missing)
        if known is not None:  # another user's graph: this uid has now sent the payload and every weight
            known.provers.add(uid)
            for weight_hash in dict.fromkeys(weight_hashes):
                staged.pop(weight_hash, None)  # uploaded here while another session put it on the device
                self.weights[weight_hash].provers.add(uid)
            return RegisterOutcome(graph_id, self._named(known, name))
        added = 0
        for weight_hash in dict.fromkeys(weight_hashes):
            tensor = staged.pop(weight_hash, None)
            if weight_hash not in self.weights:
                self.weights[weight_hash] = WeightEntry(tensor, tensor.numel() * tensor.element_size())
                added += 1
            self.weights[weight_hash].provers.add(uid)
        weights = []
        for weight_hash in weight_hashes:
            self.weights[weight_hash].refs += 1
            weights.append(self.weights[weight_hash].tensor)
        entry = GraphEntry(
            graph_id=graph_id, decoded=decoded, weight_hashes=weight_hashes, weights=weights,
            fn=decoded.module, input_specs=getattr(decoded, "input_specs", None),
            dynamic=bool(getattr(decoded, "dynamic", False)), name=name, provers={uid},
        )
        self.graphs[graph_id] = entry
        self._choose_kernels(entry, payload)
        log.info("graph %s registered on %s: %d weights (%d new)", entry.display_name, self.device, len(weights), added)
        return RegisterOutcome(graph_id, entry, new=True, weights_added=added)

    @staticmethod
    def _named(entry: GraphEntry, name: Optional[str]) -> GraphEntry:
        if entry.name is None and name is not None:
            entry.name = name
        return entry

    def _materialize_weight(self, codec: Any, spec: Any, blob: memoryview) -> torch.Tensor:
        """Raw weight bytes (dtype and shape from the graph's weight spec) -> a device tensor,
        after checking they hash to the spec's name: one client cannot plant other values
        under the hash of a weight another client's graph uses."""
        return self._verify_weight(codec, spec, blob).to(self.device, copy=True).contiguous()

    @staticmethod
    def _verify_weight(codec: Any, spec: Any, blob: memoryview) -> torch.Tensor:
        """The blob as a CPU tensor over its bytes, once it re-hashes to the spec's name."""
        try:
            return codec.weight_to_tensor(codec.WeightBlob(spec.dtype, tuple(spec.shape), blob), expected_hash=spec.hash)
        except codec.PayloadError as exc:
            raise ProtocolError("payload_rejected", f"weight {spec.hash}: {exc}") from None

    def _choose_kernels(self, entry: GraphEntry, payload: memoryview) -> None:
        """Set ``entry.fn``: its ATen module, or inductor's code: loaded from an artifact a
        compile left on disk (a restart), else compiled by the compile worker (``entry.compiling``
        until it is done) or, without one, here. With a worker the loop never traces the graph:
        the worker also decides whether it may be compiled."""
        entry.fn = entry.decoded.module
        mode = resolve_compile_mode(self._compile_mode(), self.device)
        if mode != "inductor":
            entry.kernels_note = f"daemon.compile {self._compile_mode()}"
            return
        if self._compiler is None:
            entry.fn = compile_in_process(entry.decoded, entry.weights, self.device, entry.display_name)
            entry.kernels = "aten" if entry.fn is entry.decoded.module else "inductor"
            entry.kernels_note = "compiled in the daemon" if entry.kernels == "inductor" else "not compiled (see the log)"
            return
        if has_symbolic_shapes(entry.decoded):
            entry.kernels_note = "not compiled: it has symbolic shapes"
            log.info("graph %s runs its ATen code, not inductor's: it has symbolic shapes", entry.display_name)
            return
        try:
            path = artifact_dir() / artifact_name(entry.graph_id, self.device)
        except Exception as exc:  # noqa: BLE001 - no usable cache directory: the graph still serves
            entry.kernels_note = f"not compiled: {describe_failure(exc)}"
            log.warning("graph %s runs its ATen code: %s", entry.display_name, entry.kernels_note)
            return
        if path.exists() and self._load(entry, path, "compiled before (artifact on disk)"):
            return
        entry.compiling = self._compiler.submit(
            graph_id=entry.graph_id, device=str(self.device), name=entry.display_name, path=path, payload=bytes(payload),
            namespaces=tuple(self._allowed_namespaces()), on_done=self._compiled)

    def _compiled(self, result: Any) -> None:
        """The compile worker finished ``result.job``: load its artifact, or keep the ATen code."""
        entry = self.graphs.get(result.job.graph_id)
        if entry is None or entry.compiling is not result.job:
            return  # released while it compiled: the artifact stays on disk for next time
        entry.compiling = None
        if result.eager_reason:
            entry.kernels_note = f"not compiled: {result.eager_reason}"
            log.info("graph %s runs its ATen code, not inductor's: %s", entry.display_name, result.eager_reason)
        elif not result.ok:
            entry.kernels_note = f"compile failed: {result.error}"
            log.warning("graph %s runs its ATen code: inductor could not compile it (%s)", entry.display_name, result.error)
        else:
            self._load(entry, result.job.path, f"compiled by inductor in {result.seconds:.1f} s")

    def _load(self, entry: GraphEntry, path: Any, how: str) -> bool:
        started = time.perf_counter()
        try:
            entry.fn = load_artifact(path)
        except Exception as exc:  # noqa: BLE001 - a stale or broken file: compile again / keep ATen
            log.warning("graph %s: compiled artifact %s did not load (%s); removed", entry.display_name, path.name,
                        describe_failure(exc))
            path.unlink(missing_ok=True)
            return False
        entry.kernels = "inductor"
        entry.kernels_note = f"{how}, loaded in {time.perf_counter() - started:.2f} s"
        log.info("graph %s runs inductor's code: %s", entry.display_name, entry.kernels_note)
        return True

    def compile_progress(self, entry: GraphEntry) -> Optional[dict]:
        """None when ``entry`` is usable; else where its compile stands (the register reply's
        ``compiling``)."""
        if entry.compiling is None:
            return None
        return self._compiler.progress(entry.compiling)

    def settle_compiles(self) -> None:
        """Let finished compiles land (the register command asks before answering)."""
        if self._compiler is not None:
            self._compiler.poll()

    # -- references ------------------------------------------------------------------------------

    def acquire(self, entry: GraphEntry) -> GraphEntry:
        entry.refs += 1
        return entry

    def release(self, entry: GraphEntry) -> None:
        entry.refs -= 1
        if entry.refs > 0 or self.graphs.get(entry.graph_id) is not entry:
            return
        del self.graphs[entry.graph_id]
        for weight_hash in entry.weight_hashes:
            weight = self.weights.get(weight_hash)
            if weight is None:
                continue
            weight.refs -= 1
            if weight.refs <= 0:
                del self.weights[weight_hash]
        entry.weights.clear()
        log.info("graph %s dropped from %s (no session uses it)", entry.short_name, self.device)

    def describe(self, sessions_using: Callable[[str], list[int]]) -> list[dict]:
        """One row per registered graph: id, name, weights, inputs, mutated inputs, sessions."""
        rows = []
        for entry in sorted(self.graphs.values(), key=lambda e: e.graph_id):
            weights = dict.fromkeys(entry.weight_hashes)
            rows.append({
                "graph": entry.graph_id, "name": entry.name, "short_name": entry.short_name,
                "weights": len(weights), "weight_bytes": sum(self.weights[h].nbytes for h in weights if h in self.weights),
                "inputs": len(entry.input_specs) if entry.input_specs is not None else None,
                "mutated_inputs": list(entry.mutated_inputs), "dynamic": entry.dynamic,
                "kernels": "compiling" if entry.compiling is not None else entry.kernels, "kernels_note": entry.kernels_note,
                "sessions": sessions_using(entry.graph_id),
            })
        return rows

    def stats(self) -> dict:
        return {"graphs": len(self.graphs),
                "weights": {"count": len(self.weights), "bytes": sum(w.nbytes for w in self.weights.values())}}


class DeviceRuntime:
    """One served device: its name, the backend its tree managers run, its graph store."""

    def __init__(self, name: str, *, allowed_namespaces: Callable[[], Sequence[str]], compile_mode: Callable[[], str],
                 compiler: Any = None) -> None:
        self.name = name
        self.device = torch.device(name)
        self.is_cuda = self.device.type == "cuda"
        self.graphs = DeviceGraphs(self.device, allowed_namespaces=allowed_namespaces, compile_mode=compile_mode,
                                   compiler=compiler)
        # The GPU's UUID lets clients with another CUDA_VISIBLE_DEVICES numbering find it.
        self.uuid = None
        if self.is_cuda:
            uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
            self.uuid = str(uuid) if uuid is not None else None
        self._manager_class = tree_manager_class()
        # Ask the core which backend runs here rather than assuming from the device name.
        probe = self._manager_class(self.name)
        try:
            self.backend = str(probe.backend_name)
        finally:
            probe.close()

    def make_manager(self, policy: Any) -> Any:
        return self._manager_class(self.name, policy=policy)

    def memory_stats(self) -> dict:
        if not self.is_cuda:
            return {"allocated_bytes": None, "reserved_bytes": None}
        return {"allocated_bytes": int(torch.cuda.memory_allocated(self.device)),
                "reserved_bytes": int(torch.cuda.memory_reserved(self.device))}

    def synchronize(self) -> None:
        if self.is_cuda:
            # The device-wide wait without torch.cuda.synchronize's device switch when this device
            # is already current (a single-GPU daemon's every submit): microseconds per reply.
            if _device_synchronize is not None and torch.cuda.current_device() == self.device.index:
                _device_synchronize()
            else:
                torch.cuda.synchronize(self.device)


def resolve_devices(devices: Any) -> list[str]:
    """``daemon.devices`` -> device names: "auto" is every CUDA device, or "cpu" without one."""
    if devices == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    if devices == "cpu":
        return ["cpu"]
    names = list(devices)
    for name in names:
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {name} requested but this torch build or host has no CUDA")
            index = torch.device(name).index or 0
            if index >= torch.cuda.device_count():
                raise RuntimeError(f"device {name} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return names
