"""The operator allow-list: which operators a payload may name, and what it may pass them.

``resolve_target`` maps a node's target name to an ``OpOverload`` of an allowed namespace
(``aten``, ``prims`` and the extras ``_check_namespaces`` accepts from the daemon's config) or to
an entry of the ``operator`` table (``symints``). ``_bind_to_schema`` and ``_check_python_call``
then check a call's arguments against the operator's schema or the entry's arity.

Invariants:
- The namespace is checked before ``torch.ops`` is touched; the walk takes one
  identifier-checked attribute at a time and verifies the type of each step.
- Refused even in an allowed namespace: ``DENIED_OPERATORS``, operators whose schema uses a type
  the codec cannot carry, operators without any tensor (bar ``TENSORLESS_OPERATORS_ALLOWED``).
- ``UNDECLARED_WRITES`` lists the writes schemas leave out; the decoder and the client's lowering
  treat them like declared ones.
- ``_RESOLVED`` caches only operators that passed every check.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch._ops import OpOverload, OpOverloadPacket

from cgtree.payload.format import _IDENTIFIER_RE, PayloadError, _preview
from cgtree.payload.symints import OPERATOR_FUNCTIONS, _PyFunction


BUILTIN_NAMESPACES = frozenset({"aten", "prims"})


# Operators whose schema does not declare a write they make: name -> (positions of the written
# tensor arguments, position of the bool argument that turns the write on). native_batch_norm
# and its backend variants update the running statistics in training mode. The decoder treats
# these like ``Tensor(a!)`` arguments (a payload cannot write a shared weight through them), and
# the client's lowering refuses them on weights before anything is sent.
UNDECLARED_WRITES: dict[str, tuple[tuple[int, ...], int]] = {
    "aten::native_batch_norm": ((3, 4), 5),
    "aten::cudnn_batch_norm": ((3, 4), 5),
    "aten::miopen_batch_norm": ((3, 4), 5),
}


# Operators of allowed namespaces that are refused anyway: they reach outside the tensor world
# (files, process-global state) or rebind storage behind the alias analysis' back.
DENIED_OPERATORS = frozenset({
    "aten::from_file", "aten::set_", "aten::set_data", "aten::_print", "aten::warn",
    "aten::manual_seed", "aten::set_grad_enabled",
})
# Operators without any tensor are TorchScript helpers (string functions, global switches); only
# the symbolic-shape assertions that torch.export emits are allowed among them.
TENSORLESS_OPERATORS_ALLOWED = frozenset({
    "aten::_assert_scalar", "aten::sym_constrain_range", "aten::sym_constrain_range_for_size",
})

# Schema types the codec can carry. Anything else (Storage, Stream, Any, Dict, generic `t`,
# ScriptObject...) makes the whole operator unsupported.
_PLAIN_SCHEMA_KINDS = frozenset({
    "TensorType", "IntType", "SymIntType", "FloatType", "SymFloatType", "BoolType", "SymBoolType",
    "NumberType", "ComplexType", "StringType", "ScalarTypeType", "LayoutType", "DeviceObjType",
    "MemoryFormatType",
})


def _check_namespaces(extra: Iterable[str]) -> frozenset[str]:
    if isinstance(extra, str):
        raise ValueError("allowed_namespaces must be a collection of names, not one string")
    extra = tuple(extra)
    for name in extra:
        if not isinstance(name, str) or not _IDENTIFIER_RE.match(name) or name.startswith("__"):
            raise ValueError(f"allowed_namespaces: {name!r} is not a valid operator namespace")
        if name == "operator":
            raise ValueError("allowed_namespaces: 'operator' is built in (a fixed table), not a namespace")
    return BUILTIN_NAMESPACES | frozenset(extra)


# --------------------------------------------------------------------------------------------
# Operator resolution

_RESOLVED: dict[str, OpOverload] = {}  # name -> op that passed every check (registry is global)


def resolve_target(name: str, namespaces: frozenset[str]) -> OpOverload | _PyFunction:
    """Map ``ns::op.overload`` or ``operator::fn`` to its callable, or raise PayloadError.

    The namespace is checked first; only then is ``torch.ops`` walked, one identifier-checked
    attribute at a time, and each step's type verified.
    """
    namespace, sep, rest = name.partition("::")
    if not sep:
        raise PayloadError(f"target {_preview(name)} is not of the form namespace::op.overload")
    if namespace == "operator":
        function = OPERATOR_FUNCTIONS.get(rest)
        if function is None:
            raise PayloadError(
                f"operator {_preview(name)} is not allowed (operator functions: {', '.join(OPERATOR_FUNCTIONS)})"
            )
        return function
    if namespace not in namespaces:
        raise PayloadError(
            f"operator {_preview(name)} is not allowed: namespace {_preview(namespace)} is not in "
            f"{sorted(namespaces)} (see daemon.allowed_op_namespaces)"
        )
    cached = _RESOLVED.get(name)
    if cached is not None:
        return cached
    op_name, dot, overload_name = rest.partition(".")
    if not dot or not _IDENTIFIER_RE.match(op_name) or not _IDENTIFIER_RE.match(overload_name):
        raise PayloadError(f"target {_preview(name)} is not of the form namespace::op.overload")
    qualified = f"{namespace}::{op_name}"
    if qualified in DENIED_OPERATORS:
        raise PayloadError(f"operator {name} is refused: it acts outside the graph's tensors")
    op = _walk_torch_ops(namespace, op_name, overload_name, name)
    _check_schema_supported(op, name)
    _RESOLVED[name] = op
    return op


def _walk_torch_ops(namespace: str, op_name: str, overload_name: str, name: str) -> OpOverload:
    try:
        packet = getattr(getattr(torch.ops, namespace), op_name)
    except Exception:  # AttributeError or RuntimeError from the registry lookup
        raise PayloadError(f"unknown operator {name}: no {namespace}::{op_name} is registered") from None
    if not isinstance(packet, OpOverloadPacket):
        raise PayloadError(f"unknown operator {name}: {namespace}::{op_name} is not an operator")
    try:
        op = getattr(packet, overload_name)
    except Exception:
        raise PayloadError(
            f"unknown operator {name}: {namespace}::{op_name} has no overload {overload_name!r}"
        ) from None
    if not isinstance(op, OpOverload):
        raise PayloadError(f"unknown operator {name}: not an operator overload")
    schema = op._schema
    if schema.name != f"{namespace}::{op_name}" or (schema.overload_name or "default") != overload_name:
        raise PayloadError(f"unknown operator {name}: resolved to {schema.name}.{schema.overload_name}")
    return op


def _check_schema_supported(op: OpOverload, name: str) -> None:
    schema = op._schema
    types = [a.real_type for a in schema.arguments] + [r.type for r in schema.returns]
    for t in types:
        if not _schema_type_supported(t):
            raise PayloadError(f"operator {name} is not supported: its schema uses type {t}")
    if schema.name not in TENSORLESS_OPERATORS_ALLOWED and not any(_mentions_tensor(t) for t in types):
        raise PayloadError(f"operator {name} is not supported: it takes and returns no tensor")


def _schema_type_supported(t: Any) -> bool:
    kind = t.kind()
    if kind in _PLAIN_SCHEMA_KINDS:
        return True
    if kind == "OptionalType":
        inner = t.getElementType()
        return inner.kind() == "GeneratorType" or _schema_type_supported(inner)  # Generator?: None only
    if kind == "ListType":
        return _schema_type_supported(t.getElementType())
    return False


def _mentions_tensor(t: Any) -> bool:
    return t.kind() == "TensorType" or any(_mentions_tensor(c) for c in t.containedTypes())


# --------------------------------------------------------------------------------------------
# Argument checks against schemas


def _bind_to_schema(op: OpOverload, args: tuple, kwargs: dict, where: str) -> dict[str, Any]:
    """Map args/kwargs to schema argument names, checking count, names and value kinds."""
    arguments = op._schema.arguments
    positional = [a for a in arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise PayloadError(f"{where}: {len(args)} positional arguments, the schema takes {len(positional)}")
    bound = {a.name: v for a, v in zip(positional, args)}
    by_name = {a.name: a for a in arguments}
    for key, value in kwargs.items():
        if key not in by_name:
            raise PayloadError(f"{where}: unknown keyword argument {key!r}")
        if key in bound:
            raise PayloadError(f"{where}: argument {key!r} given twice")
        bound[key] = value
    for argument in arguments:
        if argument.name not in bound and not argument.has_default_value():
            raise PayloadError(f"{where}: missing argument {argument.name!r}")
    for key, value in bound.items():
        if not _value_fits(by_name[key].real_type, value):
            raise PayloadError(
                f"{where} argument {key!r}: expected {by_name[key].real_type}, got {_describe(value)}"
            )
    return bound


def _is_number(value: Any) -> bool:
    return type(value) in (bool, int, float, complex)


# Which decoded Python values fit a schema type kind (a node reference fits anything: its type is
# only known when the graph runs). Python numbers fit Tensor: the dispatcher wraps them, and
# export emits e.g. aten.mul.Tensor(x, 2).
_FITS: dict[str, Callable[[Any], bool]] = {
    "TensorType": _is_number,
    "IntType": lambda v: type(v) in (int, bool),
    "SymIntType": lambda v: type(v) in (int, bool),
    "FloatType": lambda v: type(v) in (int, float, bool),
    "SymFloatType": lambda v: type(v) in (int, float, bool),
    "BoolType": lambda v: type(v) is bool,
    "SymBoolType": lambda v: type(v) is bool,
    "NumberType": _is_number,
    "ComplexType": _is_number,
    "StringType": lambda v: type(v) is str,
    "ScalarTypeType": lambda v: isinstance(v, torch.dtype),
    "LayoutType": lambda v: isinstance(v, torch.layout),
    "DeviceObjType": lambda v: isinstance(v, torch.device),
    "MemoryFormatType": lambda v: isinstance(v, torch.memory_format),
}


def _value_fits(t: Any, value: Any) -> bool:
    if isinstance(value, torch.fx.Node):
        return True
    kind = t.kind()
    if kind == "OptionalType":
        return value is None or _value_fits(t.getElementType(), value)
    if kind == "ListType":
        element = t.getElementType()
        if isinstance(value, (list, tuple)):
            return all(_value_fits(element, v) for v in value)
        # int[1] / SymInt[] arguments also take one bare int (e.g. sum(x, 1))
        return element.kind() in ("IntType", "SymIntType") and type(value) is int
    fits = _FITS.get(kind)
    return fits is not None and fits(value)


def _check_python_call(function: _PyFunction, args: tuple, kwargs: dict, where: str) -> None:
    if kwargs:
        raise PayloadError(f"{where}: takes no keyword arguments")
    if len(args) != function.arity:
        raise PayloadError(f"{where}: takes {function.arity} arguments, got {len(args)}")
    if function.call is operator.getitem:
        if not isinstance(args[0], torch.fx.Node) or type(args[1]) is not int:
            raise PayloadError(f"{where}: expected (node, int), got ({_describe(args[0])}, {_describe(args[1])})")
        return
    for value in args:  # numbers only: no strings or lists to multiply into huge objects
        if not (isinstance(value, torch.fx.Node) or type(value) in (int, float, bool)):
            raise PayloadError(f"{where}: expected node references or numbers, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.fx.Node):
        return f"node {value.name}"
    if type(value) is str:
        return f"str {_preview(value, 40)}"
    return type(value).__name__
