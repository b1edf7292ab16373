"""cgtree.client.lowering's two routes for nn.Modules: make_fx (the default) and torch.export.

The make_fx route must lower what export lowers, with the same results: the benchmark models to
byte-identical payloads, other modules to graphs that compute what eager computes, weights
lifted and named the same way, input mutations kept, and weight mutations refused, including
the writes make_fx's decompositions hide (batch norm's running statistics).
"""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgtree.client import lowering
from cgtree.client.lowering import LoweringError, encode, lower
from cgtree.payload import decode_graph, weight_to_tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # appended: the bare cgtree/ folder must not shadow the package

from benchmarks.models import build_model  # noqa: E402
from lowering_models import MutatesInput, WithBuffer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class MakesConstants(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], dtype=x.dtype) * torch.tensor([1.5])


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.calls


class FunctionalBatchNorm(nn.Module):
    """Training-mode batch norm without num_batches_tracked: the only write is the one
    native_batch_norm's schema does not declare."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=True)


class StatisticsAsInputs(nn.Module):
    def forward(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean, var, training=True)


class LastStep(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def run_decoded(lowered, inputs):
    """What the daemon runs: the payload decoded, weights rebuilt from their blobs."""
    encoded = encode(lowered)
    decoded = decode_graph(encoded.graph_bytes)
    weights = [weight_to_tensor(encoded.weights[h], expected_hash=h) for h in decoded.weight_hashes]
    return decoded, decoded.module(*weights, *inputs)


def eager(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------
# Benchmark models: the make_fx route gives export's payload, byte for byte


@pytest.mark.parametrize("name", ["tiny", "mlp24"])
def test_benchmark_models_lower_to_exports_payload(name):
    model = build_model(name, "cpu")
    x = model.inputs[0]
    by_make_fx = lower(model.module, [x])
    by_export = lower(model.module, [x], route="export")
    assert (by_make_fx.route, by_export.route) == ("make_fx", "export")
    first, second = encode(by_make_fx), encode(by_export)
    assert first.graph_bytes == second.graph_bytes and first.graph_id == second.graph_id
    assert first.weight_hashes == second.weight_hashes
    _, (out,) = run_decoded(by_make_fx, [x])
    torch.testing.assert_close(out, eager(model.module, [x]))


# ---------------------------------------------------------------------------------------------
# Other modules: same results as eager and as export, weights named alike

EQUIVALENT = {
    "buffers and a tensor attribute": (WithBuffer, lambda: [torch.randn(4, 16)]),
    "constants made in forward": (MakesConstants, lambda: [torch.randn(2, 5)]),
    "eval batch norm": (lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval(), lambda: [torch.randn(4, 8)]),
    "conv, group norm, layer norm": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(144), nn.GELU("tanh")),
        lambda: [torch.randn(2, 3, 8, 8)]),
    "attention": (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval(), lambda: [torch.randn(2, 5, 16)]),
    # GRU cells decompose to in-place ops below functionalize: the route traces them again.
    "gru": (lambda: LastStep(nn.GRU(8, 8, batch_first=True)).eval(), lambda: [torch.randn(2, 5, 8)]),
    "activations": (lambda: nn.Sequential(nn.SiLU(), nn.Mish(), nn.ELU(), nn.Softplus(), nn.RMSNorm(8)),
                    lambda: [torch.randn(3, 8)]),
    "tied weights": (lambda: _tied(), lambda: [torch.randint(0, 10, (3,))]),
}


def _tied() -> nn.Module:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    return model


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_make_fx_route_matches_eager_and_export(case):
    build, make_inputs = EQUIVALENT[case]
    torch.manual_seed(0)
    module, inputs = build(), make_inputs()
    by_make_fx = lower(module, inputs)
    by_export = lower(module, inputs, route="export")
    assert by_make_fx.route == "make_fx"
    assert not lowering._in_place_nodes(by_make_fx.graph_module.graph, len(by_make_fx.weights))
    # Same weights under the same names (export repeats a tied parameter under each name; it
    # names constants made in forward its own way).
    exported = dict(zip(by_export.weight_names, by_export.weights))
    for name, weight in zip(by_make_fx.weight_names, by_make_fx.weights):
        if not name.startswith("constant "):
            assert torch.equal(exported[name], weight), name
    _, (got,) = run_decoded(by_make_fx, inputs)
    _, (via_export,) = run_decoded(by_export, inputs)
    torch.testing.assert_close(got, eager(module, inputs))
    torch.testing.assert_close(got, via_export)


def test_constants_keep_the_attribute_name_export_gives_them():
    lowered = lower(WithBuffer(), [torch.randn(4, 16)])
    assert lowered.weight_names == ("fc.weight", "fc.bias", "shift", "scale", "offset")


def test_an_input_mutated_in_place_is_mutated_by_the_decoded_graph():
    x, y = torch.randn(3), torch.zeros(3)
    lowered = lower(MutatesInput(), [x, y.clone()])
    assert lowered.route == "make_fx" and lowered.mutated_inputs == (1,)
    y_daemon = y.clone()
    decoded, (out,) = run_decoded(lowered, [x, y_daemon])
    assert decoded.mutated_inputs == (1,)
    y_eager = y.clone()
    torch.testing.assert_close(out, MutatesInput()(x, y_eager))
    torch.testing.assert_close(y_daemon, y_eager)


# ---------------------------------------------------------------------------------------------
# Weight mutations are refused on the make_fx route as on export


@pytest.mark.parametrize("route", [None, "make_fx", "export"])
def test_a_module_that_mutates_a_buffer_is_rejected(route):
    module = CountsCalls()
    with pytest.raises(LoweringError, match="calls"):
        lower(module, [torch.randn(3)], route=route)
    assert float(module.calls) == 0.0  # fake tracing ran nothing


@pytest.mark.parametrize("route", [None, "make_fx"])
def test_training_batch_norm_running_statistics_are_rejected(route):
    # native_batch_norm's schema hides the write: without the batch-norm decomposition and the
    # undeclared-write table, this graph would pass and the daemon would update shared weights.
    with pytest.raises(LoweringError, match="'mean', 'var'"):
        lower(FunctionalBatchNorm(), [torch.randn(3, 4)], route=route)


def test_training_instance_norm_writing_through_an_alias_is_rejected():
    # InstanceNorm writes its running statistics through alias(): found after re-functionalizing.
    module = nn.InstanceNorm1d(3, track_running_stats=True)
    with pytest.raises(LoweringError, match="running_mean"):
        lower(module, [torch.randn(2, 3, 5)], route="make_fx")


def test_running_statistics_passed_as_inputs_are_mutated_inputs():
    x, mean, var = torch.randn(3, 4), torch.zeros(4), torch.ones(4)
    lowered = lower(StatisticsAsInputs(), [x, mean.clone(), var.clone()])
    assert lowered.route == "make_fx" and lowered.mutated_inputs == (1, 2)
    daemon_stats = [mean.clone(), var.clone()]
    _, (out,) = run_decoded(lowered, [x, *daemon_stats])
    eager_stats = [mean.clone(), var.clone()]
    torch.testing.assert_close(out, StatisticsAsInputs()(x, *eager_stats))
    torch.testing.assert_close(daemon_stats, eager_stats)


def _graph_with_native_batch_norm(stats_are_weights: bool, training: bool) -> torch.fx.Graph:
    """native_batch_norm(x, None, None, mean, var, training, ...); mean and var placeholders come
    first (weights) or after x (user inputs)."""
    graph = torch.fx.Graph()
    order = ["mean", "var", "x"] if stats_are_weights else ["x", "mean", "var"]
    nodes = {name: graph.placeholder(name) for name in order}
    for name, value in (("mean", torch.zeros(4)), ("var", torch.ones(4)), ("x", torch.randn(3, 4))):
        nodes[name].meta["val"] = value
    result = graph.call_function(
        torch.ops.aten.native_batch_norm.default,
        (nodes["x"], None, None, nodes["mean"], nodes["var"], training, 0.1, 1e-5))
    graph.output((graph.call_function(operator.getitem, (result, 0)),))
    return graph


@pytest.mark.parametrize("stats_are_weights", [True, False], ids=["weights", "inputs"])
def test_native_batch_norm_in_training_mode_counts_as_a_write(stats_are_weights):
    # The guard behind the decomposition: native_batch_norm(training=True) writes its running
    # statistics without saying so in its schema.
    graph = _graph_with_native_batch_norm(stats_are_weights, training=True)
    weights, names = ([torch.zeros(4), torch.ones(4)], ["mean", "var"]) if stats_are_weights else ([], [])
    with pytest.raises(LoweringError, match="'mean', 'var'" if stats_are_weights else "does not declare"):
        lowering._finish(graph, weights, names, "make_fx")
    lowering._finish(_graph_with_native_batch_norm(stats_are_weights, training=False), weights, names, "make_fx")


def test_graphs_with_writes_other_than_copies_into_inputs_are_not_functional():
    graph = torch.fx.Graph()
    weight, x = graph.placeholder("w"), graph.placeholder("x")
    doubled = graph.call_function(torch.ops.aten.mul.Tensor, (x, weight))
    graph.call_function(torch.ops.aten.copy_.default, (x, doubled))  # an input mutation: allowed
    graph.output((doubled,))
    lowering._check_functional(graph, num_weights=1)
    with graph.inserting_before(list(graph.nodes)[-1]):
        graph.call_function(torch.ops.aten.add_.Tensor, (doubled, weight))  # an intermediate written
    with pytest.raises(lowering._TraceFailed, match="add_"):
        lowering._check_functional(graph, num_weights=1)


# ---------------------------------------------------------------------------------------------
# Route selection


def test_export_takes_over_when_make_fx_cannot_trace(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise lowering._TraceFailed("make_fx failed: simulated")

    monkeypatch.setattr(lowering, "_lower_traced", fail)
    model = build_model("tiny", "cpu")
    with caplog.at_level("INFO", logger="cgtree.client"):
        lowered = lower(model.module, [model.inputs[0]])
    assert lowered.route == "export"
    assert "simulated" in caplog.text
    with pytest.raises(LoweringError, match="simulated"):
        lower(model.module, [model.inputs[0]], route="make_fx")


def test_dynamic_shapes_take_the_export_route():
    batch = torch.export.Dim("batch", min=2, max=64)
    lowered = lower(nn.Linear(4, 4), [torch.randn(3, 4)], dynamic_shapes={"input": {0: batch}})
    assert lowered.route == "export"
    with pytest.raises(LoweringError, match="export route"):
        lower(nn.Linear(4, 4), [torch.randn(3, 4)], dynamic_shapes={"input": {0: batch}}, route="make_fx")


def test_routes_that_do_not_apply_are_refused():
    with pytest.raises(LoweringError, match="route must be"):
        lower(nn.Linear(2, 2), [torch.randn(1, 2)], route="dynamo")
    with pytest.raises(LoweringError, match="does not apply"):
        lower(lambda x: x + 1, [torch.randn(2)], route="export")
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(LoweringError, match="does not apply"):
        lower(program, route="make_fx")
