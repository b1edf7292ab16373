"""``benchmarks/chaos.py`` on the CPU: two client processes in a submit loop, cgtreed SIGKILLed
after 2 s and started again 0.5 s after its exit (as systemd would). No result may be wrong and
every client must be served again by the new daemon; how fast is measured, not asserted (a
loaded 2-core CI host). The H200 figures come from ``scripts/gpu_check.sh``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_chaos_cpu_smoke_run(tmp_path):
    json_path = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "chaos.py"), "--device", "cpu", "--smoke",
         "--recovery-timeout", "90", "--json", str(json_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,  # ~20 s alone
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(json_path.read_text())
    workdir = report["config"]["workdir"]
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if workdir in " ".join(p.info["cmdline"] or [])]
    assert not left, "chaos.py left a daemon or a client running"
    assert report["ok"], report["failed"]
    assert len(report["starts"]) == 2 and all(start["ready_s"] > 0 for start in report["starts"])
    (kill,) = report["kills"]
    assert kill["exit_s"] is not None and kill["restart"]["pid"] != kill["pid"]
    assert [row["recovered"] for row in kill["clients"]] == [True, True]
    assert all(row["recovery_s"] is not None and row["outage_s"] > 0 for row in kill["clients"])
    assert all(row["noticed_s"] is not None and 0 <= row["noticed_s"] <= row["outage_s"] for row in kill["clients"])
    clients = report["clients"]
    assert len(clients) == 2 and sum(row["wrong"] for row in clients) == 0
    assert all(row["ok"] > 0 and row["finished"] for row in clients)
    assert "| client | noticed after kill (s) | recovery after READY (s) |" in (tmp_path / "chaos.md").read_text()
