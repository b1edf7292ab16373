"""The daemon's inductor policy (``cgtree.daemon.compiling``): which graphs run their ATen code."""

from __future__ import annotations

import copy
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



def test_a_graph_inductor_cannot_compile_keeps_its_aten_code(monkeypatch, caplog):
    import torch._inductor.compile_fx as inductor_compile_fx

    from cgtree.daemon.compiling import compile_graph

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", refuse)
    decoded = _decoded(Scale(), torch.randn(4, 4))
    with caplog.at_level("WARNING", logger="cgtree.daemon.compiling"):
        fn = compile_graph(decoded, [], torch.device("cpu"), "Scale")
    assert fn is decoded.module
    assert "inductor could not compile it (RuntimeError: no C++ compiler found)" in caplog.text


class GathersRows(torch.nn.Module):
    """An integer gather (aten.index.Tensor, as HF's mask code does): capturable."""

    def forward(self, table, rows):
        return table[rows] * 2


def test_an_integer_gather_is_judged_by_its_values_and_compiles():
    from cgtree import graph_facts

    decoded = _decoded(GathersRows(), torch.randn(6, 4), torch.tensor([0, 3]))
    # a decoded payload has no fake values: without them the tagged op is refused ...
    assert eager_reason(decoded) == "it holds an op a CUDA graph cannot hold"
    # ... with them, the value rule sees fixed sizes
    judged = copy.deepcopy(decoded.module)
    assert graph_facts.propagate_fake_values(judged, [torch.randn(6, 4), torch.tensor([0, 3])])
    assert eager_reason(decoded, judged) is None
