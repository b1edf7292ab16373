"""benchmarks/doorbell_latency.py on the CPU: every row is measured through a real page shared
with a child process (the CUDA rows run on a GPU host)."""

from __future__ import annotations

import platform

import pytest

from benchmarks.doorbell_latency import measure


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="doorbells are x86-64 only")
def test_the_cpu_rows_are_measured_through_a_shared_page():
    rows = measure("cpu", 40)
    assert set(rows) == {"signal cost", "seen by the other process", "page round trip"}
    assert all(row["n"] == 40 for row in rows.values())
    assert rows["page round trip"]["p50_us"] > 0  # a store, the child's answer, seen here
