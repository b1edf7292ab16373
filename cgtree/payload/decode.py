"""Decoding (daemon side): graph bytes -> ``DecodedGraph``, built from allowed operators only.

``decode_graph`` checks the caller's namespaces and the payload's size; ``_GraphDecoder``
unpacks the document within msgpack limits, checks its header, weights and inputs, and builds a
fresh ``torch.fx`` graph node by node, each target resolved through ``allowlist``.

Invariants:
- Bad bytes fail with ``PayloadError`` only (any other exception while decoding is wrapped in
  one); sizes, nesting and the node count are capped before anything is allocated.
- What each value may alias is tracked coarsely (``_Reach``: any weight at all, which user
  inputs), linear in the payload size: a write that may reach a weight is refused, writes that
  may reach user inputs are reported in ``mutated_inputs``.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import msgpack
import torch
import torch.fx
from torch._ops import OpOverload

from cgtree.payload.allowlist import (
    UNDECLARED_WRITES, _bind_to_schema, _check_namespaces, _check_python_call, resolve_target,
)
from cgtree.payload.format import (
    _GRAPH_KEYS, _HASH_RE, _IDENTIFIER_RE, _NODE_KINDS, DEVICE_TYPES, FORMAT_NAME, FORMAT_VERSION,
    INT64_MAX, INT64_MIN, LAYOUTS, MAX_DEVICE_INDEX, MAX_DIMS, MAX_GRAPH_BYTES, MAX_MAP_LEN,
    MAX_NESTING, MAX_NODES, MAX_STR_LEN, MAX_TRACKED_INPUTS, MEMORY_FORMATS, DecodedGraph,
    InputSpec, PayloadError, WeightSpec, _lookup, _preview, _read_dtype, _read_input_shape,
    _read_shape,
)


# --------------------------------------------------------------------------------------------
# Decoding (daemon side)


def decode_graph(
    data: bytes,
    *,
    allowed_namespaces: Iterable[str] = (),
    device: torch.device | str | None = None,
    max_bytes: int = MAX_GRAPH_BYTES,
    max_nodes: int = MAX_NODES,
) -> DecodedGraph:
    """Rebuild a graph from ``graph_bytes``; ``PayloadError`` for anything invalid.

    allowed_namespaces: operator namespaces allowed besides ``aten`` and ``prims`` (config
        ``daemon.allowed_op_namespaces``). A bad entry is a ``ValueError`` (caller's mistake).
    device: when given, every device constant in the graph (``device=`` of factory ops, ``.to``)
        becomes this device, retargeting a graph lowered on another device index or type.
    max_bytes / max_nodes: refuse larger payloads before parsing them.
    """
    namespaces = _check_namespaces(allowed_namespaces)
    target_device = torch.device(device) if device is not None else None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"graph payload: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadError(f"graph payload: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return _GraphDecoder(namespaces, target_device, max_nodes).decode(data)
    except PayloadError:
        raise
    except Exception as exc:  # never leak another exception type for bad input
        raise PayloadError(f"graph payload: unexpected {type(exc).__name__} while decoding: {exc}") from exc


def _unpack(data: bytes, max_nodes: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_STR_LEN,  # bin is never valid in a graph; small ones get a clear error below
            max_array_len=max(max_nodes, MAX_DIMS),
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,  # no ext types at all (that includes msgpack timestamps)
        )
    except Exception as exc:  # ValueError, StackError, ExtraData, UnicodeDecodeError, ...
        raise PayloadError(f"graph payload: malformed msgpack ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class _Reach:
    """Which placeholders a value may share memory with: any weight at all, and which user
    inputs (``None``: possibly all of them). Kept this coarse so tracking stays linear in the
    payload size whatever a hostile graph does."""

    weight: bool
    inputs: frozenset[int] | None

    def union(self, other: "_Reach") -> "_Reach":
        if self.inputs is None or other.inputs is None:
            inputs = None
        else:
            inputs = self.inputs | other.inputs
            if len(inputs) > MAX_TRACKED_INPUTS:
                inputs = None
        return _Reach(self.weight or other.weight, inputs)


_NO_REACH = _Reach(False, frozenset())


class _GraphDecoder:
    """One decode: validates the document and builds the fx graph node by node."""

    def __init__(self, namespaces: frozenset[str], device: torch.device | None, max_nodes: int):
        self.namespaces = namespaces
        self.device = device
        self.max_nodes = max_nodes
        self.graph = torch.fx.Graph()
        self.env: list[torch.fx.Node] = []
        # what each node may share memory with (conservative; see _track_writes_and_views)
        self.reach: dict[torch.fx.Node, _Reach] = {}
        self.num_inputs = 0
        self.mutated_inputs: set[int] = set()

    def decode(self, data: bytes) -> DecodedGraph:
        graph_id = hashlib.sha256(data).hexdigest()
        document = _unpack(data, self.max_nodes)
        _check_header(document)
        weight_specs = _read_weights(document["weights"])
        input_specs = _read_inputs(document["inputs"])
        dynamic = document["dynamic"]
        if type(dynamic) is not bool:
            raise PayloadError(f"'dynamic' must be a bool, got {type(dynamic).__name__}")
        has_dynamic_dims = any(d is None for spec in input_specs for d in spec.shape)
        if dynamic != has_dynamic_dims:
            raise PayloadError(f"'dynamic' is {dynamic} but the input shapes say {has_dynamic_dims}")
        nodes, outputs = document["nodes"], document["outputs"]
        if type(nodes) is not list:
            raise PayloadError(f"'nodes' must be a list, got {type(nodes).__name__}")
        total = len(weight_specs) + len(input_specs) + len(nodes)
        if total > self.max_nodes:
            raise PayloadError(f"graph has {total} nodes, more than the limit of {self.max_nodes}")

        self._add_placeholders(len(weight_specs), len(input_specs))
        for i, node in enumerate(nodes):
            self._add_node(len(self.env), node)
        num_outputs = self._add_output(outputs)
        module = torch.fx.GraphModule(torch.nn.Module(), self.graph, class_name="CgtreeGraph")
        return DecodedGraph(
            graph_id=graph_id,
            module=module,
            weight_hashes=tuple(spec.hash for spec in weight_specs),
            weight_specs=weight_specs,
            input_specs=input_specs,
            num_outputs=num_outputs,
            dynamic=dynamic,
            mutated_inputs=tuple(sorted(self.mutated_inputs)),  # all of them if reach was lost
        )

    def _add_placeholders(self, num_weights: int, num_inputs: int) -> None:
        self.num_inputs = num_inputs
        for i in range(num_weights):
            node = self.graph.placeholder(f"w{i}")
            self.reach[node] = _Reach(True, frozenset())
            self.env.append(node)
        for i in range(num_inputs):
            node = self.graph.placeholder(f"x{i}")
            self.reach[node] = _Reach(False, frozenset({i}))
            self.env.append(node)

    def _add_node(self, index: int, node: Any) -> None:
        where = f"node {index}"
        if type(node) is not list or len(node) != 4:
            raise PayloadError(f"{where}: expected [kind, target, args, kwargs]")
        kind, target_name, args, kwargs = node
        if kind not in _NODE_KINDS:
            raise PayloadError(f"{where}: unknown node kind {_preview(kind)} (known: {', '.join(_NODE_KINDS)})")
        if type(target_name) is not str:
            raise PayloadError(f"{where}: target must be a string, got {type(target_name).__name__}")
        where = f"node {index} ({_preview(target_name)})"
        if type(args) is not list:
            raise PayloadError(f"{where}: args must be a list, got {type(args).__name__}")
        if type(kwargs) is not dict:
            raise PayloadError(f"{where}: kwargs must be a map, got {type(kwargs).__name__}")
        target = resolve_target(target_name, self.namespaces)
        call_args = tuple(self._decode_arg(a, f"{where} argument {i}", 0) for i, a in enumerate(args))
        call_kwargs = {}
        for key, value in kwargs.items():
            if type(key) is not str or not _IDENTIFIER_RE.match(key):
                raise PayloadError(f"{where}: keyword {_preview(key)} is not an identifier")
            call_kwargs[key] = self._decode_arg(value, f"{where} argument {key!r}", 0)

        if isinstance(target, OpOverload):
            bound = _bind_to_schema(target, call_args, call_kwargs, where)
            reach = self._track_writes(target, bound, where)
            fn = target
        else:
            _check_python_call(target, call_args, call_kwargs, where)
            fn = target.call
            reach = self.reach.get(call_args[0], _NO_REACH) if target.call is operator.getitem else _NO_REACH
        fx_node = self.graph.call_function(fn, call_args, call_kwargs)
        if reach != _NO_REACH:
            self.reach[fx_node] = reach
        self.env.append(fx_node)

    def _written_arguments(self, op: OpOverload, bound: Mapping[str, Any]) -> list[str]:
        """Names of the arguments ``op`` writes: ``Tensor(a!)`` ones, plus those of
        ``UNDECLARED_WRITES`` when the call turns that write on (or may: not a literal False)."""
        arguments = op._schema.arguments
        names = [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]
        undeclared = UNDECLARED_WRITES.get(op._schema.name)
        if undeclared is not None:
            tensor_positions, switch = undeclared
            if bound.get(arguments[switch].name) is not False:
                names.extend(arguments[i].name for i in tensor_positions)
        return names

    def _track_writes(self, op: OpOverload, bound: Mapping[str, Any], where: str) -> _Reach:
        """Reject writes to weights, record writes to inputs; return what the result may alias.

        Writes follow the schema (``Tensor(a!)`` arguments, including ``out=``). Aliasing is
        conservative on purpose: the result may share memory with everything any argument
        may. Alias annotations would be sharper, but some ops that return views carry none
        (``_unsafe_view``, ``unsafe_split``, ``lift``...); and lowered graphs are functional, so
        the only writes they hold are copies straight into user inputs, which stay exact.
        """
        result = _NO_REACH
        written = self._written_arguments(op, bound)
        for argument in op._schema.arguments:
            if argument.name not in bound:
                continue
            reach = self._reach_of(bound[argument.name])
            result = result.union(reach)
            if argument.name not in written:
                continue
            if reach.weight:
                raise PayloadError(
                    f"{where} writes argument {argument.name!r}, which is or may alias a weight; "
                    "weights are shared between graphs and read-only"
                )
            self.mutated_inputs.update(range(self.num_inputs) if reach.inputs is None else reach.inputs)
        return result

    def _reach_of(self, value: Any) -> _Reach:
        if isinstance(value, torch.fx.Node):
            return self.reach.get(value, _NO_REACH)
        if isinstance(value, (list, tuple)):
            found = _NO_REACH
            for item in value:
                found = found.union(self._reach_of(item))
            return found
        return _NO_REACH

    def _decode_arg(self, value: Any, where: str, depth: int) -> Any:
        if depth > MAX_NESTING:
            raise PayloadError(f"{where}: nested deeper than {MAX_NESTING}")
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                raise PayloadError(f"{where}: integer {value} does not fit in int64")
            return value
        if kind is float:
            return value
        if kind is list:
            return [self._decode_arg(v, where, depth + 1) for v in value]
        if kind is dict:
            return self._decode_tagged(value, where, depth)
        if kind is bytes:
            raise PayloadError(f"{where}: binary data ({len(value)} bytes) is not a valid argument")
        raise PayloadError(f"{where}: unsupported value of type {kind.__name__}")

    def _decode_tagged(self, value: dict, where: str, depth: int) -> Any:
        if len(value) != 1:
            raise PayloadError(f"{where}: a tagged value must have exactly one key, got {len(value)}")
        (tag, body), = value.items()
        if tag == "ref":
            if type(body) is not int or not 0 <= body < len(self.env):
                raise PayloadError(
                    f"{where}: reference {_preview(body)} is not an earlier node (0..{len(self.env) - 1})"
                )
            return self.env[body]
        if tag == "tuple":
            if type(body) is not list:
                raise PayloadError(f"{where}: tuple body must be a list")
            return tuple(self._decode_arg(v, where, depth + 1) for v in body)
        if tag == "dtype":
            return _read_dtype(body, where)
        if tag == "layout":
            return _lookup(LAYOUTS, body, "layout", where)
        if tag == "memory_format":
            return _lookup(MEMORY_FORMATS, body, "memory format", where)
        if tag == "device":
            return self._read_device(body, where)
        if tag == "complex":
            # finite parts only: fx writes complex constants with repr(), which has no inf/nan form
            if not (type(body) is list and len(body) == 2
                    and all(type(p) in (int, float) and math.isfinite(p) for p in body)):
                raise PayloadError(f"{where}: complex must be [real, imag] finite numbers")
            return complex(body[0], body[1])
        raise PayloadError(f"{where}: unknown tag {_preview(tag)}")

    def _read_device(self, body: Any, where: str) -> torch.device:
        if not (type(body) is list and len(body) == 2):
            raise PayloadError(f"{where}: device must be [type, index]")
        device_type, device_index = body
        if device_type not in DEVICE_TYPES:
            raise PayloadError(f"{where}: device type {_preview(device_type)} is not one of {sorted(DEVICE_TYPES)}")
        if device_index is not None and not (type(device_index) is int and 0 <= device_index < MAX_DEVICE_INDEX):
            raise PayloadError(f"{where}: device index {_preview(device_index)} is invalid")
        if self.device is not None:
            return self.device
        return torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)

    def _add_output(self, outputs: Any) -> int:
        if type(outputs) is not list:
            raise PayloadError(f"'outputs' must be a list of node indices, got {type(outputs).__name__}")
        values = []
        for i, ref in enumerate(outputs):
            if type(ref) is not int or not 0 <= ref < len(self.env):
                raise PayloadError(f"output {i}: {_preview(ref)} is not a node index (0..{len(self.env) - 1})")
            values.append(self.env[ref])
        self.graph.output(tuple(values))
        return len(values)


def _check_header(document: Any) -> None:
    if type(document) is not dict:
        raise PayloadError(f"graph payload: expected a map at the top, got {type(document).__name__}")
    if document.get("format") != FORMAT_NAME:
        raise PayloadError(f"graph payload: format is {_preview(document.get('format'))}, expected {FORMAT_NAME!r}")
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise PayloadError(
            f"graph payload: unsupported version {_preview(version)} (this build reads {FORMAT_VERSION})"
        )
    keys = set(document)
    missing = [k for k in _GRAPH_KEYS if k not in keys]
    unknown = sorted(str(k) for k in keys - set(_GRAPH_KEYS))
    if missing or unknown:
        raise PayloadError(f"graph payload: missing keys {missing}, unknown keys {unknown}")


def _read_weights(entries: Any) -> tuple[WeightSpec, ...]:
    if type(entries) is not list:
        raise PayloadError(f"'weights' must be a list, got {type(entries).__name__}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"weight {i}"
        if type(entry) is not list or len(entry) != 3:
            raise PayloadError(f"{where}: expected [hash, dtype, shape]")
        digest, dtype, shape = entry
        if type(digest) is not str or not _HASH_RE.match(digest):
            raise PayloadError(f"{where}: hash must be 64 lowercase hex digits, got {_preview(digest)}")
        _read_dtype(dtype, f"{where} dtype")
        specs.append(WeightSpec(digest, dtype, _read_shape(shape, f"{where} shape")))
    return tuple(specs)


def _read_inputs(entries: Any) -> tuple[InputSpec, ...]:
    if type(entries) is not list:
        raise PayloadError(f"'inputs' must be a list, got {type(entries).__name__}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"input {i}"
        if type(entry) is not list or len(entry) != 3:
            raise PayloadError(f"{where}: expected [shape, dtype, device type]")
        shape, dtype, device_type = entry
        _read_dtype(dtype, f"{where} dtype")
        if device_type not in DEVICE_TYPES:
            raise PayloadError(f"{where}: device type {_preview(device_type)} is not one of {sorted(DEVICE_TYPES)}")
        specs.append(InputSpec(_read_input_shape(shape, f"{where} shape"), dtype, device_type))
    return tuple(specs)
