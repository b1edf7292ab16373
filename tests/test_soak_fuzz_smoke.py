"""``benchmarks/soak_fuzz.py`` runs end to end on a machine without a GPU: a few hundred fuzzed
messages over every channel against its own CPU daemon while its well-behaved client submits;
it writes a JSON report in which nothing was found, and leaves no process behind. The 10^5
message soak is run by hand (``--messages 100000``; the report of issue 14 has the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_soak_fuzz_cpu_smoke_run(tmp_path, daemon_tools):
    json_path, md_path = tmp_path / "soak.json", tmp_path / "soak.md"
    before = daemon_tools.processes_with("/tmp/cgtf-")  # soak_fuzz.py's work dirs
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "soak_fuzz.py"), "--device", "cpu", "--messages", "400",
         "--json", str(json_path), "--md", str(md_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,  # ~25 s alone on 2 cores
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not daemon_tools.processes_with("/tmp/cgtf-") - before, "soak_fuzz left a process running"
    report = json.loads(json_path.read_text())
    assert report["benchmark"] == "soak_fuzz" and report["ok"] and not report["findings"]
    assert report["messages_sent"] >= 400
    assert set(report["channels"]) == {"envelope", "body", "lane", "handshake", "doorbell", "flood"}
    assert all(row["cases"] > 0 for name, row in report["channels"].items() if name != "flood")
    assert report["good_client"]["submits"] > 200 and report["good_client"]["mismatches"] == 0
    assert report["daemon"]["exit_status"] == 0 and report["daemon"]["internal_errors"] == 0
    assert "| body |" in md_path.read_text()
