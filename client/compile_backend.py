"""``torch.compile(model, backend=cgtree.client.backend(client))``: every graph dynamo captures
runs in cgtreed, under the daemon's graph trees, instead of in this process.

    from cgtree.client import Client, backend
    client = Client()
    model = torch.compile(model.eval(), backend=backend(client))
    with torch.no_grad():
        out = model(x)        # graph lowered and registered on first call, then submitted

Pipeline per dynamo graph: ``aot_autograd`` functionalizes it (parameters, buffers and input
mutations explicit, and here mutations are taken *out* of the graph: the graph returns the new
values and AOT writes them into the caller's tensors after the call). On its first call the
inference graph is lowered (``cgtree.client.lowering``, fake tracing: nothing runs here),
encoded and registered with the daemon; every call then submits the inputs and returns the
daemon's outputs.

Parameters reach the daemon as *weights uploaded once, by content hash*, not through CUDA IPC:
- the daemon already treats weights as static inputs of its trees (used in place, addresses
  fixed), while anything passed by IPC on a submit is an ordinary input it copies into the
  recording's buffers on every replay: sharing parameters by IPC would copy every parameter
  on every step;
- content addressing lets every client of the same model share one copy on the device, and
  the daemon owns that memory: a client that dies takes nothing of it down;
- the cost is a snapshot: a parameter changed in place later (an optimizer step, a
  ``load_state_dict``) would be stale in the daemon. So each call compares the weights'
  version counters and identities with those registered, and a change re-registers the graph
  (only changed blobs travel). That comparison costs about 60 ns a weight (reading
  ``_version``), 20-40 us on a model with hundreds: for a graph that writes none of its inputs it
  runs while the daemon works on the submit (``Client.submit_observing``), and a change found
  then discards the outputs and submits again on the new weights; for one that writes its inputs
  it vetoes the run before it launches (``Client.submit_vetoable``: on a gated doorbell run it
  runs while the daemon does its work up to the launch), then the graph is registered again. An input that changes on
  every call is not a weight at all: static inputs the graph's AOT metadata says are mutated (KV caches, running statistics),
  and any weight seen changing twice, travel with each submit instead (by CUDA IPC on CUDA,
  read in place, no copy on the client side).

Mutated inputs on CUDA (KV caches written each step, any input the model writes): the graph
writes them itself (AOT's ``keep_inference_input_mutations``: ``copy_`` into the input at the
end of the graph), so the daemon writes the client's buffer in place through its IPC mapping,
as a static input of the recording (``cgtree.daemon.commands.submit``: inputs a graph writes),
and the new values never travel: otherwise every step of a 6-layer decoder with 256-position
caches would copy 24 MiB of caches into the recording, 24 MiB of new caches out to the output
buffer, and 24 MiB back into the caches. Where AOT still hands over a graph that returns new
values for its wrapper to copy back, this backend moves those writes into the graph itself
(``mutations_into_graph``) and gives the wrapper the inputs as their "new values" (its
``copy_`` of a tensor onto itself does nothing). On CPU the functional form is kept: CPU inputs
reach the daemon as copies, and AOT writes the new values back here.

Invariants:
- Graph outputs are the daemon's: CUDA outputs are views of the session's output buffer and
  stay valid until the same graph's next submit (as graph-tree outputs stay valid until the
  next step). Clone what you keep longer.
- Each submit is its own top-level invocation in the daemon (its trees start a new generation
  per submit), so ``torch.compiler.cudagraph_mark_step_begin()`` needs nothing from this
  backend.
- Graphs with int inputs or symbolic sizes go to the daemon once per concrete values
  (``DaemonGraph``): static graphs the daemon records, compiles and checks like any other.
- Training graphs (forward/backward) and graphs the daemon cannot take (ops the lowering
  refuses) run in this process, eagerly, with one log line saying why, and are counted with
  their reason in ``client.status()["compile_backend"]`` (``CompileStats``): the daemon's
  protocol serves inference graphs.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from cgtree import graph_facts
from cgtree.compile import boxed as _boxed

__all__ = ["DaemonGraph", "backend"]

log = logging.getLogger("cgtree.client.compile")

# A weight whose content changed this many times is passed with each submit from then on.
MAX_WEIGHT_REFRESHES = 1


class CompileStats:
    """What one ``backend(client)`` did with the graphs dynamo gave it; ``client.status()``
    reports it under ``"compile_backend"``. Nothing stays in the client unseen: a graph that
    runs here is counted, with its reason, and logged."""

    def __init__(self) -> None:
        self.graphs_to_daemon = 0
        self.specializations = 0  # daemon graphs registered for concrete int/size values
        self.in_client: list[dict] = []  # {"graph", "reason"}

    def ran_in_client(self, name: str, reason: str) -> None:
        self.in_client.append({"graph": name, "reason": reason})

    def as_dict(self) -> dict:
        return {"graphs_to_daemon": self.graphs_to_daemon, "specializations": self.specializations,
                "graphs_in_client": len(self.in_client), "in_client": list(self.in_client)}


class _Registration:
    """One graph as registered with the daemon: its handle, which inputs travel with each
    submit, and the weights' identities and versions when they were uploaded."""

    __slots__ = ("handle", "user_positions", "weights")

    def __init__(self, handle: Any, user_positions: list[int], weights: list[tuple[int, Any, int]]) -> None:
        self.handle = handle
        self.user_positions = user_positions
        self.weights = weights  # (position, tensor, version)

    def changed_weights(self, inputs: Sequence[Any]) -> list[int]:
        return [i for i, tensor, version in self.weights if inputs[i] is not tensor or inputs[i]._version != version]


