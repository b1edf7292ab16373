"""The daemon's inductor policy (``cgtree.daemon.compiling``): which graphs run their ATen code."""

from __future__ import annotations

import types

import torch

from cgtree.client import lowering
from cgtree.daemon.compiling import eager_reason
from cgtree.payload import InputSpec, decode_graph


def _decoded(module, *inputs):
    encoded = lowering.encode(lowering.lower(module, list(inputs)))
    return decode_graph(encoded.graph_bytes, allowed_namespaces=(), device=torch.device("cpu"))


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2


class ReadsAValue(torch.nn.Module):
    def forward(self, x):
        return x + x.sum().item()


def test_a_static_graph_can_be_compiled():
    assert eager_reason(_decoded(Scale(), torch.randn(4, 4))) is None


def test_symbolic_shapes_and_graph_breaking_ops_keep_the_aten_code():
    decoded = _decoded(Scale(), torch.randn(4, 4))
    dynamic = types.SimpleNamespace(module=decoded.module, dynamic=False,
                                    input_specs=(InputSpec((None, 4), "float32", "cpu"),))
    assert eager_reason(dynamic) == "it has symbolic shapes"
    assert eager_reason(types.SimpleNamespace(module=decoded.module, dynamic=True, input_specs=decoded.input_specs)) \
        == "it has symbolic shapes"
    assert eager_reason(_decoded(ReadsAValue(), torch.randn(4))) == "it holds an op a CUDA graph cannot hold"

