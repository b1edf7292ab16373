"""``benchmarks/bench_daemon.py`` keeps working on a machine without a GPU: in smoke mode it
starts its own cgtreed (CPU replay backend), times submits with CPU inputs beside eager, writes
a JSON report with numbers in the daemon rows, and leaves no daemon behind. The real numbers
come from a GPU host (``scripts/gpu_check.sh``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bench_daemon_cpu_smoke_run(tmp_path, daemon_tools):
    json_path, md_path = tmp_path / "bench_daemon.json", tmp_path / "bench_daemon.md"
    # bench_daemon.py's work dirs are /tmp/cgtb-*
    def _bench_daemons() -> set[int]:
        return daemon_tools.processes_with("cgtree.daemon.main", "ipc:///tmp/cgtb-")

    before = _bench_daemons()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_daemon.py"), "--device", "cpu", "--quick",
         "--sections", "latency", "--json", str(json_path), "--md", str(md_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,  # ~12 s alone; a loaded 2-core host is slower
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not _bench_daemons() - before, "bench_daemon left a cgtreed running"

    report = json.loads(json_path.read_text())
    assert report["benchmark"] == "daemon" and report["ok"], report.get("failed")
    assert list(report["sections"]) == ["latency"]
    models = report["sections"]["latency"]["models"]
    assert {"tiny", "mlp24"} <= set(models)
    for name, data in models.items():
        rows = data["paths"]
        for path in ("eager", "daemon-cpu"):
            assert rows[path]["status"] == "ok", (name, path, rows[path])
            assert rows[path]["sync"]["p50_us"] > 0 and rows[path]["sync"]["p99_us"] >= rows[path]["sync"]["p50_us"]
            assert rows[path]["async_mean_us"] > 0
            assert rows[path]["max_rel_err"] <= report["config"]["max_rel_err"]
        # The daemon really replayed a recording (not an eager fallback) on its CPU backend.
        details = rows["daemon-cpu"]["details"]
        assert details["last_execution"]["mode"] == "replayed"
        assert details["counters"]["replays"] > 0
        for path in ("reduce-overhead", "daemon-ipc"):
            assert rows[path]["status"] == "n/a" and rows[path]["note"] == "needs CUDA"
        assert data["ratios"]["daemon-cpu/eager"]["sync_p50"] > 0
    # No CUDA here: latency targets are reported, not evaluated.
    assert {t["status"] for t in report["targets"]} == {"n/a"}
    assert "| daemon-cpu |" in md_path.read_text()


def test_bench_daemon_cpu_coldstart_clients_register_from_the_graph_cache(tmp_path):
    """The cold-start rows run the public API with CGTREE_GRAPH_CACHE: the registering client
    lowers and writes the entry, the later clients hit it and register the same graph; the
    uncached client lowers (make_fx)."""
    json_path, md_path = tmp_path / "bench_daemon.json", tmp_path / "bench_daemon.md"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_daemon.py"), "--device", "cpu", "--quick",
         "--sections", "coldstart", "--json", str(json_path), "--md", str(md_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(json_path.read_text())["sections"]["coldstart"]["models"]["tiny"]["paths"]
    expected = {"registering-client": "miss", "daemon-new-session": "hit", "daemon-new-session-uncached": "off",
                "daemon-named-session": "hit"}
    for key, outcome in expected.items():
        row = rows[key]
        assert row["status"] == "ok" and not row.get("note"), (key, row)
        assert (row["lowering"]["route"], row["lowering"]["graph_cache"]) == ("make_fx", outcome), (key, row)
        assert row["graph_id"] == rows["registering-client"]["graph_id"]
        assert set(row["breakdown_ms"]) == {"client", "lower_encode", "hello_register", "submit"}
    # A hit costs a fraction of lowering, whatever the machine.
    assert rows["daemon-new-session"]["breakdown_ms"]["lower_encode"] < \
        0.5 * rows["daemon-new-session-uncached"]["breakdown_ms"]["lower_encode"]
    assert "daemon-new-session [make_fx, cache hit]" in md_path.read_text()
