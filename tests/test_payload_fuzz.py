"""Property-based fuzzing of the daemon's graph decoder (hypothesis): whatever bytes a client
sends as a graph payload, ``decode_graph`` answers a ``PayloadError`` or a graph built from
allowed operators, never another exception (the daemon turns ``PayloadError`` into a
``payload_rejected`` reply and keeps serving). Bounded for CI; first piece of issue 14's fuzzing.

Two generators: byte flips of a real payload (deep in the format, past the msgpack layer) and
structural mutations of its decoded document (wrong types, sizes, names, nesting at any depth).
"""

from __future__ import annotations

import msgpack
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cgtree.client import lowering  # noqa: E402
from cgtree.payload import PayloadError, decode_graph  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, rows):
        return torch.nn.functional.gelu(self.linear(x))[rows].softmax(-1).view(-1)


GRAPH_BYTES = lowering.encode(lowering.lower(_Model(), [torch.randn(4, 8), torch.tensor([0, 2])])).graph_bytes
DOCUMENT = msgpack.unpackb(GRAPH_BYTES, raw=False)

HOSTILE_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from(["aten.mm.default", "operator.getitem", "prims.convert_element_type.default", "builtins.eval",
                     "os.system", "torch.load", "aten.nonzero.default", "placeholder", "output", "call_function"]),
    st.lists(st.integers(-3, 10), max_size=4),
)


def _decode_is_safe(data: bytes) -> None:
    try:
        decoded = decode_graph(data)
    except PayloadError:
        return
    assert isinstance(decoded.module, torch.fx.GraphModule)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(GRAPH_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_flipped_bytes_are_rejected_or_decoded(flips):
    data = bytearray(GRAPH_BYTES)
    for position, value in flips:
        data[position] = value
    _decode_is_safe(bytes(data))


def _replace_at(document, path, leaf):
    """``document`` with the value at ``path`` (indices into nested lists/maps, taken modulo
    their length) replaced by ``leaf``."""
    if not path or not isinstance(document, (list, dict)) or not document:
        return leaf
    if isinstance(document, dict):
        key = list(document)[path[0] % len(document)]
        return {**document, key: _replace_at(document[key], path[1:], leaf)}
    index = path[0] % len(document)
    return [*document[:index], _replace_at(document[index], path[1:], leaf), *document[index + 1:]]


@FUZZ
@given(path=st.lists(st.integers(0, 1000), min_size=1, max_size=8), leaf=HOSTILE_LEAVES)
def test_mutated_documents_are_rejected_or_decoded(path, leaf):
    _decode_is_safe(msgpack.packb(_replace_at(DOCUMENT, path, leaf), use_bin_type=True))


@FUZZ
@given(st.recursive(HOSTILE_LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20))
def test_arbitrary_documents_are_rejected(document):
    _decode_is_safe(msgpack.packb(document, use_bin_type=True))
