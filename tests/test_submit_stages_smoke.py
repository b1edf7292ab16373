"""benchmarks/submit_stages.py: the stamps of both processes line up into per-stage gaps (the
measuring itself needs CUDA; the alignment is pure and checked here)."""

from __future__ import annotations

from benchmarks.submit_stages import client_sequences, daemon_sequences, stage_table


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
