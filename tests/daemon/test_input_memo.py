"""The daemon's memo of decoded submit inputs (``cgtree.daemon.input_memo``)."""

from cgtree.daemon.input_memo import MAX_ENTRIES_PER_GRAPH, InputMemo, memoizable


def test_only_cuda_and_scalar_descriptor_lists_are_memoizable():
    assert memoizable([{"kind": "cuda"}, {"kind": "scalar", "value": 2}])
    assert memoizable([])
    assert not memoizable([{"kind": "cuda"}, {"kind": "cpu"}])  # new frames every request
    assert not memoizable([{"kind": "output"}])  # valid for one buffer generation only
    assert not memoizable(["not a map"])


def test_entries_are_per_graph_and_least_recently_used_go_first():
    memo = InputMemo()
    memo.put("g1", b"a", "decoded a")
    memo.put("g2", b"a", "other graph")
    assert memo.get("g1", b"a") == "decoded a"
    assert memo.get("g2", b"a") == "other graph"
    assert memo.get("g1", b"b") is None
    for i in range(MAX_ENTRIES_PER_GRAPH):
        memo.put("g1", bytes([i]), i)
        memo.get("g1", b"a")  # keep "a" recent
    assert memo.get("g1", b"a") == "decoded a"
    assert memo.get("g1", bytes([0])) is None  # evicted
    assert len(memo) == MAX_ENTRIES_PER_GRAPH + 1
    memo.forget("g1")
    assert memo.get("g1", b"a") is None and memo.get("g2", b"a") == "other graph"
    memo.forget()
    assert len(memo) == 0
