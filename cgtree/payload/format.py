"""The payload format's vocabulary: names, version, limits, value tables, public data types.

Every other module of the codec builds on this one, which imports none of them: the format names
and version, the size limits, ``PayloadError``, the tables that map client strings to dtypes,
layouts, memory formats and device types, the readers that check a value against those tables
and limits, and the public dataclasses. A weight's content hash (``weight_hash``) is defined here
as well: ``WeightBlob.content_hash`` is part of the format.

Invariants:
- Client strings are only ever looked up in these tables, never passed to ``getattr``.
- A reader that refuses a value raises ``PayloadError`` saying what and where; client values
  reach messages only through ``_preview``, cut short.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import msgpack
import torch
import torch.fx


FORMAT_NAME = "cgtree.graph"
FORMAT_VERSION = 1
WEIGHT_FORMAT_NAME = "cgtree.weight"


# Limits. A 24-layer MLP is ~10 KB and ~120 nodes; these leave room for very large graphs while
# keeping a hostile payload from costing more than a few GB of Python objects.
MAX_GRAPH_BYTES = 64 * 1024 * 1024
MAX_NODES = 1_000_000
MAX_NESTING = 16  # list/tuple depth inside one argument; real ATen graphs use at most 2
MAX_STR_LEN = 64 * 1024
MAX_MAP_LEN = 256
MAX_DIMS = 64
MAX_DEVICE_INDEX = 1024
MAX_TRACKED_INPUTS = 64  # past this many, a value "may alias every user input"
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_HASH_RE = re.compile(r"[0-9a-f]{64}\Z")
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # ASCII only, unlike str.isidentifier
_GRAPH_KEYS = ("format", "version", "weights", "inputs", "dynamic", "nodes", "outputs")
_NODE_KINDS = ("call_function",)


class PayloadError(ValueError):
    """A graph payload or weight blob is invalid; the message says what and where."""


# --------------------------------------------------------------------------------------------
# Value tables. Client strings are only ever looked up in these dicts, never passed to getattr.

_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
_NAME_OF_DTYPE = {dtype: name for name, dtype in DTYPES.items()}

_LAYOUT_NAMES = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")
LAYOUTS: dict[str, torch.layout] = {n: getattr(torch, n) for n in _LAYOUT_NAMES if hasattr(torch, n)}
_NAME_OF_LAYOUT = {layout: name for name, layout in LAYOUTS.items()}

_MEMORY_FORMAT_NAMES = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
MEMORY_FORMATS: dict[str, torch.memory_format] = {n: getattr(torch, n) for n in _MEMORY_FORMAT_NAMES}
_NAME_OF_MEMORY_FORMAT = {fmt: name for name, fmt in MEMORY_FORMATS.items()}

DEVICE_TYPES = frozenset({"cpu", "cuda", "meta"})


# --------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class WeightBlob:
    """One weight's raw contents: dtype name (see ``DTYPES``), shape, C-contiguous bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def content_hash(self) -> str:
        """The weight's identity: sha256 hex over dtype, shape and data."""
        return weight_hash(self.dtype, self.shape, self.data)


@dataclass(frozen=True)
class WeightSpec:
    """A weight as a graph references it: content hash, dtype name, shape."""

    hash: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """One user input: shape (``None`` for a dynamic dim), dtype name, device type."""

    shape: tuple[int | None, ...]
    dtype: str
    device: str

    def accepts(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` has this dtype, device type, rank and every static dim."""
        return (
            isinstance(tensor, torch.Tensor)
            and _NAME_OF_DTYPE.get(tensor.dtype) == self.dtype
            and tensor.device.type == self.device
            and tensor.dim() == len(self.shape)
            and all(want is None or want == got for want, got in zip(self.shape, tensor.shape))
        )


@dataclass(frozen=True)
class EncodedGraph:
    """What a client sends: graph bytes, the weights they reference by hash, the graph id.

    ``weights`` maps content hash -> blob (one entry per distinct weight); ``weight_hashes``
    lists the hashes in placeholder order (a hash may repeat). A client may leave out blobs the
    daemon already holds.
    """

    graph_id: str
    graph_bytes: bytes
    weights: dict[str, WeightBlob]
    weight_hashes: tuple[str, ...]
    input_specs: tuple[InputSpec, ...]


@dataclass(frozen=True)
class DecodedGraph:
    """A graph rebuilt by the daemon from allowed operators only.

    ``module(*weights, *user_inputs)`` returns a tuple of ``num_outputs`` values; the weights are
    the tensors of ``weight_hashes`` in order. ``mutated_inputs`` are the indices (among user
    inputs) of inputs the graph writes in place; ``dynamic`` is true when an input has a
    symbolic dim (``None`` in its spec).
    """

    graph_id: str
    module: torch.fx.GraphModule
    weight_hashes: tuple[str, ...]
    weight_specs: tuple[WeightSpec, ...]
    input_specs: tuple[InputSpec, ...]
    num_outputs: int
    dynamic: bool
    mutated_inputs: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Weight identity


def weight_hash(dtype: str, shape: Sequence[int], data: bytes | bytearray | memoryview) -> str:
    """sha256 hex of a weight: a msgpack header ``[format, version, dtype, shape]``, then data."""
    digest = hashlib.sha256(msgpack.packb([WEIGHT_FORMAT_NAME, FORMAT_VERSION, dtype, list(shape)]))
    digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Readers of single values (every module of the codec checks client values through these)


def _read_dtype(name: Any, where: str) -> torch.dtype:
    return _lookup(DTYPES, name, "dtype", where)


def _lookup(table: Mapping[str, Any], name: Any, what: str, where: str) -> Any:
    if type(name) is not str or name not in table:
        raise PayloadError(f"{where}: unknown {what} {_preview(name)} (known: {', '.join(table)})")
    return table[name]


def _read_shape(shape: Any, where: str) -> tuple[int, ...]:
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise PayloadError(f"{where}: expected a list of at most {MAX_DIMS} sizes")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= INT64_MAX:
            raise PayloadError(f"{where}: size {_preview(dim)} is not a non-negative int64")
    return tuple(shape)


def _read_input_shape(shape: Any, where: str) -> tuple[int | None, ...]:
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise PayloadError(f"{where}: expected a list of at most {MAX_DIMS} sizes")
    for dim in shape:
        if dim is not None and (type(dim) is not int or not 0 <= dim <= INT64_MAX):
            raise PayloadError(f"{where}: size {_preview(dim)} is neither a non-negative int64 nor null")
    return tuple(shape)


def _preview(value: Any, limit: int = 80) -> str:
    """repr() for error messages, cut short: client strings can be 64 KiB."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
