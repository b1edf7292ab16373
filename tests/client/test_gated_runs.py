"""Gated doorbell runs on the client's side (``cgtree.client.plans``): the request is rung
first, then the hot plan's inputs are checked, the submit's ``Veto`` runs and the stream is
settled, and only then the verdict lets the daemon launch. A real page (``Doorbell`` and
``ClientDoorbell`` over one memfd); the daemon is a thread doing what
``cgtree.daemon.transports.doorbells`` does with a gated request (its ``LaunchGate``). The CUDA
path (a real plan loop through cgtreed) runs in tests/gpu."""

from __future__ import annotations

import os
import threading
import time
import types

import pytest
import torch

from cgtree.client.doorbell import ClientDoorbell
from cgtree.client.inputs import _identity_marks
from cgtree.client.plans import Miss, Plan, Plans, Veto
from cgtree.daemon.doorbell import ABORTED, REPLAYED, Doorbell, LaunchGate
from cgtree.errors import LaunchVetoed

CPU = types.SimpleNamespace(is_cuda=False, device=torch.device("cpu"))


class FakeDaemon(threading.Thread):
    """Serves one request: takes it, waits at its gate, 'launches' (a recorded event and the
    done word) or acks ABORTED."""

    def __init__(self, page: Doorbell, events: list) -> None:
        super().__init__(daemon=True)
        self.page, self.events = page, events
        self.taken = threading.Event()
        self.start()

    def run(self) -> None:
        while (taken := self.page.take()) is None:
            pass
        seq, _, gated = taken
        self.events.append(("taken", gated))
        self.taken.set()
        try:
            if gated:
                LaunchGate(self.page, seq)()
        except LaunchVetoed:
            self.page.answer(seq, ABORTED)
            return
        self.events.append("launched")
        self.page.signal_done(CPU, seq)
        self.page.answer(seq, REPLAYED, generation=1, device_index=0)


class Lane:
    def __init__(self, doorbell: ClientDoorbell, events: list = None) -> None:
        self.doorbell = doorbell
        self.events = events if events is not None else []
        self.woken = threading.Event()

    def kick(self) -> None:
        self.events.append("kicked")
        self.woken.set()

    def peer_closed(self) -> bool:
        return False


@pytest.fixture
def gated(monkeypatch):
    # Both ends share one interpreter here: the daemon's wait must not run out while the GIL is
    # with the client (the test of a late verdict sets its own bound).
    monkeypatch.setattr("cgtree.daemon.doorbell.GATE_WAIT_MAX_S", 5.0)
    page = Doorbell([])
    page.set_awake(True)
    doorbell = ClientDoorbell(os.dup(page.fd))
    page.handed_over()
    events: list = []
    client = types.SimpleNamespace(
        timeout_s=10.0, session_id=1, events=events,
        connection=types.SimpleNamespace(lane=types.SimpleNamespace(spin_now=1.0), last_reply_at=0.0),
        encoder=types.SimpleNamespace(settle=lambda device: events.append("settled")),
        stream_order=types.SimpleNamespace(enabled=False))
    plans = Plans(client, doorbell=True)
    plan = Plan(plan_id=5, buffer_id=1, slots=[], function="g", packed=b"", overwritten="")
    handle = types.SimpleNamespace(device="cpu")
    mapping = types.SimpleNamespace(handed_out=[], generation=0)
    inputs = [torch.zeros(3), torch.ones(2)]
    yield plans, plan, handle, mapping, Lane(doorbell, events), page, events, inputs
    doorbell.release()
    page.close()


def _submit(gated, veto=None, identity=None):
    plans, plan, handle, mapping, lane, page, events, inputs = gated
    daemon = FakeDaemon(page, events)
    marks = identity if identity is not None else _identity_marks(inputs)
    outcome = plans.submit_rung(handle, plan, lane, mapping, 0.0, None, (marks, inputs), veto)
    daemon.join(5)
    return outcome, daemon


def test_the_checks_run_after_the_ring_and_the_run_launches_after_them(gated):
    events = gated[6]
    seen = []

    def check():  # the daemon can take the request while this runs: it overlaps the daemon's work
        deadline = time.monotonic() + 5
        while ("taken", True) not in events and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.append(("taken", True) in events)
        events.append("vetted")
        return []

    veto = Veto(check)
    outcome, _ = _submit(gated, veto)
    assert outcome == () and seen == [True]
    assert events == [("taken", True), "vetted", "settled", "launched"]


def test_a_veto_keeps_the_run_from_launching_and_comes_back_as_the_answer(gated):
    events = gated[6]
    veto = Veto(lambda: [3])
    outcome, _ = _submit(gated, veto)
    assert outcome is veto and veto.result() == [3]
    assert "launched" not in events and "settled" not in events


def test_other_inputs_than_the_hot_plans_are_never_launched_and_the_veto_is_left_for_later(gated):
    events, inputs = gated[6], gated[7]
    ran = []
    veto = Veto(lambda: ran.append(1))
    other = _identity_marks([torch.zeros(3), inputs[1]])  # another tensor at position 0
    outcome, _ = _submit(gated, veto, identity=other)
    assert outcome is Miss.INPUTS_DIFFER and "launched" not in events and not ran


