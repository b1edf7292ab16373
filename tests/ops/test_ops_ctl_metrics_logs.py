"""One cgtreed with a known workload, seen from outside the way operators see it: cgtreectl
(tree, graphs, sessions, reload; text and --json; exit codes), the Prometheus endpoint
(scraped after the submits) and JSON log lines carrying request ids."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from cgtree.client import Client
from cgtree.daemon import ctl

pytest.importorskip("prometheus_client")

CONFIG = """
[daemon]
max_message_bytes = 4194304
reap_interval_s = 0.2
shutdown_timeout_s = 10.0
log_level = "INFO"
log_format = "json"
metrics_port = {port}

[policy]
capture_sizes = [2]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def workload(daemon_tools):
    """The daemon, its metrics port, and a live client that made 5 submits: batch 2 warms up,
    records, replays twice; batch 3 runs without graphs (not in capture_sizes)."""
    port = free_port()
    daemon = daemon_tools.DaemonProcess(daemon_tools.short_tmpdir(), CONFIG.format(port=port))
    daemon.start()
    client = Client(daemon.endpoint, timeout_s=30, session="ops")
    try:
        model = tiny_mlp()
        modes = []
        for batch in (2, 2, 2, 2, 3):
            x = torch.randn(batch, 8)
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
            modes.append(client.last_execution["mode"])
        assert modes == ["warmup", "recorded", "replayed", "replayed", "skipped"]
        time.sleep(0.5)  # housekeeping turns: gauges and STATUS
        yield daemon, port, client
    finally:
        client.close()
        daemon.kill()


def run_ctl(capsys, daemon, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = ctl.main(["--endpoint", daemon.endpoint, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tree_shows_each_node_with_mode_and_replays(workload, capsys):
    daemon, _, client = workload
    code, out, _ = run_ctl(capsys, daemon, "tree")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "cpu (cpu-replay)"
    assert lines[1] == f'  session {client.session_id} "ops" pid {os.getpid()}: 1 warmups, 1 recordings, 2 replays, 1 skips'
    assert re.fullmatch(r"    node 0 \[replayed x2\] Sequential \(g[0-9a-f]{12}\)", lines[2])
    code, out, _ = run_ctl(capsys, daemon, "tree", "--json")
    session = json.loads(out)["devices"][0]["sessions"][0]
    assert code == 0 and session["id"] == client.session_id
    assert [(n["id"], n["mode"], n["replays"]) for n in session["nodes"]] == [(0, "replayed", 2)]


def test_graphs_lists_id_name_weights_and_sessions(workload, capsys):
    daemon, _, client = workload
    code, out, _ = run_ctl(capsys, daemon, "graphs")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert sorted(row[2] for row in rows) == ["Sequential", "Sequential"]  # batch 2 and batch 3: two graphs
    # KERNELS: the CPU backend's default (daemon.compile "auto") keeps ATen's
    assert all(row[0] == "cpu" and row[3] == "aten" and row[4] == "4" and row[-1] == f"[{client.session_id}]" for row in rows)
    code, out, _ = run_ctl(capsys, daemon, "--json", "graphs")
    graphs = json.loads(out)["graphs"]
    assert {g["name"] for g in graphs} == {"Sequential"} and all(g["sessions"] == [client.session_id] for g in graphs)
    assert all(g["weights"] == 4 and g["mutated_inputs"] == [] and len(g["graph"]) == 64 for g in graphs)
    assert all(g["kernels"] == "aten" and g["kernels_note"] == "daemon.compile auto" for g in graphs)


def test_sessions_lists_id_name_pid_devices_graphs_idle_and_state(workload, capsys):
    daemon, _, client = workload
    code, out, _ = run_ctl(capsys, daemon, "sessions")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["SESSION", "NAME", "PID", "UID", "STATE", "IDLE", "DEVICES", "GRAPHS", "NODES", "SUBMITS", "TRANSPORT"]
    fields = row.split()
    assert fields[:5] == [str(client.session_id), "ops", str(os.getpid()), str(os.getuid()), "live"]
    assert fields[6:] == ["[cpu]", "2", "1", "5", "lane"]
    code, out, _ = run_ctl(capsys, daemon, "sessions", "--json")
    (session,) = json.loads(out)["sessions"]
    assert session["id"] == client.session_id and session["devices"] == ["cpu"] and session["state"] == "live"
    assert len(session["graphs"]) == 2 and session["idle_s"] >= 0 and session["transport"] == "lane"


def test_reload_applies_a_good_file_and_rejects_a_bad_one_with_exit_1(workload, capsys):
    daemon, _, _ = workload
    good = Path(daemon.config_path).read_text()
    try:
        Path(daemon.config_path).write_text(good.replace("capture_sizes = [2]", "capture_sizes = [0]"))
        code, out, err = run_ctl(capsys, daemon, "reload")
        assert code == 1 and out == ""
        assert "reload_failed" in err and "policy.capture_sizes" in err and "running configuration is kept" in err
        code, out, _ = run_ctl(capsys, daemon, "reload", "--json")
        assert code == 1 and json.loads(out)["error"]["code"] == "reload_failed"

        Path(daemon.config_path).write_text(good.replace("capture_sizes = [2]", "capture_sizes = [2, 4]"))
        code, out, _ = run_ctl(capsys, daemon, "reload", "--json")
        assert code == 0
        assert json.loads(out)["changed"] == ["policy.capture_sizes"] and json.loads(out)["needs_restart"] == []
    finally:
        Path(daemon.config_path).write_text(good)
        assert run_ctl(capsys, daemon, "reload")[0] == 0


def test_the_installed_entry_point_exits_3_when_the_daemon_is_unreachable(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cgtree.daemon.ctl", "--endpoint", f"ipc://{tmp_path}/gone.sock", "tree"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "does not exist" in result.stderr


def test_metrics_endpoint_counts_the_workload(workload):
    _, port, _ = workload
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(series: str) -> float:
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
        assert match, f"{series} not exposed:\n{text}"
        return float(match.group(1))

    assert value("cgtree_submits_total") == 5
    assert value("cgtree_warmups_total") == 1
    assert value("cgtree_recordings_total") == 1
    assert value("cgtree_replays_total") == 2
    assert value('cgtree_skips_total{reason="capture_sizes"}') == 1
    assert value("cgtree_submit_latency_seconds_count") == 5
    assert value('cgtree_submit_latency_seconds_bucket{le="+Inf"}') == 5
    assert value('cgtree_pool_bytes{device="cpu"}') > 0
    assert value("cgtree_sessions") == 1


def test_json_log_lines_carry_the_request_id_of_the_request_they_are_about(workload):
    daemon, _, client = workload
    entries = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]  # every line is JSON
    assert {"ts", "level", "logger", "msg"} <= set(entries[0])
    registered = [e for e in entries if re.match(r"graph Sequential \(g[0-9a-f]{12}\) registered on cpu", e["msg"])]
    assert len(registered) == 2
    assert all(e.get("request_id") and e.get("session") == f"s{client.session_id}(ops)" for e in registered)
    served = [e for e in entries if e["msg"].startswith("metrics served on http://127.0.0.1:")]
    assert served and "request_id" not in served[0]  # not about a request: no id
