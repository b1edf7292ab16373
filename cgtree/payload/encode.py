"""Encoding (client side): a flat ATen ``torch.fx`` graph and its weights -> ``EncodedGraph``.

``encode_graph`` walks the placeholders (weights first), the ``call_function`` nodes and the
output; ``input_spec_of`` gives the spec of a user input from an example tensor.

Invariants:
- The namespace allow-list is the daemon's to apply, not the encoder's; but what the format
  cannot carry is refused here already (other node kinds, tensor constants, symbolic values
  outside nodes, ints outside int64, dtypes and other values missing from the tables).
- The graph bytes are one msgpack document packed with fixed options, the graph id is their
  sha256, and each weight appears in them only as its content hash.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import msgpack
import torch
import torch.fx
from torch._ops import OpOverload, OpOverloadPacket

from cgtree.payload.format import (
    _NAME_OF_DTYPE, _NAME_OF_LAYOUT, _NAME_OF_MEMORY_FORMAT, DEVICE_TYPES, FORMAT_NAME,
    FORMAT_VERSION, INT64_MAX, INT64_MIN, MAX_NESTING, EncodedGraph, InputSpec, PayloadError,
    _read_dtype, _read_input_shape,
)
from cgtree.payload.symints import _NAME_OF_PY_FUNCTION
from cgtree.payload.weights import tensor_to_weight_blob


# --------------------------------------------------------------------------------------------
# Encoding (client side)


def encode_graph(
    graph_module: torch.fx.GraphModule,
    weights: Sequence[torch.Tensor],
    input_specs: Sequence[InputSpec] | None = None,
) -> EncodedGraph:
    """Encode a flat ATen graph whose forward takes ``(*weights, *user_inputs)``.

    The graph may hold only placeholders (weights first), ``call_function`` nodes on
    ``OpOverload`` targets or the ``operator`` table, and one output of a flat tuple of nodes.
    ``input_specs`` default to the user placeholders' ``meta["val"]`` (set by export/make_fx).
    The encoder does not apply the namespace allow-list: the daemon does.
    """
    placeholders, calls, output = _split_flat_graph(graph_module.graph)
    if len(weights) > len(placeholders):
        raise PayloadError(f"{len(weights)} weights but the graph has only {len(placeholders)} placeholders")
    blobs = [tensor_to_weight_blob(w, name=f"weight {i} ({placeholders[i].name})") for i, w in enumerate(weights)]
    hashes = tuple(blob.content_hash() for blob in blobs)
    user_placeholders = placeholders[len(weights):]
    specs = _resolve_input_specs(user_placeholders, input_specs)

    index: dict[torch.fx.Node, int] = {node: i for i, node in enumerate(placeholders)}
    nodes = []
    for node in calls:
        where = f"node {node.name!r}"
        target = _target_name(node.target, where)
        where = f"node {node.name!r} ({target})"
        args = [_encode_arg(a, index, f"{where} argument {i}", 0) for i, a in enumerate(node.args)]
        kwargs = {
            key: _encode_arg(node.kwargs[key], index, f"{where} argument {key!r}", 0)
            for key in sorted(node.kwargs)
        }
        nodes.append(["call_function", target, args, kwargs])
        index[node] = len(index)
    outputs = _encode_outputs(output, index)

    document = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights": [[h, b.dtype, list(b.shape)] for h, b in zip(hashes, blobs)],
        "inputs": [[list(s.shape), s.dtype, s.device] for s in specs],
        "dynamic": any(d is None for s in specs for d in s.shape),
        "nodes": nodes,
        "outputs": outputs,
    }
    graph_bytes = msgpack.packb(document, use_bin_type=True)
    return EncodedGraph(
        graph_id=hashlib.sha256(graph_bytes).hexdigest(),
        graph_bytes=graph_bytes,
        weights=dict(zip(hashes, blobs)),
        weight_hashes=hashes,
        input_specs=tuple(specs),
    )


def _split_flat_graph(graph: torch.fx.Graph):
    """Placeholders, call_function nodes, output node, in that order, or PayloadError."""
    placeholders: list[torch.fx.Node] = []
    calls: list[torch.fx.Node] = []
    output = None
    for node in graph.nodes:
        if output is not None:
            raise PayloadError(f"node {node.name!r} comes after the output node")
        if node.op == "placeholder":
            if calls:
                raise PayloadError(f"placeholder {node.name!r} comes after call nodes; placeholders must lead")
            placeholders.append(node)
        elif node.op == "call_function":
            calls.append(node)
        elif node.op == "output":
            output = node
        elif node.op == "get_attr":
            raise PayloadError(
                f"node {node.name!r} reads attribute {node.target!r}: lift constants into weights "
                "(cgtree.client.lowering.lower does)"
            )
        else:
            raise PayloadError(f"node {node.name!r}: {node.op} nodes are not supported; lower the graph to ATen first")
    if output is None:
        raise PayloadError("the graph has no output node")
    return placeholders, calls, output


def _resolve_input_specs(placeholders: Sequence[torch.fx.Node], given: Sequence[InputSpec] | None):
    if given is not None:
        specs = tuple(given)
        if len(specs) != len(placeholders):
            raise PayloadError(f"{len(specs)} input specs for {len(placeholders)} user inputs")
        for spec in specs:
            _check_input_spec(spec)
        return specs
    return tuple(_input_spec_from_meta(node) for node in placeholders)


def _check_input_spec(spec: InputSpec) -> None:
    if not isinstance(spec, InputSpec):
        raise PayloadError(f"input spec: expected InputSpec, got {type(spec).__name__}")
    _read_dtype(spec.dtype, "input spec dtype")
    if spec.device not in DEVICE_TYPES:
        raise PayloadError(f"input spec device: {spec.device!r} is not one of {sorted(DEVICE_TYPES)}")
    _read_input_shape(list(spec.shape), "input spec shape")


def _input_spec_from_meta(node: torch.fx.Node) -> InputSpec:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise PayloadError(
            f"user input {node.name!r} has no example tensor in meta['val']; pass input_specs"
        )
    return input_spec_of(value, name=f"user input {node.name!r}")


def input_spec_of(tensor: torch.Tensor, *, name: str = "input") -> InputSpec:
    """The spec of an example tensor (real, fake or with symbolic sizes -> ``None`` dims)."""
    dtype = _NAME_OF_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise PayloadError(f"{name}: unsupported dtype {tensor.dtype}")
    shape = tuple(d if type(d) is int else None for d in tensor.shape)  # SymInt -> dynamic dim
    return InputSpec(shape, dtype, tensor.device.type)


def _target_name(target: Any, where: str) -> str:
    if isinstance(target, OpOverload):
        schema = target._schema
        return f"{schema.name}.{schema.overload_name or 'default'}"
    try:
        name = _NAME_OF_PY_FUNCTION.get(target)
    except TypeError:  # unhashable target
        name = None
    if name is not None:
        return f"operator::{name}"
    if isinstance(target, OpOverloadPacket):
        raise PayloadError(f"{where}: target {target} is an overload packet; name an overload (e.g. .default)")
    label = getattr(target, "__qualname__", None) or type(target).__name__
    raise PayloadError(f"{where}: unsupported call target {getattr(target, '__module__', '?')}.{label}")


def _encode_arg(value: Any, index: Mapping[torch.fx.Node, int], where: str, depth: int) -> Any:
    if depth > MAX_NESTING:
        raise PayloadError(f"{where}: nested deeper than {MAX_NESTING}")
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, torch.fx.Node):
        if value not in index:
            raise PayloadError(f"{where}: refers to node {value.name!r}, which is not an earlier node")
        return {"ref": index[value]}
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise PayloadError(f"{where}: integer {value} does not fit in int64")
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, list):
        return [_encode_arg(v, index, where, depth + 1) for v in value]
    if isinstance(value, tuple):  # includes torch.Size
        return {"tuple": [_encode_arg(v, index, where, depth + 1) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": _named(_NAME_OF_DTYPE, value, "dtype", where)}
    if isinstance(value, torch.device):
        return {"device": [value.type, value.index]}
    if isinstance(value, torch.layout):
        return {"layout": _named(_NAME_OF_LAYOUT, value, "layout", where)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": _named(_NAME_OF_MEMORY_FORMAT, value, "memory format", where)}
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise PayloadError(f"{where}: a symbolic value outside a node ({value}); trace sizes as nodes")
    if isinstance(value, torch.Tensor):
        raise PayloadError(f"{where}: a tensor constant inside the graph; lift it into a weight")
    raise PayloadError(f"{where}: unsupported argument of type {type(value).__name__}")


def _named(table: Mapping[Any, str], value: Any, what: str, where: str) -> str:
    name = table.get(value)
    if name is None:
        raise PayloadError(f"{where}: unsupported {what} {value}")
    return name


def _encode_outputs(output: torch.fx.Node, index: Mapping[torch.fx.Node, int]) -> list[int]:
    values = output.args[0] if output.args else None
    if isinstance(values, torch.fx.Node):
        values = (values,)
    if not isinstance(values, (tuple, list)):
        raise PayloadError(f"the output must be a flat tuple of nodes, got {type(values).__name__}")
    refs = []
    for i, value in enumerate(values):
        if not isinstance(value, torch.fx.Node) or value not in index:
            raise PayloadError(f"output {i} must be a node of the graph, got {value!r}")
        refs.append(index[value])
    return refs
