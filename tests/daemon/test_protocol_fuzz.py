"""Property-based fuzzing of every channel cgtreed listens on (hypothesis; issue 14), against a
real CPU daemon with doorbells on: ZeroMQ envelopes, the bodies of every command, lane
datagrams (prepared-submit requests and kicks included), lane handshakes, doorbell pages written
by a hostile client, and floods of requests nobody reads. The generators and checks live in
``benchmarks/hostile.py``, shared with the soak (``benchmarks/soak_fuzz.py``, 10^5 messages).

Hypothesis draws a seed per example (derandomized: the same examples on every run) for a
``random.Random`` the shared generators use with the weights they were written for; a failure
prints the case. Properties, after every example: the daemon answered what the protocol answers, in time, with
a well-formed reply echoing the request id and a clear error code, never ``internal``
(``hostile.Outcome.problems`` lists what broke); and a well-behaved client submitting alongside
still gets eager's results. Bounded for CI (derandomized, a few seconds per channel); what it
found is pinned in ``test_fuzz_findings.py``.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.hostile import GENERATORS, Hostile  # noqa: E402
from cgtree.client import Client  # noqa: E402

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CONFIG = f"""
[daemon]
max_message_bytes = {MAX_MESSAGE_BYTES}
reap_interval_s = 0.2
log_level = "INFO"
doorbell = "on"
"""


SEEDS = st.integers(min_value=0, max_value=2**64 - 1).map(random.Random)


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class GoodClient:
    """The well-behaved client: a named session, a model, eager's answer to compare with."""

    def __init__(self, endpoint: str) -> None:
        torch.manual_seed(11)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).eval()
        self.client = Client(endpoint, session="good", timeout_s=60)
        self.submits = 0

    def check(self) -> None:
        x = torch.randn(4, 8)
        with torch.no_grad():
            (out,) = self.client.submit(self.model, [x])
            torch.testing.assert_close(out, self.model(x))
        self.submits += 1


@pytest.fixture(scope="module")
def fuzzed(daemon_tools):
    daemon = daemon_tools.DaemonProcess(daemon_tools.short_tmpdir(), CONFIG)
    hostile = good = None
    try:
        daemon.start()
        hostile = Hostile(daemon.endpoint, max_message_bytes=MAX_MESSAGE_BYTES, reply_timeout_s=30.0)
        target = hostile.setup()
        good = GoodClient(daemon.endpoint)
        good.check()
        yield types.SimpleNamespace(daemon=daemon, hostile=hostile, target=target, good=good)
    finally:
        if good is not None:
            good.client.close()
        if hostile is not None:
            hostile.close()
        daemon.kill()


def fuzz_one(fuzzed, channel: str, rnd) -> None:
    case = GENERATORS[channel](rnd, fuzzed.target)
    outcome = fuzzed.hostile.run(case)
    assert not outcome.problems, f"{case.describe()}\n" + "\n".join(outcome.problems)
    assert fuzzed.daemon.alive(), fuzzed.daemon.log()[-3000:]
    fuzzed.good.check()


def channel_test(channel: str, examples: int):
    """A test fuzzing ``channel`` with ``examples`` derandomized examples."""

    @fuzz_settings(examples)
    @given(rnd=SEEDS)
    def test(fuzzed, rnd):
        if channel == "doorbell" and fuzzed.hostile.words is None and fuzzed.hostile.lane is not None:
            pytest.skip("the daemon offers no doorbell here (not x86-64)")
        fuzz_one(fuzzed, channel, rnd)

    return test


test_envelopes = channel_test("envelope", 150)
test_bodies_of_every_command = channel_test("body", 300)
test_lane_datagrams_plan_requests_and_kicks = channel_test("lane", 200)
test_lane_handshakes = channel_test("handshake", 100)
test_doorbell_pages_written_by_a_hostile_client = channel_test("doorbell", 150)
test_floods_nobody_reads = channel_test("flood", 12)


def test_after_all_that_the_daemon_serves_and_logged_no_traceback(fuzzed):
    fuzzed.good.check()
    assert fuzzed.good.submits > 800
    status = fuzzed.good.client.status()
    assert status["daemon"]["counters"]["internal_errors"] == 0
    assert len(status["sessions"]) <= 12  # the hostile client's identities are bounded, and so are its sessions
    assert "Traceback" not in fuzzed.daemon.log()
