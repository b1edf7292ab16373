"""benchmarks/bench_registration.py runs end to end on the CPU (smoke mode: tiny model, the
daemon's default compile on CPU): both client processes, the restart, the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_registration.py"


def test_bench_registration_smoke(tmp_path):
    out = tmp_path / "reg.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--idle-s", "0.5", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["stall"]["idle_calls"] > 0 and report["stall"]["during_calls"] > 0
    for row in (report["cold"], report["restart"]):
        assert row["modes"][-1] == "replayed" and row["max_abs_err"] < 1e-3
    assert "p99 during / idle" in done.stdout