def specialization_key(inputs: Sequence[Any]) -> tuple:
    """What a graph with int inputs or symbolic sizes is registered per: the values of its
    non-tensor inputs and the shapes of its tensors (PyTorch's trees record per int value too)."""
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in inputs)


def _with_constants(gm: torch.fx.GraphModule, inputs: Sequence[Any], tensor_positions: list[int]) -> Callable:
    """``gm`` as a function of its tensor inputs, the other inputs fixed at these values: traced
    with concrete tensors, every size the graph computes from them is a constant."""
    constants = {i: v for i, v in enumerate(inputs) if i not in set(tensor_positions)}

    def specialized(*tensors: Any) -> Any:
        args: list[Any] = [None] * len(inputs)
        for position, value in constants.items():
            args[position] = value
        for position, value in zip(tensor_positions, tensors):
            args[position] = value
        return gm(*args)

    return specialized


class DaemonGraph:
    """One AOT inference graph served by the daemon; a boxed callable (``f(args_list)``).

    A graph whose inputs are all tensors of fixed shapes is registered once. A graph with int
    (SymInt) inputs or symbolic sizes (HF generate's prefill, ``dynamic=True``) is registered
    once per ``specialization_key``: each registration is a static graph the daemon records,
    compiles and checks like any other; a warning says when their number passes the policy's
    ``dynamic_shape_warn_limit``, as the tree's own warning would.
    """

    def __init__(self, client: Any, gm: torch.fx.GraphModule, device: str, static_input_idxs: Sequence[int],
                 mutated_input_idxs: Sequence[int], name: str, written_in_graph: Sequence[int] = (),
                 stats: Optional[CompileStats] = None) -> None:
        self.client = client
        self.gm = gm
        # Inputs whose new values the graph writes itself (see the module docstring); AOT
        # expects them first among the outputs, in this order.
        self.written_in_graph = list(written_in_graph)
        self.writes_inputs = bool(self.written_in_graph) or bool(mutated_input_idxs)
        self.device = device
        self.name = name
        self.weight_positions = sorted(set(static_input_idxs) - set(mutated_input_idxs))
        self.specialized = graph_facts.is_dynamic(gm) or any(
            not isinstance(graph_facts.placeholder_value(node), torch.Tensor) for node in graph_facts.placeholders(gm))
        self.refreshes: dict[int, int] = {}
        self.registrations: dict[Any, _Registration] = {}
        self.stats = stats or CompileStats()
        self.local: Optional[Callable] = None  # set when the daemon cannot take this graph
        self._boxed_call = True

    # -- registration ------------------------------------------------------------------------

    def _register(self, inputs: Sequence[Any], key: Any) -> Optional[_Registration]:
        from cgtree.client import lowering

        tensor_positions = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        weights = [p for p in self.weight_positions if isinstance(inputs[p], torch.Tensor)]
        try:
            if self.specialized:
                function = _with_constants(self.gm, inputs, tensor_positions)
                lowered = lowering.lower(function, [inputs[i] for i in tensor_positions], tracing_mode="fake",
                                         weight_input_indices=[tensor_positions.index(p) for p in weights])
            else:
                lowered = lowering.lower(self.gm, list(inputs), tracing_mode="fake", weight_input_indices=weights)
            encoded = lowering.encode(lowered)
        except (lowering.LoweringError, Exception) as exc:  # noqa: B014 - any refusal: run here
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._run_here(f"cannot go to cgtreed ({reason[:300]})")
        from cgtree.client.errors import DaemonError

        try:
            # A CPU graph runs where the client sends CPU inputs (the daemon's GPU when it serves no CPU).
            handle = self.client.register(encoded, device=None if self.device == "cpu" else self.device)
        except DaemonError as exc:
            if exc.code != "payload_rejected":
                raise  # anything but a refusal of the graph itself: the caller must hear of it
            # e.g. an operator of a namespace the daemon does not allow (a library's custom op)
            return self._run_here(f"refused by cgtreed ({exc.message[:300]})")
        user_positions = [i for i in tensor_positions if i not in weights]
        registration = _Registration(handle, user_positions, [(i, inputs[i], inputs[i]._version) for i in weights])
        first = key not in self.registrations  # not a weight refresh of a known registration
        self.registrations[key] = registration
        if first and self.specialized:
            self.stats.specializations += 1
            self._warn_on_many_specializations()
        elif first:
            self.stats.graphs_to_daemon += 1
        log.info("cgtree: graph %s registered with cgtreed on %s (%d weights, %d inputs per call%s)",
                 self.name, self.device, len(weights), len(user_positions),
                 f"; specialization {len(self.registrations)}: {key}" if self.specialized else "")
        return registration

    def _run_here(self, reason: str) -> None:
        """From now on the graph runs in this process, eagerly: said once, and counted."""
        log.warning("cgtree: graph %s %s: it runs in this process, eagerly", self.name, reason)
        self.stats.ran_in_client(self.name, reason)
        self.local = self.gm.forward

    def _warn_on_many_specializations(self) -> None:
        from cgtree.compile import policy

        limit = policy().dynamic_shape_warn_limit
        if len(self.registrations) == limit + 1:
            log.warning("cgtree: graph %s has been registered with cgtreed for %d distinct int values / sizes (more "
                        "than dynamic_shape_warn_limit=%d); each costs a lowering, a registration and recordings",
                        self.name, len(self.registrations), limit)

    def _refresh(self, inputs: Sequence[Any], key: Any, changed: list[int]) -> Optional[_Registration]:
        """Weights changed since registration: register again with their new content; one that
        keeps changing becomes an input passed on every submit."""
        for position in changed:
            self.refreshes[position] = self.refreshes.get(position, 0) + 1
            if self.refreshes[position] > MAX_WEIGHT_REFRESHES and position in self.weight_positions:
                self.weight_positions.remove(position)
                log.info("cgtree: graph %s input %d changes between calls: it now travels with each submit",
                         self.name, position)
        return self._register(inputs, key)

    # -- calls -------------------------------------------------------------------------------

    def __call__(self, args: list) -> Any:
        inputs = tuple(args)
        args.clear()
        if self.local is not None:
            return self.local(*inputs)
        key = specialization_key(inputs) if self.specialized else None
        registration = self.registrations.get(key)
        if registration is None:
            registration = self._register(inputs, key)
        elif self._may_check_weights_late(registration):
            outputs, changed = self.client.submit_observing(
                registration.handle, [inputs[i] for i in registration.user_positions],
                functools.partial(registration.changed_weights, inputs))
            if not changed:
                return self._returned(inputs, outputs)
            # The daemon ran on the weights it holds, which are stale: run again on new ones.
            del outputs
            registration = self._refresh(inputs, key, changed)
        elif registration.weights:
            # A graph that writes its inputs must not run on stale weights at all: the check
            # vetoes the run, and runs after the ring where the run is gated (Client.submit_vetoable).
            outputs, changed = self.client.submit_vetoable(
                registration.handle, [inputs[i] for i in registration.user_positions],
                functools.partial(registration.changed_weights, inputs))
            if not changed:
                return self._returned(inputs, outputs)
            registration = self._refresh(inputs, key, changed)
        if registration is None:
            return self.local(*inputs)
        return self._returned(inputs, self.client.submit(registration.handle, [inputs[i] for i in registration.user_positions]))

    def _may_check_weights_late(self, registration: _Registration) -> bool:
        """Whether the weight check may run while the daemon works (``Client.submit_observing``)
        instead of before the submit: when a run on stale weights has no effect but outputs,
        which the run again overwrites. Not for a graph that writes an input (a KV cache would
        keep a write made with the old weights); not before the daemon said what it writes."""
        return (bool(registration.weights) and not self.writes_inputs
                and registration.handle.mutated_inputs is not None and not registration.handle.mutated_inputs)

    def _returned(self, inputs: tuple, outputs: tuple) -> list:
        if self.written_in_graph:
            return [*(inputs[i] for i in self.written_in_graph), *outputs]
        return list(outputs)


