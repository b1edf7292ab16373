"""benchmarks/submit_stages.py: the stamps of both processes line up into per-stage gaps (the
measuring itself needs CUDA; the alignment is pure and checked here)."""

from __future__ import annotations

import pytest

from benchmarks.submit_stages import (CLIENT_STAMPS, DAEMON_STAMPS, LANE_DAEMON_STAMPS, ORDER, TREE_STAMPS,
                                      client_sequences, daemon_sequences, resolve, stage_table)


def _client(start: int) -> list:
    return [("submit", start), ("plan_run", start + 2_000), ("request_sent", start + 5_000),
            ("reply_received", start + 40_000), ("plan_run_done", start + 45_000), ("submit_done", start + 46_000),
            ("caller_synced", start + 50_000)]


def _daemon(start: int) -> list:
    # A wake-up with nothing to read comes first: only the one before the dispatch counts.
    return [("daemon_woke", start), ("daemon_woke", start + 8_000), ("read_start", start + 9_000),
            ("read_done", start + 10_000), ("plan_dispatch", start + 11_000), ("run_plan", start + 12_000),
            ("replay_launched", start + 20_000), ("synchronized", start + 30_000), ("run_plan_done", start + 31_000),
            ("send_start", start + 32_000), ("send_done", start + 33_000)]


def test_stamps_of_both_processes_align_into_gaps():
    client = client_sequences(_client(0) + _client(100_000))
    daemon = daemon_sequences(_daemon(0) + _daemon(100_000))
    assert len(client) == len(daemon) == 2
    rows = {row["gap"]: row for row in stage_table(client, daemon)}
    assert rows["request_sent -> daemon_woke"]["p50_us"] == 3.0  # the later wake-up, not the idle one
    assert rows["replay_launched -> synchronized"]["p50_us"] == 10.0
    assert rows["send_done -> reply_received"]["p50_us"] == 7.0
    assert rows["whole call (submit -> caller_synced)"]["p50_us"] == 50.0
    assert all(row["n"] == 2 for row in rows.values())


def test_doorbell_and_in_process_stamps_start_at_the_call():
    client = [("call", 0), ("graph_call", 1_000), ("submit", 3_000), ("plan_run", 4_000), ("rung", 6_000),
              ("acked", 30_000), ("outputs_built", 33_000), ("done_seen", 400_000), ("plan_run_done", 401_000),
              ("submit_done", 402_000), ("graph_done", 403_000), ("call_done", 405_000), ("caller_synced", 410_000)]
    daemon = [("daemon_woke", 7_000), ("rung_taken", 8_000), ("plan_dispatch", 9_000), ("run_plan", 10_000),
              ("tree_call", 12_000), ("replay_start", 20_000), ("replay_launched", 25_000), ("signal_start", 25_500),
              ("signalled", 28_000), ("run_plan_done", 28_500), ("answered", 29_000)]
    rows = {row["gap"]: row for row in stage_table(client_sequences(client), daemon_sequences(daemon))}
    assert rows["rung -> daemon_woke"]["p50_us"] == 1.0
    assert rows["tree_call -> replay_start"]["p50_us"] == 8.0
    assert rows["answered -> acked"]["p50_us"] == 1.0
    assert rows["whole call (call -> caller_synced)"]["p50_us"] == 410.0

    in_process = [("call", 0), ("tree_call", 5_000), ("replay_start", 15_000), ("replay_launched", 20_000),
                  ("call_done", 24_000), ("caller_synced", 300_000)] * 2
    rows = {row["gap"]: row for row in stage_table(client_sequences(in_process), [])}
    assert rows["tree_call -> replay_start"] == {"gap": "tree_call -> replay_start", "p50_us": 10.0, "mean_us": 10.0, "n": 2}
    assert rows["whole call (call -> caller_synced)"]["p50_us"] == 300.0


@pytest.mark.parametrize("entry", CLIENT_STAMPS + DAEMON_STAMPS + LANE_DAEMON_STAMPS + TREE_STAMPS, ids=lambda e: e[0])
def test_every_stamped_function_exists_and_its_stages_are_ordered(entry):
    # A renamed method would otherwise fail only on a GPU host, when the script runs there.
    target, before, after, *_ = entry
    owner, name = resolve(target)
    assert callable(getattr(owner, name))
    assert {stage for stage in (before, after) if stage} <= set(ORDER)


def test_a_missing_target_is_named():
    with pytest.raises(AttributeError, match="Client.no_such_method"):
        resolve("cgtree.client.client:Client.no_such_method")
