"""The ``operator`` table: the only plain Python callables a payload may name (``operator::fn``).

Symbolic-int arithmetic for dynamic shapes and ``getitem`` for multi-output operators, in one
fixed table (``OPERATOR_FUNCTIONS``): each entry holds what a decoded graph calls, what tracing
produced and the arity; the encoder finds an entry's name from either callable
(``_NAME_OF_PY_FUNCTION``).

Invariants:
- The operations that can grow an integer run through ``_checked``: an int result outside int64
  is an ``OverflowError``, so a hostile chain of multiplications cannot build a gigantic
  integer; SymInts (while tracing) pass through.
- Nothing outside this table is reachable as a Python callable from a payload.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

from cgtree.payload.format import INT64_MAX, INT64_MIN


# --------------------------------------------------------------------------------------------
# The `operator` table: symbolic-int arithmetic (dynamic shapes) and getitem (multi-output ops).
# Arithmetic runs through checked wrappers: Python ints are unbounded, so a chain of
# multiplications in a hostile graph could otherwise build a gigantic integer and stall the
# daemon. Real sizes fit in int64; SymInts (while tracing) pass through unchecked.


def _checked(value: Any) -> Any:
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError(f"symbolic integer arithmetic left the int64 range: {value.bit_length()} bits")
    return value


def sym_add(a: Any, b: Any) -> Any:
    return _checked(operator.add(a, b))


def sym_sub(a: Any, b: Any) -> Any:
    return _checked(operator.sub(a, b))


def sym_mul(a: Any, b: Any) -> Any:
    return _checked(operator.mul(a, b))


def sym_floordiv(a: Any, b: Any) -> Any:
    return _checked(operator.floordiv(a, b))


def sym_mod(a: Any, b: Any) -> Any:
    return _checked(operator.mod(a, b))


def sym_neg(a: Any) -> Any:
    return _checked(operator.neg(a))


def sym_abs(a: Any) -> Any:
    return _checked(operator.abs(a))


@dataclass(frozen=True)
class _PyFunction:
    """One allowed Python callable: what the decoded graph calls, what tracing produced, arity."""

    call: Callable[..., Any]
    traced: Callable[..., Any]
    arity: int


OPERATOR_FUNCTIONS: dict[str, _PyFunction] = {
    "getitem": _PyFunction(operator.getitem, operator.getitem, 2),
    "add": _PyFunction(sym_add, operator.add, 2),
    "sub": _PyFunction(sym_sub, operator.sub, 2),
    "mul": _PyFunction(sym_mul, operator.mul, 2),
    "floordiv": _PyFunction(sym_floordiv, operator.floordiv, 2),
    "mod": _PyFunction(sym_mod, operator.mod, 2),
    "truediv": _PyFunction(operator.truediv, operator.truediv, 2),
    "neg": _PyFunction(sym_neg, operator.neg, 1),
    "pos": _PyFunction(operator.pos, operator.pos, 1),
    "abs": _PyFunction(sym_abs, operator.abs, 1),
    "eq": _PyFunction(operator.eq, operator.eq, 2),
    "ne": _PyFunction(operator.ne, operator.ne, 2),
    "lt": _PyFunction(operator.lt, operator.lt, 2),
    "le": _PyFunction(operator.le, operator.le, 2),
    "gt": _PyFunction(operator.gt, operator.gt, 2),
    "ge": _PyFunction(operator.ge, operator.ge, 2),
}
_NAME_OF_PY_FUNCTION: dict[Any, str] = {}
for _name, _fn in OPERATOR_FUNCTIONS.items():
    _NAME_OF_PY_FUNCTION[_fn.call] = _name
    _NAME_OF_PY_FUNCTION[_fn.traced] = _name
