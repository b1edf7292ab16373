"""cgtree.capturability: PyTorch's rule for ops a CUDA graph cannot hold, on run-time calls,
on FX graphs, and through the tree manager (CPU replay: the same decisions as on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from cgtree import Policy
from cgtree.capturability import incompatible_call, incompatible_fx_node
from cgtree.manager import TreeManager
from cgtree.types import ExecutionMode

aten = torch.ops.aten


@pytest.mark.parametrize("op, args, kwargs", [
    (aten.index.Tensor, (torch.randn(4, 5), [torch.tensor([0, 2])]), {}),
    (aten.index.Tensor, (torch.randn(4, 5), [None, torch.tensor([[1], [3]])]), {}),
    (aten.one_hot.default, (torch.tensor([1, 2]), 5), {}),
    (aten.repeat_interleave.Tensor, (torch.tensor([1, 2]),), {"output_size": 3}),
    (aten.index_put_.default, (torch.zeros(4), [torch.tensor([1])], torch.tensor(1.0)), {}),
    (aten.mm.default, (torch.randn(2, 2), torch.randn(2, 2)), {}),
])
def test_calls_with_sizes_fixed_by_their_input_shapes_are_capturable(op, args, kwargs):
    assert incompatible_call(op, args, kwargs) is None


@pytest.mark.parametrize("op, args, kwargs, why", [
    (aten.index.Tensor, (torch.randn(4, 5), [torch.tensor([True, False, True, False])]), {}, "size"),
    (aten.nonzero.default, (torch.randn(4),), {}, "size"),
    (aten.masked_select.default, (torch.randn(4), torch.randn(4) > 0), {}, "size"),
    (aten.one_hot.default, (torch.tensor([1, 2]),), {}, "size"),
    (aten.bincount.default, (torch.tensor([1, 2]),), {}, "size"),
    (aten.index_put_.default, (torch.zeros(4), [torch.zeros(4, dtype=torch.bool)], torch.tensor(1.0)), {}, "mask"),
    (aten._local_scalar_dense.default, (torch.tensor(1.0),), {}, "host"),
    (aten.item.default, (torch.tensor(1.0),), {}, "host"),
])
def test_host_syncs_masks_and_value_dependent_sizes_are_not(op, args, kwargs, why):
    reason = incompatible_call(op, args, kwargs)
    assert reason is not None and why in reason


def _traced(fn, *inputs):
    return make_fx(fn, tracing_mode="symbolic")(*inputs)


def test_fx_rule_reads_unbacked_symbols_not_tags():
    gather = _traced(lambda x, i: x[i], torch.randn(4, 5), torch.tensor([0, 2]))
    masked = _traced(lambda x: x[x > 0], torch.randn(4, 5))
    gather_nodes = [n for n in gather.graph.nodes if n.target is aten.index.Tensor]
    masked_nodes = [n for n in masked.graph.nodes if incompatible_fx_node(n) is not None]
    assert gather_nodes and all(incompatible_fx_node(n) is None for n in gather_nodes)
    assert masked_nodes, "boolean-mask indexing must be refused"


def test_tagged_node_without_a_fake_value_is_refused():
    graph = torch.fx.Graph()
    x, i = graph.placeholder("x"), graph.placeholder("i")
    node = graph.call_function(aten.index.Tensor, (x, [i]))
    graph.output(node)
    assert incompatible_fx_node(node) is not None


def _gather_rows(table, idx):
    return table[idx] * 2


def _masked_rows(table, mask):
    return table[mask] * 2


def test_integer_gather_replays_in_the_tree():
    mgr = TreeManager("cpu", policy=Policy(skip_warmup=False))
    f = mgr.cudagraphify(_gather_rows, (torch.randn(8, 3), torch.tensor([1, 5])))
    table, idx = torch.randn(8, 3), torch.tensor([1, 5])
    for step in range(4):
        idx.copy_(torch.tensor([step, 7 - step]))
        torch.testing.assert_close(f(table, idx), table[idx] * 2)
    assert mgr.counters["skipped_calls"] == 0
    assert mgr.counters["replays"] == 2 and mgr.last_execution.mode is ExecutionMode.REPLAYED


def test_boolean_mask_index_is_skipped_with_its_op_named():
    mgr = TreeManager("cpu", policy=Policy(skip_warmup=False))
    f = mgr.cudagraphify(_masked_rows, (torch.randn(8, 3), torch.ones(8, dtype=torch.bool)))
    table = torch.randn(8, 3)
    for step in range(3):
        mask = torch.arange(8) % (step + 2) == 0
        torch.testing.assert_close(f(table, mask), table[mask] * 2)
    assert mgr.counters["replays"] == 0
    assert mgr.skip_log.counts.get("incompatible op") == 1
    assert "aten.index.Tensor" in mgr.last_execution.skip_reason