def _device_name(device: Optional[torch.device]) -> Optional[str]:
    if device is None:
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def _aot_metadata() -> tuple[list[int], set[int], Optional[list[int]]]:
    """AOT's static input indices, the inputs whose data the graph mutates, and the inputs whose
    new values lead the graph's outputs, in order (None when that layout is not the plain one:
    metadata mutations, intermediate bases, or metadata this torch does not have)."""
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    static = list(getattr(metadata, "static_input_indices", None) or [])
    infos = getattr(metadata, "input_info", None) or []
    mutated = {i for i, info in enumerate(infos) if getattr(info, "mutates_data", False)}
    leading = getattr(metadata, "mutated_inp_runtime_indices", None)
    plain = (
        leading is not None
        and getattr(metadata, "num_intermediate_bases", 1) == 0
        and not any(getattr(info, "mutates_metadata", True) for info in infos if info is not None and getattr(info, "mutates_data", False))
        and set(leading) == mutated
    )
    return static, mutated, list(leading) if plain else None


def mutations_into_graph(gm: torch.fx.GraphModule, leading: Sequence[int]) -> torch.fx.GraphModule:
    """A copy of AOT's functional inference graph whose first ``len(leading)`` outputs (new values
    of inputs ``leading``) are written into those inputs by ``aten.copy_`` at the end, and no
    longer returned. The lowering keeps such trailing writes (its ``mutated_inputs``)."""
    graph = copy.deepcopy(gm.graph)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    values = list(output.args[0])
    if len(values) < len(leading) or max(leading, default=-1) >= len(placeholders):
        raise ValueError("the graph's outputs do not start with its mutated inputs' new values")
    with graph.inserting_before(output):
        for position, value in zip(leading, values):
            graph.call_function(torch.ops.aten.copy_.default, (placeholders[position], value))
    output.args = (tuple(values[len(leading):]),)
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _graph_name(gm: torch.fx.GraphModule, kind: str) -> str:
    frame = graph_facts.first_user_frame(gm)
    return f"{frame[2] if frame else 'graph'}.{kind}"