def test_a_check_that_raises_vetoes_and_is_raised_once_the_request_is_answered(gated):
    page, events = gated[5], gated[6]

    def broken():
        raise RuntimeError("the check broke")

    veto = Veto(broken)
    outcome, _ = _submit(gated, veto)
    assert outcome is veto and "launched" not in events
    with pytest.raises(RuntimeError, match="the check broke"):
        veto.result()  # Client.submit_vetoable raises it
    assert page.take() is None  # answered: nothing left on the page for the next request


def test_a_verdict_later_than_the_daemon_waits_means_the_general_way_and_a_slow_client_backs_off(gated, monkeypatch):
    from cgtree.client.gate_backoff import GateBackoff

    plans, events = gated[0], gated[6]
    plans.gates = GateBackoff(window=4, late_limit=2, retry_after=1)
    monkeypatch.setattr("cgtree.daemon.doorbell.GATE_WAIT_MAX_S", 0.001)
    slow = threading.Event()

    for attempt in range(2):
        outcome, daemon = _submit(gated, Veto(lambda: slow.wait(0.2) and []))
        assert outcome is Miss.GATE_LATE and "launched" not in events
        assert plans.gates.gating is (attempt == 0)
    # Backing off: the next hot run (through submit_planned) checks before it rings, ungated.
    plan, handle, mapping, lane, page, inputs = gated[1], gated[2], gated[3], gated[4], gated[5], gated[7]
    plans.client.connection.check_daemon_before_send = lambda *args: None
    plans.client.connection.lane.attached = lane
    plans.client.buffers = types.SimpleNamespace(mappings={plan.buffer_id: mapping})
    events.clear()
    daemon = FakeDaemon(page, events)
    outcome = plans.submit_planned(handle, plan, 0.0, identity=(_identity_marks(inputs), inputs),
                                   veto=Veto(lambda: events.append("checked") or []))
    daemon.join(5)
    assert outcome == () and events == ["checked", "settled", ("taken", False), "launched"]
    assert plans.gates.gating and plans.gates.describe()["late"] == 2 and plans.gates.backoffs == 1  # gates again


def test_a_settle_that_fails_vetoes_and_is_raised_after_the_answer(gated):
    plans, page, events = gated[0], gated[5], gated[6]

    def failing(device):
        raise RuntimeError("the stream is broken")

    plans.client.encoder.settle = failing
    with pytest.raises(RuntimeError, match="the stream is broken"):
        _submit(gated, Veto(lambda: []))
    assert "launched" not in events and page.take() is None


@pytest.mark.parametrize("miss", [None, Miss.INPUTS_DIFFER, Miss.GATE_LATE], ids=["plan-gone", "other-inputs", "late"])
def test_a_hot_plan_run_that_did_not_run_leaves_the_submit_to_the_general_path(cgtreed, monkeypatch, miss):
    """``Client._submit_once`` over a hot plan's outcomes (plans need CUDA output buffers, so
    the hot entry and its outcome are put in place here): every miss submits the general way and
    returns its outputs; only a gone plan is forgotten. A veto comes back as the answer, unsent."""
    from cgtree.client import Client

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).eval()
    x = torch.randn(4, 8)
    with Client(cgtreed.endpoint, timeout_s=30) as client, torch.no_grad():
        handle = client.register(model, [x])
        client.submit(handle, [x])
        key = (handle.device, handle.graph_id)
        plan = Plan(plan_id=5, buffer_id=1, slots=[], function="g", packed=b"", overwritten="")
        client.plans.hot[key] = (_identity_marks([x]), plan)
        offered = []
        monkeypatch.setattr(client.plans, "submit_planned",
                            lambda *args, **kwargs: offered.append(kwargs) or (kwargs["veto"] if kwargs["veto"] else miss))
        (out,) = client.submit(handle, [x])
        torch.testing.assert_close(out, model(x))
        assert offered[0]["identity"][1] == [x] and offered[0]["veto"] is None
        assert (key in client.plans.hot) is (miss is not None)
        client.plans.hot[key] = (_identity_marks([x]), plan)
        submits = client.status(session_only=True)["sessions"][0]["submits"]
        assert client.submit_vetoable(handle, [x], lambda: ["weight 0"]) == (None, ["weight 0"])
        assert client.status(session_only=True)["sessions"][0]["submits"] == submits  # nothing was sent


def test_a_sleeping_daemon_is_rung_and_kicked_at_once_not_sent_the_plan_on_the_lane(gated):
    """A client that calls less often than the daemon spins finds its loop asleep. The hot run
    still goes through the page: rung, then one kick before the checks (the daemon's wake-up
    overlaps them), never a plan request on the lane (this client has no lane exchange to
    send one with), and it launches once the checks passed."""
    plans, plan, handle, mapping, lane, page, events, inputs = gated
    page.set_awake(False)
    plans.client.connection.check_daemon_before_send = lambda *args: None
    plans.client.connection.lane.attached = lane
    plans.client.buffers = types.SimpleNamespace(mappings={plan.buffer_id: mapping})

    class SleepingDaemon(FakeDaemon):
        def run(self) -> None:
            assert lane.woken.wait(5), "never kicked"
            page.set_awake(True)
            super().run()

    daemon = SleepingDaemon(page, events)
    outcome = plans.submit_planned(handle, plan, 0.0, identity=(_identity_marks(inputs), inputs),
                                   veto=Veto(lambda: events.append("checked") or []))
    daemon.join(5)
    assert outcome == ()
    assert events.count("kicked") == 1 and events.index("kicked") < events.index("checked") < events.index("launched")
    assert events[-1] == "launched" and ("taken", True) in events
