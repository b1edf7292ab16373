"""benchmarks/in_place_check.py on the CPU: every size, kind and method gets a row; the batched
rows are measured when a C++ check is there (an emulation of its contract stands in here)."""

from __future__ import annotations

import json

from benchmarks import in_place_check
from cgtree import in_place_inputs


def test_every_row_is_measured_and_the_batched_ones_only_with_a_batched_check(monkeypatch, tmp_path):
    def emulated(tensors, pointers, positions):
        return all(tensors[i].data_ptr() == pointers[i] for i in positions)

    monkeypatch.setattr(in_place_inputs, "_ALL_AT_ADDRESSES", emulated)
    rows = in_place_check.measure("cpu", sizes=(8, 32), iters=20, repeats=2)
    assert {(r["inputs"], r["kind"], r["method"]) for r in rows} == {
        (n, kind, method) for n in (8, 32) for kind in in_place_check.KINDS for method in ("loop", "batched", "first_moved")}
    assert all(r["us"] > 0 and r["ns_per_input"] > 0 for r in rows)

    monkeypatch.setattr(in_place_inputs, "_ALL_AT_ADDRESSES", None)
    out = tmp_path / "check.json"
    assert in_place_check.main(["--device", "cpu", "--sizes", "8", "--iters", "5", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["batched_available"] is False
    assert [r["us"] for r in report["rows"] if r["method"] == "batched"] == [None, None]