def backend(client: Any) -> Callable:
    """A dynamo backend that runs inference graphs in cgtreed through ``client``."""
    from torch._dynamo.backends.common import aot_autograd

    stats = getattr(client, "compile_stats", None)
    if stats is None:  # one record per client (client.status() reports it), shared by its backends
        stats = client.compile_stats = CompileStats()

    def inference_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        static, mutated, leading = _aot_metadata()
        device = _device_name(graph_facts.device_of(gm, example_inputs))
        name = _graph_name(gm, "inference")
        if device is None:
            log.info("cgtree: graph %s has no cpu/cuda tensors: it runs in this process", name)
            stats.ran_in_client(name, "no cpu/cuda tensors")
            return _boxed(gm.forward)
        written: list[int] = []
        if device.startswith("cuda") and leading:
            try:
                gm, written = mutations_into_graph(gm, leading), leading
            except ValueError as exc:  # keep the functional form: correct, only slower
                log.info("cgtree: graph %s keeps its input writes outside the graph: %s", name, exc)
        return DaemonGraph(client, gm, device, [i for i in static if i < len(example_inputs)], mutated, name,
                           written_in_graph=written, stats=stats)

    def training_compiler(kind: str) -> Callable:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
            log.warning("cgtree: %s is a training (%s) graph: cgtreed serves inference graphs, so it runs in "
                        "this process, eagerly (use torch.no_grad() for inference, or backend=\"cgtree\" in-process)",
                        _graph_name(gm, kind), kind)
            stats.ran_in_client(_graph_name(gm, kind), f"training ({kind}) graph: cgtreed serves inference graphs")
            return _boxed(gm.forward)

        return compile_graph

    def with_aot(keep_input_writes: bool) -> Callable:
        return aot_autograd(
            fw_compiler=training_compiler("forward"),
            bw_compiler=training_compiler("backward"),
            inference_compiler=inference_compiler,
            keep_inference_input_mutations=keep_input_writes,
        )

    # On CUDA the graph writes its inputs itself (they travel by IPC and are written in place):
    # AOT keeps the writes in the graph, so its runtime wrapper copies nothing back (~2.5 us of
    # Python per written input and step: a GPT's twelve KV caches). A CPU input is a copy in the
    # daemon, so there the graph stays functional and AOT writes the new values back here.
    writes_in_graph, functional = with_aot(True), with_aot(False)

    def cgtreed(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        device = graph_facts.device_of(gm, example_inputs)
        return (writes_in_graph if device is not None and device.type == "cuda" else functional)(gm, example_inputs)

    return cgtreed
