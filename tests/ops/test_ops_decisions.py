"""The pure decisions behind cgtreed's service behaviour, without processes: watchdog timing,
STATUS lines, reload plans, the expandable-segments refusal, the client's re-send rule, and
what cgtreectl draws."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cgtree.client.session import IDEMPOTENT_OPS, resend_after_interruption
from cgtree.config import Config, DaemonConfig, Policy
from cgtree.daemon import ctl, ctl_render
from cgtree.daemon.reloading import plan_reload
from cgtree.daemon.server import StartError, _refuse_expandable_segments, expandable_segments_enabled
from cgtree.daemon.supervision import StatusReporter, Watchdog, status_text

# ---------------------------------------------------------------------------------- watchdog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_watchdog(interval_s):
    clock, pings = FakeClock(), []
    return Watchdog(interval_s, clock=clock, send=lambda: pings.append(clock.now) or True), clock, pings


def test_the_loop_pings_at_half_the_watchdog_interval():
    watchdog, clock, pings = make_watchdog(30.0)
    watchdog.ping_if_due()
    assert pings == [100.0] and watchdog.next_due == 115.0
    clock.now = 114.9
    watchdog.ping_if_due()
    assert len(pings) == 1
    clock.now = 115.0
    watchdog.ping_if_due()
    assert pings == [100.0, 115.0]


def test_keepalive_around_long_steps_pings_unless_one_just_went_out():
    watchdog, clock, pings = make_watchdog(30.0)
    watchdog.keepalive()  # before a long first call
    clock.now += 0.0005
    watchdog.keepalive()  # a replay right after: no datagram
    assert len(pings) == 1
    clock.now += 25.0  # a 25 s compile: the loop could not ping meanwhile
    watchdog.keepalive()  # after it: systemd hears from us within 30 s
    assert pings == [100.0, 125.0005]
    assert watchdog.next_due == pytest.approx(140.0005)


def test_a_short_watchdog_caps_the_keepalive_gap():
    watchdog, clock, pings = make_watchdog(0.4)
    assert watchdog.min_gap_s == pytest.approx(0.05)
    watchdog.keepalive()
    clock.now += 0.06
    watchdog.keepalive()
    assert len(pings) == 2


@pytest.mark.parametrize("interval", [None, 0, -1])
def test_without_a_watchdog_nothing_is_ever_due(interval):
    watchdog, clock, pings = make_watchdog(interval)
    watchdog.ping_if_due()
    watchdog.keepalive()
    assert not watchdog.enabled and pings == [] and watchdog.next_due == float("inf")


def test_status_text_names_endpoint_devices_sessions_and_graphs():
    assert status_text(endpoint="ipc:///run/cgtree/cgtreed.sock", devices=["cuda:0", "cuda:1"], live_sessions=2,
                       parked_sessions=1, graphs=5) == "serving ipc:///run/cgtree/cgtreed.sock on cuda:0, cuda:1: 3 sessions (1 parked), 5 graphs"
    assert status_text(endpoint="e", devices=["cpu"], live_sessions=1, parked_sessions=0, graphs=1) == "serving e on cpu: 1 session, 1 graph"


def test_status_reporter_sends_only_changes():
    sent = []
    reporter = StatusReporter(send=lambda text: sent.append(text) or True)
    reporter.sent("a")  # went out with READY=1
    for text in ("a", "b", "b", "a"):
        reporter.update(text)
    assert sent == ["b", "a"]


# ------------------------------------------------------------------------------------ reload


def config(**daemon) -> Config:
    return Config(policy=Policy(), daemon=DaemonConfig(**daemon))


def test_a_reload_plan_applies_policies_and_logging_and_keeps_start_only_keys():
    running = config(endpoint="ipc:///run/cgtree/cgtreed.sock", devices=("cuda:0",), metrics_port=9470)
    loaded = dataclasses.replace(
        config(endpoint="ipc:///run/cgtree/cgtreed.sock", devices=("cuda:0", "cuda:1"), metrics_port=0, log_level="DEBUG"),
        policy=Policy(skip_warmup=True))
    plan = plan_reload(running, loaded)
    assert set(plan.changed) == {"policy.skip_warmup", "daemon.devices", "daemon.metrics_port", "daemon.log_level"}
    assert set(plan.needs_restart) == {"daemon.devices", "daemon.metrics_port"}
    assert plan.policy_changed and plan.logging_changed
    assert plan.config.policy.skip_warmup is True and plan.config.daemon.log_level == "DEBUG"
    assert plan.config.daemon.devices == ("cuda:0",) and plan.config.daemon.metrics_port == 9470  # kept until restart
    assert plan.applies("daemon.log_level") and not plan.applies("daemon.devices")


def test_an_unchanged_file_changes_nothing():
    plan = plan_reload(config(), config())
    assert plan.changed == () and plan.needs_restart == () and not plan.policy_changed


# ------------------------------------------------------------------------- expandable segments


@pytest.mark.parametrize("environ, enabled", [
    ({}, False),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments : true"}, True),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.8"}, False),
])
def test_expandable_segments_are_detected_in_either_variable(environ, enabled):
    assert expandable_segments_enabled(environ) is enabled


def test_cgtreed_refuses_expandable_segments_on_cuda_devices_with_a_clear_message():
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    with pytest.raises(StartError, match="expandable_segments.*CUDA IPC.*expandable_segments:False"):
        _refuse_expandable_segments(["cuda:0"], environ)
    _refuse_expandable_segments(["cpu"], environ)  # no CUDA, no IPC of pool memory: allowed


# ----------------------------------------------------------------------- client re-send rule


@pytest.mark.parametrize("op, may_have_run, mutates, resend", [
    ("submit", False, True, True),    # refused with "unavailable": it never ran
    ("submit", True, False, True),    # a pure inference graph: running it twice is harmless
    ("submit", True, True, False),    # it writes its inputs: may have run partly
    ("submit", True, None, False),    # unknown counts as mutating
    ("register", True, None, True),   # content-addressed: idempotent
    ("bye", True, None, False),
])
def test_a_request_is_sent_again_after_a_restart_only_when_that_is_safe(op, may_have_run, mutates, resend):
    assert resend_after_interruption(op, may_have_run=may_have_run, mutates_inputs=mutates) is resend


def test_every_protocol_command_but_submit_and_bye_is_idempotent_for_the_client():
    from cgtree.daemon.commands import COMMANDS

    assert set(COMMANDS) - IDEMPOTENT_OPS == {"submit", "bye", "reload"}  # reload is cgtreectl's, not the client's


# ------------------------------------------------------------------------------- cgtreectl


def status_document() -> dict:
    nodes = [
        {"id": 0, "function": "MLP (g1)", "parent": None, "children": [1, 3], "mode": "replayed", "replays": 12},
        {"id": 1, "function": "Head (g2)", "parent": 0, "children": [2], "mode": "recorded", "replays": 0},
        {"id": 2, "function": "Loss (g3)", "parent": 1, "children": [], "mode": "replayed", "replays": 3},
        {"id": 3, "function": "Head (g2)", "parent": 0, "children": [], "mode": "replayed", "replays": 9},
        {"id": 4, "function": "Other (g4)", "parent": None, "children": [], "mode": "replayed", "replays": 1},
    ]
    return {
        "daemon": {"pid": 1, "version": "0.1.0", "protocol": 1, "uptime_s": 5, "endpoint": "ipc:///x"},
        "devices": [{"device": "cuda:0", "backend": "cuda", "graphs": 1, "weights": {"count": 2, "bytes": 2048},
                     "registered": [{"graph": "ab" * 32, "name": "MLP", "kernels": "inductor", "weights": 2, "weight_bytes": 2048, "inputs": 1,
                                     "mutated_inputs": [], "sessions": [3, 4]}]},
                    {"device": "cuda:1", "backend": "cuda", "registered": []}],
        "sessions": [
            {"id": 3, "name": "job", "pid": 42, "uid": 1000, "state": "live", "idle_s": 1.5, "submits": 25, "lane": True,
             "graphs": [{"device": "cuda:0", "graph": "ab" * 32}],
             "devices": {"cuda:0": {"counters": {"warmups": 3, "recordings": 4, "replays": 25}, "tree": {"nodes": nodes}}}},
            {"id": 4, "name": None, "pid": 43, "uid": 1001, "state": "parked", "idle_s": 90.0, "submits": 0, "graphs": [],
             "devices": {"cuda:0": {"counters": {}, "tree": {"nodes": []}}}},
        ],
    }


def test_tree_draws_children_under_their_parent_with_modes_and_replay_counts():
    text = ctl_render.format_tree(status_document(), device="cuda:0", session=3)
    assert text.splitlines() == [
        "cuda:0 (cuda)",
        '  session 3 "job" pid 42: 3 warmups, 4 recordings, 25 replays, 0 skips',
        "    node 0 [replayed x12] MLP (g1)",
        "    |-- node 1 [recorded x0] Head (g2)",
        "    |   `-- node 2 [replayed x3] Loss (g3)",
        "    `-- node 3 [replayed x9] Head (g2)",
        "    node 4 [replayed x1] Other (g4)",
    ]


def test_tree_says_what_is_empty():
    text = ctl_render.format_tree(status_document())
    assert "  session 4 pid 43 (parked): 0 warmups, 0 recordings, 0 replays, 0 skips\n    (no recordings)" in text
    assert "cuda:1 (cuda)\n  (no sessions)" in text


def test_a_node_whose_parent_is_missing_is_still_drawn():
    lines = ctl_render.draw_nodes([{"id": 7, "parent": 99, "children": [], "mode": "replayed", "replays": 1, "function": "f"}])
    assert lines == ["node 7 [replayed x1] f"]


def test_graphs_and_sessions_tables():
    document = status_document()
    graphs = ctl_render.format_graphs(ctl_render.graph_rows(document)).splitlines()
    assert graphs[0].split() == ["DEVICE", "GRAPH", "NAME", "KERNELS", "WEIGHTS", "WEIGHT", "BYTES", "INPUTS", "MUTATES", "SESSIONS"]
    assert graphs[1].split() == ["cuda:0", "ab" * 8, "MLP", "inductor", "2", "2.0", "KiB", "1", "-", "[3,4]"]
    sessions = ctl_render.format_sessions(ctl_render.session_rows(document)).splitlines()
    assert sessions[1].split() == ["3", "job", "42", "1000", "live", "1.5s", "[cuda:0]", "1", "5", "25", "lane"]
    assert sessions[2].split() == ["4", "-", "43", "1001", "parked", "1.5m", "[cuda:0]", "0", "0", "0", "zmq"]


def test_reload_reply_says_what_applied_and_what_needs_a_restart():
    text = ctl_render.format_reload({"config_path": "/etc/cgtree/config.toml", "changed": ["policy.skip_warmup", "daemon.devices"],
                                     "needs_restart": ["daemon.devices"]})
    assert text == "reloaded /etc/cgtree/config.toml: applied policy.skip_warmup; restart to apply daemon.devices"


def test_cgtreectl_exit_codes_usage_2_unreachable_3_and_help_lists_them(tmp_path, capsys):
    assert ctl.main(["no-such-command"]) == ctl.EXIT_USAGE == 2
    absent = f"ipc://{tmp_path}/absent.sock"
    for command in ("status", "tree", "graphs", "sessions", "reload"):
        assert ctl.main(["--endpoint", absent, command]) == ctl.EXIT_UNREACHABLE == 3
    capsys.readouterr()
    assert ctl.main(["--endpoint", absent, "graphs", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "unreachable"
    assert ctl.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for line in ("0  ok", "1  the daemon answered with an error", "2  usage error", "3  the daemon is unreachable"):
        assert line in help_text
