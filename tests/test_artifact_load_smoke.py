"""``benchmarks/artifact_load.py`` on the CPU (inductor's C++ kernels): fresh processes load a
compiled artifact cold and after cgtreed's loader warm-up canary (``daemon.loader_warmup``),
end to end with real artifacts. The figures that matter come from the H200
(docs/PERFORMANCE.md 13.1); here only that each step runs and the warm-up reports its seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_artifact_load_cpu_smoke_run(tmp_path):
    json_path = tmp_path / "artifact_load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "artifact_load.py"), "--device", "cpu", "--repeats", "1",
         "--graphs", "mlp", "--variants", "cold,warmup", "--json", str(json_path), "--profile-dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(json_path.read_text())
    assert set(report["compile"]["compile_s"]) == {"mlp", "canary", "daemon_canary"}
    runs = {run["variant"]: run["phases"] for run in report["runs"]}
    assert set(runs) == {"cold", "warmup"}
    assert runs["warmup"]["warm_loader"] is not None and runs["warmup"]["warm_loader"] > 0  # the canary was found and loaded
    assert all(phases["load"] > 0 and phases["first_call"] >= 0 for phases in runs.values())
    assert (tmp_path / "artifact_load_profile_mlp_0.txt").exists()  # the cold load's cProfile
