"""Which operator calls a CUDA graph cannot hold: one rule for every place cgtree decides it.

The rule is PyTorch's (``torch._inductor.utils.get_first_incompatible_cudagraph_node``), in our
own code, so that cgtree graphs exactly what ``mode="reduce-overhead"`` graphs. A call is
incompatible when it

- reads device values into Python or asserts on them (``_local_scalar_dense``, ``item``,
  ``_assert_scalar``): a host synchronization, which a capture forbids;
- saves or restores RNG state on the host (``run_and_save_rng_state``, ...);
- carries the ``cudagraph_unsafe`` tag;
- has an output whose *size depends on tensor values* (``nonzero``, ``masked_select``,
  boolean-mask indexing, ``bincount``, ``one_hot`` without ``num_classes``): a graph replays
  fixed sizes. In an FX graph that shows as unbacked symbols in a node's value; for a call
  seen at run time (the tree manager's first-run inspection) it is found by running the call
  on fake tensors, where a data-dependent size raises;
- writes through a boolean mask (``index_put`` with bool/uint8 indices, i.e. ``x[mask] = v``),
  which runs ``nonzero`` inside the kernel.

An operator's ``dynamic_output_shape`` tag alone is not a reason: it marks ops whose output
size *may* depend on values. ``aten.index.Tensor`` with integer indices (the gathers of
attention-mask code in every Hugging Face decoder) has a size fixed by its index shapes and
is captured like any other op.

Invariants:
- Decisions are pure: they read schemas, tags, dtypes, shapes and fake values, never real data,
  and never change what an op computes.
- A call whose fake run fails for a reason other than a data-dependent size counts as
  incompatible when its op is tagged ``dynamic_output_shape`` (the cautious answer), and as
  compatible otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._ops import OpOverload
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = ["FORBIDDEN_OPS", "incompatible_call", "incompatible_fx_node"]

# Host syncs, host-side assertions and host RNG state: never inside a graph.
FORBIDDEN_OPS = frozenset({
    "aten._local_scalar_dense.default",
    "aten.item.default",
    "aten._assert_scalar.default",
    "aten._fused_moving_avg_obs_fq_helper.default",
    "aten._fused_moving_avg_obs_fq_helper_functional.default",
    "run_and_save_rng_state",
    "run_with_rng_state",
})

_DYNAMIC_OUTPUT_SHAPE = getattr(torch.Tag, "dynamic_output_shape", None)
_DATA_DEPENDENT_OUTPUT = getattr(torch.Tag, "data_dependent_output", None)
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_MASK_DTYPES = (torch.bool, torch.uint8)


def _index_put_ops() -> frozenset:
    names = (("index_put", "default"), ("index_put_", "default"), ("_unsafe_index_put", "default"))
    ops = set()
    for packet, overload in names:
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            ops.add(op)
    return frozenset(ops)


_INDEX_PUT_OPS = _index_put_ops()


def _unsafe_by_name_or_tag(op: Any) -> Optional[str]:
    """Why ``op`` can never be captured, whatever its arguments, or None."""
    if str(op) in FORBIDDEN_OPS:
        return "host synchronization"
    if not isinstance(op, OpOverload):
        return None
    tags = op.tags
    if _CUDAGRAPH_UNSAFE is not None and _CUDAGRAPH_UNSAFE in tags:
        return "tagged cudagraph_unsafe"
    if _DATA_DEPENDENT_OUTPUT is not None and _DATA_DEPENDENT_OUTPUT in tags:
        return "reads device values on the host"
    return None


def _writes_through_mask(op: Any, indices: Any) -> bool:
    """``index_put`` whose indices hold a boolean mask (values given as tensors or fx values)."""
    if op not in _INDEX_PUT_OPS or not isinstance(indices, (list, tuple)):
        return False
    return any(getattr(index, "dtype", None) in _MASK_DTYPES for index in indices if index is not None)


def _index_argument(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("indices")


# --------------------------------------------------------------------------------------------
# Calls seen at run time (the tree manager's inspector)


def incompatible_call(op: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Why this call of ``op`` on these (real) arguments cannot be captured, or None."""
    reason = _unsafe_by_name_or_tag(op)
    if reason is not None:
        return reason
    if _writes_through_mask(op, _index_argument(args, kwargs)):
        return "writes through a boolean mask"
    if isinstance(op, OpOverload) and _DYNAMIC_OUTPUT_SHAPE is not None and _DYNAMIC_OUTPUT_SHAPE in op.tags:
        if _output_size_depends_on_values(op, args, kwargs):
            return "output size depends on tensor values"
    return None


def _output_size_depends_on_values(op: OpOverload, args: tuple, kwargs: dict) -> bool:
    """Run the call on fake copies of its arguments (no shape environment): an output size that
    depends on values raises there. Only metadata is read; nothing runs on the device."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
    )

    mode = FakeTensorMode()
    try:
        fake_args, fake_kwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        with mode:
            op(*fake_args, **fake_kwargs)
    except (DynamicOutputShapeException, DataDependentOutputException):
        return True  # the answer the fake run exists to give
    except Exception:  # noqa: BLE001 - it failed otherwise: for a tagged op, the cautious answer
        return True
    return False


# --------------------------------------------------------------------------------------------
# FX graphs with fake values (AOT graphs of the compile backends, decoded payloads)


def incompatible_fx_node(node: torch.fx.Node, op: Any = None) -> Optional[str]:
    """Why this FX node cannot be captured, or None. ``op`` overrides the node's target (the
    mutable op an ``auto_functionalized`` node wraps)."""
    if node.op != "call_function":
        return None
    op = node.target if op is None else op
    reason = _unsafe_by_name_or_tag(op)
    if reason is not None:
        return reason
    if _writes_through_mask(op, _index_argument(tuple(_fx_values(node.args)), {})):
        return "writes through a boolean mask"
    value = node.meta.get("val")
    if value is not None and _has_unbacked_symbols(value):
        return "output size depends on tensor values"
    if value is None and isinstance(op, OpOverload) and _DYNAMIC_OUTPUT_SHAPE in op.tags:
        return "output size may depend on tensor values (no fake value to tell)"
    return None


def _fx_values(args: Any) -> list:
    """fx arguments with each node replaced by its fake value (lists kept as lists)."""
    def value(item: Any) -> Any:
        if isinstance(item, torch.fx.Node):
            return item.meta.get("val")
        if isinstance(item, (list, tuple)):
            return [value(x) for x in item]
        return item

    return [value(a) for a in args]


def _has_unbacked_symbols(value: Any) -> bool:
    try:
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    except ImportError:  # pragma: no cover - present in every supported torch
        return False
    leaves, _ = tree_flatten(value)
    return any(free_unbacked_symbols(leaf) for leaf in leaves if isinstance(leaf, (torch.Tensor, torch.SymInt)))
