"""cgtree.client.lowering: models -> flat ATen graph -> payload -> decoded graph, end to end (CPU)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from cgtree.client.lowering import LoweredGraph, LoweringError, encode, lower
from cgtree.payload import DecodedGraph, EncodedGraph, InputSpec, PayloadError, decode_graph, weight_to_tensor
from lowering_models import MutatesInput, WithBuffer  # noqa: E402

# torch.export itself emits a pytree FutureWarning in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@torch.library.custom_op("cgtree_test::myop", mutates_args=())
def myop(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@myop.register_fake
def _myop_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def mlp(depth: int, width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


class UsesCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cgtree_test.myop(self.fc(x))


def round_trip(lowered: LoweredGraph, **decode_kwargs) -> tuple[EncodedGraph, DecodedGraph, list[torch.Tensor]]:
    encoded = encode(lowered)
    decoded = decode_graph(encoded.graph_bytes, **decode_kwargs)
    weights = [weight_to_tensor(encoded.weights[h], expected_hash=h) for h in decoded.weight_hashes]
    return encoded, decoded, weights


def run_decoded(lowered: LoweredGraph, inputs: list[torch.Tensor], **decode_kwargs) -> tuple:
    _, decoded, weights = round_trip(lowered, **decode_kwargs)
    outputs = decoded.module(*weights, *inputs)
    assert isinstance(outputs, tuple) and len(outputs) == decoded.num_outputs
    return outputs


# ---------------------------------------------------------------------------------------------
# Round trips: decoded module with decoded weights == eager


@pytest.mark.parametrize("depth,width", [(2, 64), (24, 512)], ids=["tiny", "mlp24"])
def test_mlp_round_trip_matches_eager(depth, width):
    model = mlp(depth, width)
    x = torch.randn(16, width)
    lowered = lower(model, (x,))
    (out,) = run_decoded(lowered, [x])
    torch.testing.assert_close(out, model(x))
    assert len(lowered.weights) == 2 * depth
    assert lowered.input_specs == (InputSpec((16, width), "float32", "cpu"),)


def test_module_with_buffers_and_constants_round_trips():
    model = WithBuffer()
    x = torch.randn(4, 16)
    lowered = lower(model, (x,))
    assert set(lowered.weight_names) == {"fc.weight", "fc.bias", "shift", "scale", "offset"}
    (out,) = run_decoded(lowered, [x])
    torch.testing.assert_close(out, model(x))


def test_symbolically_traced_graph_module_round_trips():
    model = WithBuffer()
    graph_module = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 16)
    lowered = lower(graph_module, (x,))
    assert all(n.op in ("placeholder", "call_function", "output") for n in lowered.graph_module.graph.nodes)
    (out,) = run_decoded(lowered, [x])
    torch.testing.assert_close(out, model(x))


def test_exported_program_round_trips():
    model = mlp(2, 64)
    x = torch.randn(16, 64)
    program = torch.export.export(model, (x,))
    (out,) = run_decoded(lower(program), [x])
    torch.testing.assert_close(out, model(x))


def test_plain_callable_with_weight_inputs_round_trips():
    weight = torch.randn(8, 8)

    def fn(w, x):
        return (x @ w).sin(), x.sum(0)

    x = torch.randn(3, 8)
    lowered = lower(fn, (weight, x), weight_input_indices=[0])
    assert lowered.num_user_inputs == 1 and lowered.weight_names == ("input 0",)
    outputs = run_decoded(lowered, [x])
    for got, want in zip(outputs, fn(weight, x)):
        torch.testing.assert_close(got, want)


def test_tensors_a_callable_closes_over_become_weights():
    table = torch.randn(6)

    def fn(x):
        return x * table + torch.tensor(2.0)

    x = torch.randn(6)
    lowered = lower(fn, (x,))
    assert len(lowered.weights) == 2 and all(name.startswith("constant") for name in lowered.weight_names)
    torch.testing.assert_close(run_decoded(lowered, [x])[0], fn(x))


@pytest.mark.parametrize("mode", ["fake", "real", "symbolic"])
def test_tracing_leaves_the_callers_tensors_alone(mode):
    def fn(x, y):
        y.add_(1)
        return x + y

    x, y = torch.randn(3), torch.zeros(3)
    lowered = lower(fn, (x, y), tracing_mode=mode)
    assert lowered.mutated_inputs == (1,)
    torch.testing.assert_close(y, torch.zeros(3))


def test_nested_outputs_are_flattened_to_a_tuple():
    def fn(x):
        return {"a": x + 1, "b": [x * 2, (x - 1,)]}

    x = torch.randn(5)
    outputs = run_decoded(lower(fn, (x,)), [x])
    assert len(outputs) == 3


# ---------------------------------------------------------------------------------------------
# Identity: content hashes


def test_same_model_built_twice_has_same_graph_id_and_weight_hashes():
    x = torch.randn(16, 64)
    first = encode(lower(mlp(2, 64, seed=1), (x,)))
    second = encode(lower(mlp(2, 64, seed=1), (x,)))
    assert first.graph_id == second.graph_id
    assert first.graph_bytes == second.graph_bytes
    assert first.weight_hashes == second.weight_hashes


def test_other_weights_change_weight_hashes_and_graph_id_but_not_structure():
    x = torch.randn(16, 64)
    first = encode(lower(mlp(2, 64, seed=1), (x,)))
    second = encode(lower(mlp(2, 64, seed=2), (x,)))
    assert set(first.weight_hashes).isdisjoint(second.weight_hashes)
    # graph_id covers the weight hashes: a graph is bound to its weights ...
    assert first.graph_id != second.graph_id
    # ... and the bytes differ only in those hashes.
    renamed = first.graph_bytes
    for old, new in zip(first.weight_hashes, second.weight_hashes):
        renamed = renamed.replace(old.encode(), new.encode())
    assert renamed == second.graph_bytes


def test_weight_bytes_stay_out_of_graph_bytes():
    encoded = encode(lower(mlp(2, 64), (torch.randn(16, 64),)))
    assert len(encoded.graph_bytes) < 4096
    for blob in encoded.weights.values():
        assert blob.data[:64] not in encoded.graph_bytes


# ---------------------------------------------------------------------------------------------
# Operator namespaces


def test_custom_op_namespace_is_rejected_by_default_naming_the_operator():
    x = torch.randn(2, 8)
    encoded = encode(lower(UsesCustomOp(), (x,)))
    with pytest.raises(PayloadError, match="cgtree_test::myop"):
        decode_graph(encoded.graph_bytes)


def test_custom_op_namespace_is_accepted_when_allowed():
    model = UsesCustomOp()
    x = torch.randn(2, 8)
    (out,) = run_decoded(lower(model, (x,)), [x], allowed_namespaces=["cgtree_test"])
    torch.testing.assert_close(out, model(x))


# ---------------------------------------------------------------------------------------------
# Mutation


def test_user_input_mutation_becomes_an_in_graph_copy():
    x, y = torch.randn(3), torch.zeros(3)
    lowered = lower(MutatesInput(), (x, y.clone()))
    assert lowered.mutated_inputs == (1,)
    _, decoded, weights = round_trip(lowered)
    assert decoded.mutated_inputs == (1,)
    y_daemon = y.clone()
    (out,) = decoded.module(*weights, x, y_daemon)
    y_eager = y.clone()
    expected = MutatesInput()(x, y_eager)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(y_daemon, y_eager)


def test_traced_input_mutation_becomes_an_in_graph_copy():
    def fn(x, y):
        y.mul_(3)
        return x + y

    x, y = torch.randn(4), torch.randn(4)
    lowered = lower(fn, (x, y.clone()))
    assert lowered.mutated_inputs == (1,)
    y_daemon = y.clone()
    (out,) = run_decoded(lowered, [x, y_daemon])
    torch.testing.assert_close(y_daemon, y * 3)
    torch.testing.assert_close(out, x + y * 3)


def test_training_mode_batchnorm_is_rejected_naming_the_buffer():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    with pytest.raises(LoweringError, match="running_mean"):
        lower(model, (torch.randn(4, 8),))


def test_traced_buffer_mutation_is_rejected_without_touching_the_buffer():
    model = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    with pytest.raises(LoweringError, match="running_mean|num_batches_tracked"):
        lower(model, (torch.randn(4, 8),))
    assert int(model.get_buffer("1.num_batches_tracked")) == 0  # fake tracing ran nothing


def test_eval_mode_batchnorm_round_trips():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    x = torch.randn(4, 8)
    (out,) = run_decoded(lower(model, (x,)), [x])
    torch.testing.assert_close(out, model(x))


# ---------------------------------------------------------------------------------------------
# Dynamic shapes


def test_dynamic_batch_dim_marks_the_graph_dynamic_and_runs_at_other_sizes():
    model = mlp(2, 32)
    batch = torch.export.Dim("batch", min=2, max=1024)
    lowered = lower(model, (torch.randn(4, 32),), dynamic_shapes={"input": {0: batch}})
    _, decoded, weights = round_trip(lowered)
    assert decoded.dynamic is True
    assert decoded.input_specs == (InputSpec((None, 32), "float32", "cpu"),)
    for size in (3, 9):
        x = torch.randn(size, 32)
        (out,) = decoded.module(*weights, x)
        torch.testing.assert_close(out, model(x))


def test_symbolic_tracing_marks_the_graph_dynamic():
    def fn(x):
        return x.reshape(x.shape[0] * 2, -1) * x.shape[0]

    lowered = lower(fn, (torch.randn(4, 6),), tracing_mode="symbolic")
    _, decoded, weights = round_trip(lowered)
    assert decoded.dynamic
    x = torch.randn(5, 6)
    torch.testing.assert_close(decoded.module(*weights, x)[0], fn(x))


def test_static_graph_is_not_dynamic():
    _, decoded, _ = round_trip(lower(mlp(1, 8), (torch.randn(2, 8),)))
    assert decoded.dynamic is False


# ---------------------------------------------------------------------------------------------
# Refusals


def test_non_tensor_output_is_rejected():
    with pytest.raises(LoweringError, match="output 1"):
        lower(lambda x: (x + 1, 3), (torch.randn(2),))


def test_non_tensor_input_is_rejected():
    with pytest.raises(LoweringError, match="example input 1"):
        lower(lambda x, n: x * n, (torch.randn(2), 3))


def test_unsupported_graph_kind_is_rejected():
    with pytest.raises(LoweringError, match="cannot lower"):
        lower(42, ())


def test_trace_options_are_refused_for_modules():
    with pytest.raises(LoweringError, match="tracing_mode"):
        lower(mlp(1, 8), (torch.randn(2, 8),), tracing_mode="symbolic")


# ---------------------------------------------------------------------------------------------
# Cost


def test_decoding_a_24_layer_mlp_takes_milliseconds():
    encoded = encode(lower(mlp(24, 512), (torch.randn(16, 512),)))
    decode_graph(encoded.graph_bytes)  # warm the operator cache
    start = time.perf_counter()
    for _ in range(5):
        decode_graph(encoded.graph_bytes)
    per_decode = (time.perf_counter() - start) / 5
    assert per_decode < 0.1, f"decode took {per_decode * 1000:.1f} ms"
