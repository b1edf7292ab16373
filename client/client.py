"""The cgtree client: submit graphs to cgtreed and use the outputs as ordinary tensors.

    from cgtree.client import Client
    with Client() as client:                 # endpoint: argument, $CGTREE_ENDPOINT, or the default
        outs = client.submit(model, inputs)  # lowered + registered on first use; a tuple of outputs
        h = client.register(model, example_inputs)   # optional; then client.submit(h, inputs)
        client.mark_step_begin()
        state = client.status()

``Client`` is the API; each concern is a module of its own (docs/ARCHITECTURE.md, "The client"):
``connection`` (one request, one reply: ZeroMQ or the submit lane), ``session`` (hello, a
daemon's restart, what is re-sent), ``registration`` (graphs and weights), ``inputs`` and
``outputs`` (tensors to descriptors and back, output lifetimes), ``plans`` (prepared submits, the
doorbell), ``errors``.

Invariants:
- No call hangs: every request waits at most ``timeout_s`` for its reply (ZeroMQ DEALER,
  LINGER 0), then the socket is replaced (a late reply can never be taken for the next one)
  and ``DaemonTimeout`` says which endpoint did not answer. A missing ipc socket file fails at
  once with ``DaemonUnavailable``. ``close()`` closes this client's sockets (LINGER 0) and
  never terminates the ZeroMQ context: every ``Client`` of a process shares one that lives as
  long as the process (``connection._zmq_context``), so closing cannot block.
- Output lifetime: an output is valid until the same graph's next submit in this session, or
  until released. CPU outputs are copies the client owns and never change. CUDA outputs are
  views of a daemon-owned buffer; each submit builds them on fresh non-owning storages over the
  cached mapping, and marks the previous submit's ones so that touching them raises (where the
  torch build has ``torch._C._set_storage_access_error_msg``: CUDA builds) rather than reading
  changed data.
- CUDA inputs are exported once per storage (``_share_cuda_``) and cached while the storage
  lives; the current stream is synchronized before sending, so the daemon reads finished data
  without any cross-process event wait. An earlier output passed back in travels as an
  ``output`` reference (an IPC-opened storage cannot be re-exported).
- The client keeps every payload it registered, so it can register again when the daemon
  says it does not know a graph (daemon restart): ``no_session`` -> hello, ``unknown_graph``
  -> register, each retried once.
- Not thread-safe across threads without its internal lock; not usable across ``fork``.

Daemon restarts (systemd restarts cgtreed after a sticky CUDA error or a crash):
- A request the daemon refused with ``unavailable`` (it was stopping) never ran: the client
  waits for the next daemon (up to ``timeout_s``), says hello, re-registers, sends it again.
- A request whose daemon went away before answering may or may not have run. A waiting
  client notices at once, whatever it waits on (ZeroMQ, the lane, the doorbell): the lane's
  end-of-file, or ``cgtree.client.watch`` (looked at every few tens of milliseconds): the
  socket file gone or replaced by a new daemon's, the daemon's process exiting or gone. ZeroMQ
  itself hides a dead peer, so no ZeroMQ event is relied on. The client sends it once more
  to the next daemon only when that is safe (``resend_after_interruption``): every command but
  ``submit`` is idempotent, and so is ``submit`` of a graph that writes none of its inputs (the
  daemon reports ``mutated_inputs`` at register). A submit of a graph that mutates its inputs
  is not re-sent: ``RequestInterrupted`` (retryable) says so, and the caller decides; the next
  call reconnects by itself. Never a wrong result: a re-sent submit reads the caller's inputs
  as they are now, which a non-mutating graph left unchanged.
- Only one re-send per call. Outputs of the old daemon are invalid after a restart (their
  buffers are gone); passing one back in fails with a clear error.
- A daemon that is simply absent when a call starts (no socket file) fails at once with
  ``DaemonUnavailable``; one that stops answering fails after ``timeout_s`` with
  ``DaemonTimeout`` (not re-sent: the request may still be running). A call that starts after
  the daemon it last heard from died (its socket file left behind, or already a new daemon's)
  is not sent to it: the client waits for the next daemon and sends it there (``DaemonGone``
  inside, never raised to the caller unless no daemon comes within ``timeout_s``).
- Waiting for the next daemon: one ping per socket file, kept queued while the file stays the
  same (a daemon that bound it but is not serving yet answers it as soon as it is), a new one
  on a new socket when the file is replaced; the file is looked at every ``RECONNECT_POLL_S``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch
import zmq

from cgtree.client.connection import Connection
from cgtree.client.errors import (  # noqa: F401 (re-exported)
    ClientError,
    DaemonError,
    DaemonGone,
    DaemonTimeout,
    DaemonUnavailable,
    RequestInterrupted,
)
from cgtree.client.inputs import (
    InputEncoder,
    _as_input_list,
    _device_name_only,
    _device_of,
    _identity_marks,
    _normalize_device,
)
from cgtree.client.outputs import OutputBuffers
from cgtree.client.plans import Observation, Plans, Veto, _timing
from cgtree.client.registration import (
    GraphHandle,
    Registration,
    _graph_label,
    _is_encoded,
    _lower_and_encode,
    _spec_key,
)
from cgtree.client.session import Session
from cgtree.client.stream_order import StreamOrder
from cgtree.daemon.runtime_dir import default_endpoint
from cgtree.daemon.tensors import (
    tensor_from_cpu_desc,
)

log = logging.getLogger("cgtree.client")

DEFAULT_TIMEOUT_S = 60.0
BYE_TIMEOUT_S = 2.0
# Poll a lane reply without sleeping this long before waiting in the kernel (``spin_us``).
DEFAULT_SPIN_US = 1000


# ---------------------------------------------------------------------------------- client


class Client:
    """A connection to cgtreed with one session. See the module docstring.

    endpoint: ZeroMQ endpoint; default ``$CGTREE_ENDPOINT`` or the per-user default socket.
    session: optional session name: a client restarting with the same name finds its
        recordings warm (the daemon parks a dead named session's trees for a while).
    timeout_s: how long any one call waits for the daemon before ``DaemonTimeout``.
    lanes: use the session's submit lane when the daemon offers one (``cgtree.daemon.lane``):
        requests up to 128 KiB travel on a unix seqpacket socket instead of ZeroMQ.
    graph_cache: where lowered nn.Modules are cached (``cgtree.client.graph_cache``): None uses
        ``$CGTREE_GRAPH_CACHE`` / ``graph_cache.enable()``, False none, a directory that one. A
        new process then registers a known module without lowering it (milliseconds, not seconds).
    spin_us: how long to poll for a lane reply without sleeping (default ``$CGTREE_SPIN_US`` or
        1000): a reply that arrives within it costs no thread wake-up (tens of microseconds on
        the H200 host); the client is waiting for that reply anyway. 0 always sleeps.
    doorbell: ring the lane's doorbell page for plan runs when the daemon offers one
        (``cgtree.daemon.doorbell``; default ``$CGTREE_DOORBELL``, else on): no socket between
        the steps of a submit loop, the outputs returned once the device wrote its done word.
        The client spins while it waits (``spin_us``, then 50 us sleeps).
    stream_ordered_outputs: opt-in (default ``$CGTREE_STREAM_ORDERED_OUTPUTS``, else off): a
        doorbell run returns at the daemon's answer and the caller's current CUDA stream waits
        for the done word instead (``cgtree.client.stream_order``): the caller's own work after
        the call overlaps the device's, as in process. A daemon that dies before the device
        finished then **aborts this process** (its stream would wait forever, or run on
        unfinished outputs); with the default, that costs one retried call.
    """

    def __init__(self, endpoint: Optional[str] = None, *, session: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, lanes: bool = True, spin_us: Optional[int] = None,
                 graph_cache: Any = None, doorbell: Optional[bool] = None, device: Optional[str] = None,
                 stream_ordered_outputs: Optional[bool] = None) -> None:
        self.endpoint = endpoint or os.environ.get("CGTREE_ENDPOINT") or default_endpoint()
        # Where graphs with CPU inputs run when no call names a device (see target_device).
        self.default_device = _device_name_only(device or os.environ.get("CGTREE_DEVICE") or None)
        self.session_name = session
        self.timeout_s = float(timeout_s)
        self.session_id: Optional[int] = None
        self.daemon_pid: Optional[int] = None
        self.devices: list[dict] = []
        self.max_message_bytes: Optional[int] = None
        self._last_execution: Optional[dict] = None
        self._last_timing: Optional[dict] = None
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self.spin_s = (int(os.environ.get("CGTREE_SPIN_US", DEFAULT_SPIN_US)) if spin_us is None else int(spin_us)) * 1e-6
        self._closed = False
        self.registration = Registration(self, graph_cache)
        self.buffers = OutputBuffers(self)
        self.encoder = InputEncoder(self)
        self.connection = Connection(self, lanes)
        self.session = Session(self)
        # Opt-in (cgtree.client.stream_order): doorbell outputs ordered on the caller's stream;
        # a daemon that dies mid-run then aborts this process instead of costing one retry.
        self.stream_order = StreamOrder(stream_ordered_outputs, self.connection.watch.path)
        self.plans = Plans(self, doorbell)

    # ------------------------------------------------------------------------ context manager

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and os.getpid() == self._pid:
                self.close(timeout_s=0.5)
        except Exception:
            pass

    def close(self, timeout_s: float = BYE_TIMEOUT_S) -> None:
        """Invalidate outputs, close mappings, say bye (best effort), close the socket."""
        if self._closed:
            return
        with self._lock:
            self.stream_order.close()  # every stream past its wait before pages and buffers go
            self.buffers.invalidate_all()
            if self.session_id is not None:
                try:
                    self.connection.call("bye", {}, timeout_s=timeout_s)
                except (ClientError, zmq.ZMQError):
                    pass
            self.session_id = None
            self._closed = True
            self.connection.lane.close()
            self.connection.zmq.reset()  # LINGER 0; the shared context is never terminated (_zmq_context)

    # ---------------------------------------------------------------------------- public API

    def ping(self) -> dict:
        return self.session.with_recovery("ping", lambda: self.connection.call("ping", {})[0])

    def status(self, session_only: bool = False) -> dict:
        """The daemon's state: devices, weights, sessions, trees (see docs/PROTOCOL.md); with
        ``"compile_backend"`` (``cgtree.client.compile_backend.CompileStats``) once a
        ``cgtree.client.backend(client)`` compiled graphs: which ran here instead, and why; and
        ``"client_gates"``: this client's gated doorbell runs (``cgtree.client.gate_backoff``:
        whether it gates now, late verdicts, backoffs)."""
        state = self.session.with_recovery("status", lambda: self.connection.call("status", {"session_only": bool(session_only)})[0])
        state = {**state, "client_gates": self.plans.gates.describe()}
        stats = getattr(self, "compile_stats", None)
        if stats is not None:  # what cgtree.client.backend(self) kept in this process, and why
            state = {**state, "compile_backend": stats.as_dict()}
        return state

    def register(self, graph: Any, example_inputs: Sequence[Any] = (), *, device: Optional[str] = None) -> GraphHandle:
        """Lower (if needed), encode and register ``graph``; returns a handle for ``submit``.

        graph: ``nn.Module``, ``torch.fx.GraphModule``, ``ExportedProgram``, an
            ``EncodedGraph`` from ``cgtree.client.lowering.encode``, or a ``GraphHandle``.
        device: the daemon device to run on; default: where the example inputs are.
        """
        if isinstance(graph, GraphHandle):
            self.session.with_recovery("register", lambda: self.registration.ensure(graph))
            return graph
        inputs = _as_input_list(example_inputs)
        device = self.target_device(device, inputs)
        key = _spec_key(inputs, device)
        by_spec = self.registration.cache_for(graph)
        if by_spec is not None and key in by_spec:
            handle = by_spec[key]
            self.session.with_recovery("register", lambda: self.registration.ensure(handle))
            return handle
        encoded = graph if _is_encoded(graph) else _lower_and_encode(graph, inputs, self.registration.graph_cache)
        handle = self.registration.by_id.get((device, encoded.graph_id)) or GraphHandle(
            encoded.graph_id, device, encoded, len(encoded.input_specs), name=_graph_label(graph))
        self.session.with_recovery("register", lambda: self.registration.ensure(handle))
        self.registration.by_id[(device, handle.graph_id)] = handle
        if by_spec is not None:
            by_spec[key] = handle
        return handle

    def target_device(self, device: Optional[str], inputs: Sequence[Any] = ()) -> str:
        """The daemon device a graph runs on: ``device`` when given; else where its CUDA inputs
        are; else (CPU inputs) ``Client(device=...)`` / ``$CGTREE_DEVICE`` when set, ``cpu`` when
        the daemon serves it, and otherwise the daemon's one device: a client without CUDA
        (``CUDA_VISIBLE_DEVICES=""``) runs on the daemon's GPU and gets CPU outputs back."""
        if device is not None:
            return _normalize_device(device)
        found = _device_of(list(inputs))
        if found != "cpu":
            return found
        if self.default_device is not None:
            return self.default_device
        with self._lock:
            self.session.with_recovery("hello", self.session.ensure)
            served = [d.get("device") for d in self.devices]
        if not served or "cpu" in served:
            return "cpu"
        if len(served) == 1:
            return served[0]
        raise ClientError(f"the inputs are on the CPU and cgtreed serves {', '.join(served)} but not cpu: name the device "
                          "(device=..., Client(device=...) or $CGTREE_DEVICE)")

    def submit(self, graph: Any, inputs: Sequence[Any], *, device: Optional[str] = None) -> tuple:
        """Run ``graph`` on ``inputs`` in the daemon; returns its outputs as a tuple.

        ``self.last_execution`` then says what the daemon did: warmup, recorded, replayed or
        skipped (with the reason), and on which tree node.
        """
        return self._submit(graph, inputs, device, None)

    def submit_observing(self, graph: Any, inputs: Sequence[Any], observe: Callable[[], Any], *,
                         device: Optional[str] = None) -> tuple[tuple, Any]:
        """``submit``, and ``observe()`` run once while the daemon works on it: (outputs, what
        ``observe`` returned). On a doorbell run it runs between the ring and the answer, off the
        call's critical path; elsewhere once the reply is in. For a check of client state whose
        answer says whether the outputs may be used (the compile backend's check that no weight
        changed since it was uploaded): the caller discards the outputs and submits again when
        they may not. ``observe`` must not touch this client."""
        observation = Observation(observe)
        outputs = self._submit(graph, inputs, device, observation)
        return outputs, observation.result()

    def submit_vetoable(self, graph: Any, inputs: Sequence[Any], veto: Callable[[], Any], *,
                        device: Optional[str] = None) -> tuple[Optional[tuple], Any]:
        """``submit``, unless ``veto()`` says no: (outputs, its falsy answer), or (None, its truthy
        answer) when nothing ran. ``veto`` runs once, before the run launches: on a gated doorbell
        run (a loop over the same inputs) after the request is rung, while the daemon does its
        work up to the launch, so its time is mostly hidden; elsewhere before anything is sent.
        For a check whose failure must keep the run from happening at all (the compile
        backend's weight check, for a graph that writes its inputs). An exception it raises
        vetoes too, and is raised here. ``veto`` must not touch this client."""
        check = Veto(veto)
        outputs = self._submit(graph, inputs, device, None, check)
        answer = check.result()
        return (None, answer) if outputs is check else (outputs, answer)

    def _submit(self, graph: Any, inputs: Sequence[Any], device: Optional[str], observation: Optional[Observation],
                veto: Optional[Veto] = None) -> Any:
        inputs = _as_input_list(inputs)
        handle = graph if isinstance(graph, GraphHandle) else self.register(graph, inputs, device=device)
        with self._lock:
            mutates = None if handle.mutated_inputs is None else bool(handle.mutated_inputs)
            return self.session.with_recovery("submit", functools.partial(self._submit_once, handle, inputs, observation, veto),
                                              mutates_inputs=mutates, what=handle)

    @property
    def last_execution(self) -> Optional[dict]:
        """What the daemon did on the last submit: ``mode`` (warmup, recorded, replayed,
        skipped), ``node_id``, ``function``, ``skip_reason``, ``daemon_us`` (its own time,
        synchronization included), and ``plan`` when it ran as a prepared submit."""
        if self.plans.run is not None:
            self.plans.settle_report()
        return self._last_execution

    @last_execution.setter
    def last_execution(self, value: Optional[dict]) -> None:
        self.plans.settle_report()
        self._last_execution = value

    @property
    def last_timing(self) -> Optional[dict]:
        """Where the last submit's time went, in microseconds: ``prepare_us`` (inputs described,
        stream synchronized), ``request_us`` (sent until the reply came back: the daemon's own
        share is ``last_execution["daemon_us"]``), ``outputs_us`` (outputs built). A plan run
        rung on a doorbell is answered at its launch: its ``request_us`` ends there and its
        ``outputs_us`` includes waiting for the device."""
        if self.plans.run is not None:
            self.plans.settle_report()
        return self._last_timing

    @last_timing.setter
    def last_timing(self, value: Optional[dict]) -> None:
        self.plans.settle_report()
        self._last_timing = value

    def _submit_once(self, handle: GraphHandle, inputs: list, observation: Optional[Observation],
                     veto: Optional[Veto]) -> Any:
        # A doorbell run runs ``observation`` while the daemon works; elsewhere its ``result()``
        # runs it once the submit is over. ``veto`` runs once, before the launch; when it says
        # no, ``veto`` itself is returned and nothing was sent (or launched). Encoded on every
        # attempt: after a restart the session, its registrations and its output buffers are new.
        started = time.perf_counter()
        hot = self.plans.hot.get((handle.device, handle.graph_id))
        if hot is not None and len(inputs) == len(hot[0]):
            # The hot plan's inputs are checked inside: after the ring when the run is gated.
            outcome = self.plans.submit_planned(handle, hot[1], started, observation, identity=(hot[0], inputs), veto=veto)
            if type(outcome) is tuple or (veto is not None and outcome is veto):
                return outcome
            if outcome is None:
                self.plans.forget(handle, hot[1])
        if veto is not None and veto.vetoes():
            return veto
        self.registration.ensure(handle)
        packed = self.encoder.packed(handle.device, inputs)
        plan = self.plans.known.get((handle.device, handle.graph_id, packed)) if packed is not None else None
        if plan is not None:
            outputs = self.plans.submit_planned(handle, plan, started, observation)
            if outputs is not None:
                self.plans.hot[(handle.device, handle.graph_id)] = (_identity_marks(inputs), plan)
                return outputs
            self.plans.forget(handle, plan)
        if packed is not None:
            descs, frames = packed, []
        else:
            descs, frames = self.encoder.encode(handle.device, inputs)
        self.encoder.settle(handle.device)
        body = {"device": self.encoder.wire_device(handle.device), "graph": handle.graph_id, "inputs": descs}
        sent = time.perf_counter()
        reply, reply_frames = self.session.call("submit", body, frames, handle=handle)
        answered = time.perf_counter()
        self.last_execution = reply.get("execution")
        outputs = tuple(self.buffers.decode(handle, reply, reply_frames))
        if packed is not None and isinstance(reply.get("plan"), int):
            self.plans.remember(handle, packed, reply)
        for written in reply.get("written_inputs") or ():
            # A CPU input the graph wrote: the daemon wrote its copy; bring the change home.
            index = written.get("input")
            if not isinstance(index, int) or not 0 <= index < len(inputs) or not isinstance(inputs[index], torch.Tensor):
                raise ClientError(f"the daemon wrote back input {index!r}, which this submit did not send as a tensor")
            with torch.no_grad():
                inputs[index].copy_(tensor_from_cpu_desc(written, reply_frames, f"written input {index}"))
        self.last_timing = _timing(started, sent, answered, time.perf_counter())
        return outputs

    def mark_step_begin(self, device: Optional[str] = None) -> None:
        """The next submit starts a new generation of the trees (an iteration boundary)."""
        self.session.with_recovery("mark_step", lambda: self.session.call(
            "mark_step", {"device": self.encoder.wire_device(_normalize_device(device)) if device else None}))

    def release(self, graph: Optional[GraphHandle] = None, *, device: Optional[str] = None) -> int:
        """Give back the outputs of ``graph`` (or of every graph on ``device`` / everywhere).
        Tensors over them become invalid (touching them raises where the build can)."""
        with self._lock:
            targets = [graph.device] if graph is not None else ([_normalize_device(device)] if device else
                                                                 sorted({d for d, _ in self.buffers.graph_buffer}))
            released = 0
            for dev in targets:
                graph_id = graph.graph_id if graph is not None else None
                for key in [k for k in self.buffers.graph_buffer if k[0] == dev and (graph_id is None or k[1] == graph_id)]:
                    self.buffers.drop_graph_outputs(key, close_mapping=True)
                if self.session_id is not None:
                    body = {"device": self.encoder.wire_device(dev), "graph": graph_id}
                    released += self.session.with_recovery("release", lambda: self.session.call("release", body))[0]["released"]
            return released

    def reset(self, device: Optional[str] = None) -> None:
        """Drop this session's trees (recordings, pool); registered graphs stay registered."""
        with self._lock:
            self.buffers.invalidate_all()
            self.session.with_recovery("reset", lambda: self.session.call(
                "reset", {"device": self.encoder.wire_device(_normalize_device(device)) if device else None}))

    @property
    def lane_attached(self) -> bool:
        """Whether requests currently travel on the submit lane (else ZeroMQ)."""
        return self.connection.lane.attached is not None
