"""benchmarks/bench_transport.py runs and writes its JSON (a smoke test: no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_transport_writes_every_path(tmp_path):
    out = tmp_path / "transport.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_transport.py"), "--iters", "50", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"zmq", "lane-block/block", "lane-spin/block", "lane-block/spin", "lane-spin/spin"}
    assert all(row["p50_us"] > 0 for row in results.values())
    assert "lane-spin/spin" in done.stdout
