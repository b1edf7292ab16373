"""The gating policy of a client's hot plan runs (``cgtree.client.gate_backoff``): back off when
gated runs are late often, not when they were late a few times over a long life, and try again."""

from __future__ import annotations

import pytest

from cgtree.client.gate_backoff import GateBackoff


def _run(policy: GateBackoff, late: bool) -> bool:
    """One hot run: gated if the policy allows, its outcome recorded; whether it was gated."""
    if not policy.allows():
        return False
    policy.record(late)
    return True


def test_late_runs_spread_over_a_long_life_never_stop_gating():
    policy = GateBackoff(window=64, late_limit=16)
    for run in range(10_000):
        assert _run(policy, late=run % 100 == 0)  # 100 late verdicts in all, one in a hundred
    assert policy.gating and policy.late_total == 100 and policy.backoffs == 0


def test_a_burst_of_late_runs_backs_off_then_gating_is_tried_again():
    policy = GateBackoff(window=8, late_limit=3, retry_after=5)
    assert [policy.record(True) for _ in range(3)] == [False, False, True]
    assert not policy.gating and policy.describe()["ungated_left"] == 5
    assert [policy.allows() for _ in range(6)] == [False] * 5 + [True]  # five runs check before ringing
    assert policy.gating and policy.describe()["late_in_window"] == 0  # a clean window
    assert not policy.record(True) and not policy.record(True)  # the old lates do not count again
    assert policy.describe() == {"gating": True, "late": 5, "backoffs": 1, "late_in_window": 2, "ungated_left": 0}


def test_on_time_runs_push_old_late_ones_out_of_the_window():
    policy = GateBackoff(window=4, late_limit=2)
    assert not policy.record(True)
    for _ in range(4):
        assert not policy.record(False)
    assert not policy.record(True) and policy.gating  # the first late run left the window


def test_a_limit_outside_the_window_is_refused():
    with pytest.raises(ValueError, match="late_limit must be in 1..window"):
        GateBackoff(window=4, late_limit=5)
