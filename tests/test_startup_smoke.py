"""``benchmarks/startup.py`` on the CPU: a cgtreed started as systemd would, READY timed on its
notify socket, its start-up phases read from its own log line (``cgtree.daemon.startup``), and
a new client's first requests. The GPU figures come from a GPU host."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgtree.daemon import startup

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_startup_cpu_smoke_run(tmp_path):
    json_path = tmp_path / "startup.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "startup.py"), "--device", "cpu", "--runs", "1",
         "--json", str(json_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run,) = json.loads(json_path.read_text())["runs"]
    assert set(run["phases"]) == {*startup.PHASES, "total"}
    # The daemon's own count and systemd's view of the same start agree to within the
    # notify datagram's trip and the 10 ms resolution of the process start time.
    assert abs(run["phases"]["total"] - run["ready_s"]) < 0.25
    assert run["requests"]["modes"] == ["warmup", "recorded", "replayed"]
    assert all(ms > 0 for ms in run["requests"]["ms"].values())


def test_phases_are_the_gaps_between_the_marks_that_were_made(monkeypatch):
    monkeypatch.setattr(startup, "_marks", {"main": 10.0, "imports": 11.5, "devices": 12.0, "bind": 12.25, "ready": 12.5})
    monkeypatch.setattr(startup, "process_started_monotonic", lambda: 9.9)
    phases = startup.phases()
    assert phases == pytest.approx({"interpreter": 0.1, "imports": 1.5, "devices": 0.5, "bind": 0.25, "ready": 0.25,
                                    "total": 2.6})  # no "config" mark: that phase is left out
    assert startup.summary(phases).startswith("2.60 s after exec (interpreter 0.10, imports 1.50, devices 0.50")
    monkeypatch.setattr(startup, "process_started_monotonic", lambda: None)  # no /proc: no exec-relative phases
    assert "interpreter" not in startup.phases() and "total" not in startup.phases()
