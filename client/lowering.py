"""Client-side lowering: user graphs -> the flat ATen GraphModule that ``cgtree.payload`` encodes.

``lower(graph, example_inputs)`` accepts an ``nn.Module``, a ``torch.export.ExportedProgram`` or
a ``torch.fx.GraphModule`` / plain callable. ``encode(lowered)`` turns the result into an
``EncodedGraph``. Two routes, recorded in ``LoweredGraph.route``:

- ``"make_fx"``: ``make_fx`` over ``functionalize`` with fake tensors, the parameters and
  buffers passed in through ``torch.func.functional_call``, and the decomposition table of
  ``ExportedProgram.run_decompositions()``. Used for GraphModules and callables, and by default
  for plain ``nn.Module``s: it lowers the same graphs as export at a fraction of the cost
  (measured in a fresh CPU process: ~1.3 s against ~2.1 s for export, the rest of either being
  imports that torch's tracing pulls in, dynamo and sympy; ~50-110 ms against 180-450 ms for a
  second model in the same process). Both benchmark MLPs, eval BatchNorm, convolutions, norms
  and attention give byte-identical payloads either way; other modules may differ in operator
  choice (``mm`` where export has ``bmm`` for a 3-D ``Linear``, dropout as ``bernoulli``),
  never in what they compute. Two gaps of plain make_fx are closed: ``native_batch_norm``
  (whose schema hides its running-statistics write) is decomposed the way export does it, and
  a graph in which decompositions left in-place operators (they run below ``functionalize``:
  GRU cells, InstanceNorm statistics) is traced once more, functionalized.
- ``"export"``: ``torch.export.export`` + ``run_decompositions()``. Used for
  ``ExportedProgram``s, for ``nn.Module``s with ``dynamic_shapes`` (export's ``Dim``
  constraints), with ``route="export"``, and as the fallback when make_fx cannot trace a
  module (the make_fx error is logged, then export gets its turn).

Invariants of a ``LoweredGraph``:
- ``graph_module(*weights, *user_inputs)`` returns a flat tuple of tensors. Weights are the
  parameters, buffers and lifted tensor constants (plus example inputs named in
  ``weight_input_indices``), in placeholder order; user inputs keep their order.
- The graph holds only placeholders, ATen/prims operator calls (or ``operator`` functions for
  sizes and multi-output ops) and one output. It is functional except trailing
  ``aten.copy_.default(user_input, new_value)`` nodes for user inputs the model mutates in place
  (``mutated_inputs``).
- Weights are never written. Programs that mutate a buffer or parameter (BatchNorm running
  statistics in training mode, counters) are rejected with ``LoweringError``: the daemon shares
  content-hashed weights between clients, so a write would leak across them.
  Both routes refuse the same programs: make_fx sees the write as an in-graph ``copy_`` into a
  weight placeholder (or a ``native_batch_norm`` in training mode, ``_UNDECLARED_WRITES``),
  export as a buffer/parameter mutation in its signature.
- Weights are lifted the same way on both routes: parameters, then buffers (named as in
  ``named_parameters()`` / ``named_buffers()``), then tensor constants (a plain tensor attribute
  of the module keeps its attribute path as its name). Tied parameters appear once on the
  make_fx route, under every name on the export route; the daemon stores either once (weights
  are content-hashed).
- The module's train/eval mode is left as given; call ``.eval()`` first for inference graphs.
- Lowering runs on the client, once per graph (``cgtree.client.graph_cache`` keeps lowered
  graphs across processes, opt-in). make_fx traces with fake tensors unless asked for real
  ones: nothing of the model runs. Lower on the device type the daemon will run (some
  decompositions are device specific, e.g. CPU-only attention kernels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._ops import OpOverload
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from cgtree.payload import UNDECLARED_WRITES, EncodedGraph, InputSpec, PayloadError, encode_graph, input_spec_of

__all__ = ["ROUTES", "LoweredGraph", "LoweringError", "encode", "lower"]

log = logging.getLogger("cgtree.client")

ROUTES = ("make_fx", "export")
_WEIGHT_INPUT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_TRACING_MODES = ("real", "fake", "symbolic")


class LoweringError(ValueError):
    """A graph cannot be lowered to a cgtree payload; the message says why and what to do."""


class _TraceFailed(LoweringError):
    """make_fx raised while tracing, or left a graph that is not functional (as opposed to a
    refusal of what it traced): the nn.Module route then falls back to export."""


@dataclass(frozen=True)
class LoweredGraph:
    """A flat ATen graph plus its weights; see the module docstring for the invariants.

    graph_module: forward(*weights, *user_inputs) -> tuple of tensors.
    weights: tensors for the leading placeholders (the model's own, not copies).
    num_user_inputs: how many inputs follow the weights.
    input_specs: shape (None for dynamic dims), dtype, device type per user input.
    weight_names: where each weight came from ("fc1.weight", "input 2", "constant c"), for messages.
    mutated_inputs: indices among user inputs that the graph writes in place.
    route: how it was lowered, "make_fx" or "export" (see the module docstring).
    """

    graph_module: torch.fx.GraphModule
    weights: list[torch.Tensor]
    num_user_inputs: int
    input_specs: tuple[InputSpec, ...]
    weight_names: tuple[str, ...]
    mutated_inputs: tuple[int, ...]
    route: str = "make_fx"

    def __call__(self, *user_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the lowered graph eagerly with its own weights (for checks and tests)."""
        return self.graph_module(*self.weights, *user_inputs)


def lower(
    graph: torch.nn.Module | torch.export.ExportedProgram | Callable[..., Any],
    example_inputs: Sequence[torch.Tensor] = (),
    *,
    dynamic_shapes: Any = None,
    tracing_mode: str | None = None,
    weight_input_indices: Sequence[int] = (),
    route: str | None = None,
) -> LoweredGraph:
    """Lower a model to a flat ATen graph taking ``(*weights, *user_inputs)``.

    graph: an ``nn.Module``, an ``ExportedProgram`` (its own example inputs are used;
        ``example_inputs`` is ignored), or a ``GraphModule`` / callable (traced with make_fx).
    example_inputs: positional tensors the model is called with.
    dynamic_shapes: passed to ``torch.export.export`` for ``nn.Module``s (e.g.
        ``{"x": {0: Dim("batch")}}``), which then take the export route; the graph is
        ``dynamic`` and the daemon's policy ``skip_dynamic_graphs`` applies to it.
    tracing_mode: make_fx's mode for GraphModules/callables: "fake" (the default: nothing runs,
        no side effects), "symbolic" (dynamic sizes), or "real" (runs the model once on copies
        of the example inputs; a buffer the model writes is written, then the graph refused).
    weight_input_indices: for GraphModules/callables, example inputs that are really weights
        (e.g. parameters dynamo lifted to graph inputs): they become content-hashed weights
        instead of user inputs.
    route: for plain ``nn.Module``s, ``None`` (make_fx, export when make_fx cannot trace the
        module or ``dynamic_shapes`` is given), ``"make_fx"`` (no fallback) or ``"export"``.
        Other graph kinds have one route each; naming another is an error.
    """
    if route is not None and route not in ROUTES:
        raise LoweringError(f"route must be one of {ROUTES} or None, got {route!r}")
    if isinstance(graph, torch.export.ExportedProgram):
        _refuse_trace_options(tracing_mode, weight_input_indices, "an ExportedProgram")
        _refuse_route(route, "export", "an ExportedProgram")
        return _lower_exported_program(graph)
    if isinstance(graph, torch.fx.GraphModule) or (callable(graph) and not isinstance(graph, torch.nn.Module)):
        if dynamic_shapes is not None:
            raise LoweringError("dynamic_shapes applies to nn.Modules (torch.export); use tracing_mode='symbolic'")
        _refuse_route(route, "make_fx", "a GraphModule or callable")
        return _lower_traced(graph, example_inputs, tracing_mode or "fake", weight_input_indices)
    if isinstance(graph, torch.nn.Module):
        _refuse_trace_options(tracing_mode, weight_input_indices, "an nn.Module")
        if route == "make_fx" and dynamic_shapes is not None:
            raise LoweringError("dynamic_shapes needs the export route (torch.export's Dim constraints)")
        if route == "export" or dynamic_shapes is not None:
            return _lower_exported_program(_export(graph, example_inputs, dynamic_shapes))
        try:
            return _lower_traced(graph, example_inputs, "fake", (), require_functional=True)
        except _TraceFailed as exc:
            if route == "make_fx":
                raise
            log.info("make_fx could not trace %s (%s); lowering it with torch.export", type(graph).__name__, exc)
            return _lower_exported_program(_export(graph, example_inputs, dynamic_shapes))
    raise LoweringError(
        f"cannot lower a {type(graph).__name__}: pass an nn.Module, GraphModule, ExportedProgram or callable"
    )


def encode(lowered: LoweredGraph) -> EncodedGraph:
    """Encode a lowered graph: graph bytes, weight blobs by content hash, graph id."""
    return encode_graph(lowered.graph_module, lowered.weights, lowered.input_specs)


def _refuse_trace_options(tracing_mode: str | None, weight_input_indices: Sequence[int], what: str) -> None:
    if tracing_mode is not None or tuple(weight_input_indices):
        raise LoweringError(f"tracing_mode and weight_input_indices apply to GraphModules/callables, not {what}")


def _refuse_route(route: str | None, only: str, what: str) -> None:
    if route is not None and route != only:
        raise LoweringError(f"{what} is lowered with {only}; route={route!r} does not apply")


# --------------------------------------------------------------------------------------------
# torch.export path (nn.Module, ExportedProgram)


def _export(module: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes: Any):
    try:
        return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise LoweringError(f"torch.export failed for {type(module).__name__}: {exc}") from exc


def _lower_exported_program(program: torch.export.ExportedProgram) -> LoweredGraph:
    """Decompose to ATen, then turn export's signature into the flat (*weights, *inputs) form."""
    program = program.run_decompositions(_export_decompositions())
    signature = program.graph_signature
    old_graph = program.graph_module.graph
    old_placeholders = [n for n in old_graph.nodes if n.op == "placeholder"]
    if len(old_placeholders) != len(signature.input_specs):
        raise LoweringError("exported graph placeholders do not match its signature")

    weights: list[torch.Tensor] = []
    weight_names: list[str] = []
    user_names: list[str] = []
    for node, spec in zip(old_placeholders, signature.input_specs):
        if spec.kind in _WEIGHT_INPUT_KINDS:
            if user_names:  # export orders params, buffers, constants, then user inputs
                raise LoweringError(f"weight {spec.target!r} follows a user input in the exported graph")
            weights.append(_exported_weight(program, spec))
            weight_names.append(str(spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            if not isinstance(spec.arg, TensorArgument):
                raise LoweringError(
                    f"user input {node.name!r} is not a tensor ({spec.arg}); only tensor inputs are supported"
                )
            user_names.append(node.name)
        else:
            raise LoweringError(
                f"input {node.name!r} of kind {spec.kind.name} is not supported (no custom objects or effect tokens)"
            )

    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    old_outputs = graph.graph_copy(old_graph, val_map)
    if not isinstance(old_outputs, (tuple, list)) or len(old_outputs) != len(signature.output_specs):
        raise LoweringError("exported graph outputs do not match its signature")
    placeholder_by_name = {node.name: val_map[node] for node in old_placeholders}

    user_outputs = []
    input_writes = []
    for i, (value, spec) in enumerate(zip(old_outputs, signature.output_specs)):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(_tensor_output(value, i))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            input_writes.append((placeholder_by_name[spec.target], value))
        elif spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION):
            raise LoweringError(
                f"the program mutates {spec.target!r} in place (e.g. BatchNorm running statistics in "
                "training mode): weights are shared and read-only in cgtree; call .eval() or keep the "
                "state outside the graph"
            )
        else:
            raise LoweringError(f"output {i} of kind {spec.kind.name} is not supported")
    # Input mutations become explicit in-graph copies, so the daemon's module has the same effect.
    for placeholder, new_value in input_writes:
        graph.call_function(torch.ops.aten.copy_.default, (placeholder, new_value))
    graph.output(tuple(user_outputs))
    return _finish(graph, weights, weight_names, "export")


def _exported_weight(program: torch.export.ExportedProgram, spec: Any) -> torch.Tensor:
    # Persistent buffers and parameters live in state_dict; non-persistent buffers and lifted
    # tensor constants live in constants.
    if spec.target in program.state_dict:
        value = program.state_dict[spec.target]
    elif spec.target in program.constants:
        value = program.constants[spec.target]
    else:
        raise LoweringError(f"weight {spec.target!r} is missing from the exported program")
    if not isinstance(value, torch.Tensor):
        raise LoweringError(f"constant {spec.target!r} is a {type(value).__name__}, not a tensor")
    return value


def _tensor_output(value: Any, position: int) -> torch.fx.Node:
    if not (isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)):
        raise LoweringError(f"output {position} is not a tensor ({value!r}); graphs must return tensors only")
    return value


# --------------------------------------------------------------------------------------------
# make_fx path (GraphModule, callable)


def _lower_traced(
    fn: Callable[..., Any], example_inputs: Sequence[Any], tracing_mode: str, weight_input_indices: Sequence[int],
    *, require_functional: bool = False,
) -> LoweredGraph:
    """Trace ``fn`` functionalized to ATen with weights as leading inputs, then lift constants.

    require_functional: the nn.Module route. Decompositions run below ``functionalize`` (inside
    make_fx's proxy mode), so an in-place operator inside one is traced as it is (GRU cells'
    ``add_``, InstanceNorm's running-statistics ``copy_`` through an ``alias``). Such a graph is
    traced once more, functionalized (writes to weights then show as ``copy_`` into their
    placeholders and are refused); a graph whose writes are still not only the trailing ``copy_``
    into user inputs raises ``_TraceFailed``, and ``lower`` hands the module to export.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if tracing_mode not in _TRACING_MODES:
        raise LoweringError(f"tracing_mode must be one of {_TRACING_MODES}, got {tracing_mode!r}")
    example_inputs = list(example_inputs)
    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise LoweringError(f"example input {i} is a {type(value).__name__}; only tensor inputs are supported")
    weight_positions = sorted(set(weight_input_indices))
    if any(not 0 <= i < len(example_inputs) for i in weight_positions):
        raise LoweringError(
            f"weight_input_indices {list(weight_input_indices)} out of range for {len(example_inputs)} inputs"
        )
    user_positions = [i for i in range(len(example_inputs)) if i not in weight_positions]

    state = _module_state(fn)
    weights = [t for _, t in state] + [example_inputs[i] for i in weight_positions]
    weight_names = [name for name, _ in state] + [f"input {i}" for i in weight_positions]
    user_inputs = [example_inputs[i] for i in user_positions]
    if tracing_mode == "real":  # the model really runs: keep its input mutations off the caller's tensors
        user_inputs = [t.clone() for t in user_inputs]
    flat = _flat_function(fn, [name for name, _ in state], weight_positions, user_positions)

    table = _decomposition_table()

    def trace(function: Callable[..., Any]) -> torch.fx.GraphModule:
        return make_fx(
            torch.func.functionalize(function, remove="mutations"),
            decomposition_table=table,
            tracing_mode=tracing_mode,
            _allow_non_fake_inputs=True,  # tensors the function closes over become constants
        )(*weights, *user_inputs)

    def trace_all() -> torch.fx.GraphModule:
        traced = trace(flat)
        if require_functional and _in_place_nodes(traced.graph, len(weights)):
            # Once more over the ATen graph: functionalize now sees the decompositions' writes.
            traced = trace(traced)
        return traced

    try:
        try:
            traced = trace_all()
        except Exception as exc:  # noqa: BLE001 - retried once, below, for a stride-dependent view
            if not _is_view_stride_error(exc):
                raise
            # A decomposition left a tensor laid out otherwise than the kernel the graph was
            # written against: views then become reshapes (a copy where the layout needs one).
            log.info("lowering: a view depends on a kernel's output strides (%s); tracing views as reshapes",
                     str(exc).splitlines()[0][:200])
            table = {**table, torch.ops.aten.view.default: _view_any_layout}
            traced = trace_all()
    except LoweringError:
        raise
    except Exception as exc:
        raise _TraceFailed(f"make_fx failed: {exc}") from exc

    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    outputs = graph.graph_copy(traced.graph, val_map)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    user_outputs = [_tensor_output(value, i) for i, value in enumerate(outputs)]
    graph.output(tuple(user_outputs))
    # functionalize leaves unused `alias` nodes behind; in-place nodes (copy_) are impure and stay.
    graph.eliminate_dead_code()
    _lift_constants(graph, traced, len(weights), weights, weight_names, _tensor_attribute_names(fn))
    lowered = _finish(graph, weights, weight_names, "make_fx")  # refuses direct weight writes first
    if require_functional:
        _check_functional(lowered.graph_module.graph, len(weights))
    return lowered


def _check_functional(graph: torch.fx.Graph, num_weights: int) -> None:
    """Raise ``_TraceFailed`` unless every write in ``graph`` is ``copy_`` straight into a user
    input placeholder (what ``functionalize`` leaves for an input the model mutates)."""
    offending = _in_place_nodes(graph, num_weights)
    if offending:
        raise _TraceFailed(
            f"make_fx left in-place operators in the graph ({', '.join(sorted({str(n.target) for n in offending}))}), "
            "which only export's functionalization removes"
        )


def _in_place_nodes(graph: torch.fx.Graph, num_weights: int) -> list[torch.fx.Node]:
    """Nodes that write a tensor (schema ``Tensor(a!)`` or ``_UNDECLARED_WRITES``), except
    ``copy_`` straight into a user input placeholder."""
    user_inputs = set([n for n in graph.nodes if n.op == "placeholder"][num_weights:])
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, OpOverload):
            continue
        schema = node.target._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if not (writes or schema.name in _UNDECLARED_WRITES):
            continue
        if node.target is torch.ops.aten.copy_.default and node.args and node.args[0] in user_inputs:
            continue
        found.append(node)
    return found


def _module_state(fn: Any) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(fn, torch.nn.Module):
        return []
    return list(fn.named_parameters()) + list(fn.named_buffers())


def _tensor_attribute_names(fn: Any) -> dict[int, str]:
    """id -> attribute path of plain tensor attributes (not parameters or buffers) of a module
    tree: the names export gives the constants it lifts."""
    if not isinstance(fn, torch.nn.Module) or isinstance(fn, torch.fx.GraphModule):
        return {}
    names: dict[int, str] = {}
    for prefix, module in fn.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                names.setdefault(id(value), f"{prefix}.{attr}" if prefix else attr)
    return names


def _flat_function(fn: Any, state_names: list[str], weight_positions: list[int], user_positions: list[int]):
    """fn as ``flat(*state, *weight_inputs, *user_inputs) -> tuple of leaves``."""
    num_inputs = len(weight_positions) + len(user_positions)

    def flat(*args: Any) -> tuple[Any, ...]:
        state = dict(zip(state_names, args[: len(state_names)]))
        rest = args[len(state_names):]
        call_args: list[Any] = [None] * num_inputs
        for position, value in zip(weight_positions + user_positions, rest):
            call_args[position] = value
        if isinstance(fn, torch.nn.Module):
            result = torch.func.functional_call(fn, state, tuple(call_args))
        else:
            result = fn(*call_args)
        return tuple(pytree.tree_leaves(result))

    return flat


_DECOMPOSITIONS: dict | None = None


def _decomposition_table() -> dict:
    """The table ``ExportedProgram.run_decompositions()`` uses, so both paths agree (built once
    per process: ~50-150 ms; make_fx only reads it).

    Plus one entry export gets elsewhere: ``native_batch_norm``, whose schema hides that it
    writes the running statistics in training mode, is rewritten the way export's
    pre-dispatch trace does it (``_native_batch_norm_legit`` with its ``Tensor(a!)`` running
    statistics in training mode, ``_native_batch_norm_legit_no_training`` otherwise), so the
    write shows and the eval graph is export's."""
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        default = getattr(torch.export, "default_decompositions", None)
        if default is not None:
            table = dict(default().items())
        else:
            from torch._decomp import core_aten_decompositions

            table = dict(core_aten_decompositions())
        from torch._decomp import decompositions

        batch_norm = getattr(decompositions, "native_batch_norm_decomposition", None)
        if batch_norm is not None:
            table.setdefault(torch.ops.aten.native_batch_norm.default, batch_norm)
        _DECOMPOSITIONS = _without_fused_attention(table)
    return _DECOMPOSITIONS


def _export_decompositions() -> Any:
    """export's default table without the fused attention kernels' decompositions (see
    ``_is_fused_attention``)."""
    return _without_fused_attention(torch.export.default_decompositions())


def _without_fused_attention(table: Any) -> Any:
    """``table`` (a dict or export's decomposition table) less the fused attention kernels."""
    for op in [op for op in list(table.keys()) if _is_fused_attention(op)]:
        table.pop(op)
    return table


def _is_view_stride_error(exc: BaseException) -> bool:
    while exc is not None:
        if "Cannot view a tensor" in str(exc) or "view size is not compatible" in str(exc):
            return True
        exc = exc.__cause__
    return False


def _view_any_layout(tensor: torch.Tensor, size: Sequence[Any]) -> torch.Tensor:
    """``aten.view`` that also accepts a layout it cannot view: a contiguous copy is viewed
    then (``reshape``'s rule). Only for a retrace whose first attempt failed on a view."""
    if not tensor.is_contiguous():
        tensor = torch.ops.aten.clone.default(tensor, memory_format=torch.contiguous_format)
    return torch.ops.aten._unsafe_view.default(tensor, size)


def _is_fused_attention(op: Any) -> bool:
    """Fused attention kernels stay fused in lowered graphs. Their decompositions lay the output
    out differently from the kernels (the CPU flash kernel returns [B, H, T, D] stored as
    [B, T, H, D], its math decomposition a contiguous one), so a graph traced from real
    strides (an AOT graph, a model that views the transposed attention output) cannot be
    retraced through them; and the daemon runs the kernel itself, as eager would."""
    return "scaled_dot_product" in str(op)


def _lift_constants(
    graph: torch.fx.Graph, owner: torch.nn.Module, num_weights: int, weights: list, weight_names: list,
    attribute_names: dict[int, str],
) -> None:
    """Turn get_attr tensor constants into weight placeholders right after the existing weights."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[num_weights] if len(placeholders) > num_weights else next(
        n for n in graph.nodes if n.op != "placeholder"
    )
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = _fetch_attr(owner, node.target)
        if not isinstance(value, torch.Tensor):
            raise LoweringError(
                f"the graph uses attribute {node.target!r} ({type(value).__name__}): higher-order ops "
                "and submodules are not supported"
            )
        with graph.inserting_before(anchor):
            placeholder = graph.placeholder(f"lifted_{node.target}")
        placeholder.meta["val"] = value
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        weights.append(value)
        weight_names.append(attribute_names.get(id(value), f"constant {node.target}"))


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


# --------------------------------------------------------------------------------------------
# Common tail


def _finish(graph: torch.fx.Graph, weights: list, weight_names: list, route: str) -> LoweredGraph:
    """Check weights stay read-only, collect mutated inputs, wrap the graph in a module."""
    if any(n.op == "get_attr" for n in graph.nodes):
        raise LoweringError(
            "the graph reads submodules or attributes (higher-order ops such as torch.cond are not supported)"
        )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    num_weights = len(weights)
    _fold_copies_into_writes(graph)
    written, undeclared = _written_placeholders(graph, placeholders)
    written_weights = [weight_names[i] for i in sorted(written | undeclared) if i < num_weights]
    if written_weights:
        raise LoweringError(
            f"the program writes {', '.join(map(repr, written_weights))} in place (e.g. BatchNorm "
            "running statistics in training mode): weights are shared and read-only in cgtree; call "
            ".eval() or keep mutable state outside the graph"
        )
    if undeclared:
        raise LoweringError(
            f"the program writes user input(s) {sorted(i - num_weights for i in undeclared)} through an operator "
            "whose schema does not declare the write (batch norm running statistics in training mode); "
            "the daemon could not see it: pass the statistics as buffers in eval mode"
        )
    mutated = {i - num_weights for i in written}
    graph.lint()
    module = torch.fx.GraphModule(torch.nn.Module(), graph, class_name="LoweredGraph")
    user_placeholders = placeholders[num_weights:]
    try:
        input_specs = tuple(_input_spec(node) for node in user_placeholders)
    except PayloadError as exc:
        raise LoweringError(str(exc)) from None
    return LoweredGraph(
        graph_module=module,
        weights=list(weights),
        num_user_inputs=len(user_placeholders),
        input_specs=input_specs,
        weight_names=tuple(weight_names),
        mutated_inputs=tuple(sorted(mutated)),
        route=route,
    )


def _fold_copies_into_writes(graph: torch.fx.Graph) -> int:
    """``copy_(input, copy(input, value))`` -> ``copy_(input, value)`` where the functional
    ``copy`` feeds nothing else; returns how many were folded.

    Functionalization writes an input back as a functional ``copy`` of the new value followed
    by the trailing ``copy_``. Both forms write the same values (``copy_`` broadcasts and
    converts itself), but the extra full-size copy hides the plain ``copy_(input,
    index_put(input, ...))`` shape that inductor turns into an in-place ``index_put_``: with it,
    every KV-cache write of a decoder step copied each whole cache twice more."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.copy_.default or len(node.args) < 2:
            continue
        target, source = node.args[0], node.args[1]
        if (
            isinstance(target, torch.fx.Node) and target.op == "placeholder"
            and isinstance(source, torch.fx.Node) and source.target is torch.ops.aten.copy.default
            and source.args and source.args[0] is target and len(source.users) == 1 and not source.kwargs
        ):
            node.args = (target, source.args[1], *node.args[2:])
            graph.erase_node(source)
            folded += 1
    return folded


# Writes an operator's schema does not declare (batch norm's running statistics in training
# mode): the payload codec's table, which the daemon's decoder enforces too.
_UNDECLARED_WRITES = UNDECLARED_WRITES


def _written_placeholders(graph: torch.fx.Graph, placeholders: list[torch.fx.Node]) -> tuple[set[int], set[int]]:
    """Positions of placeholders passed directly to a ``Tensor(a!)`` argument (functional graphs:
    copy_ only), and of those passed to an argument of ``_UNDECLARED_WRITES`` that the call
    writes."""
    position = {node: i for i, node in enumerate(placeholders)}
    written: set[int] = set()
    undeclared_writes: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, OpOverload):
            continue
        arguments = node.target._schema.arguments
        bound = dict(zip((a.name for a in arguments if not a.kwarg_only), node.args))
        bound.update(node.kwargs)
        for argument in arguments:
            value = bound.get(argument.name)
            writes = argument.alias_info is not None and argument.alias_info.is_write
            if writes and isinstance(value, torch.fx.Node) and value in position:
                written.add(position[value])
        undeclared = _UNDECLARED_WRITES.get(node.target._schema.name)
        if undeclared is not None:
            tensor_positions, switch = undeclared
            names = [a.name for a in arguments]
            if bound.get(names[switch]) is not False:  # True, or anything not known to be False
                for i in tensor_positions:
                    value = bound.get(names[i])
                    if isinstance(value, torch.fx.Node) and value in position:
                        undeclared_writes.add(position[value])
    return written, undeclared_writes


def _input_spec(node: torch.fx.Node) -> InputSpec:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise LoweringError(f"user input {node.name!r} has no example value after tracing")
    return input_spec_of(value, name=f"user input {node.name!r}")
