"""Two users against one daemon: a client running as another uid cannot adopt, inspect or use
another user's session (issue 14). The daemon runs as root; Alice (uid 65534, ``nobody``) and
Bob (uid 65533, no passwd entry needed) are client processes that drop to their uid after their
imports (the interpreter may live where only root can read, e.g. ``/root/.pyenv``): the kernel
records a socket's credentials when it connects, which is what the daemon goes by.

Skipped unless the tests run as root (CI does). The pure rules: ``test_tenancy.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cgtree.daemon import ctl

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root: runs clients as two other uids")

ALICE, BOB = 65534, 65533
STEP_TIMEOUT_S = 120.0

# Every script: imports, the user's model lowered and encoded, then the drop to its uid.
PRELUDE = """
import json, os, sys
import msgpack, torch, zmq
from cgtree.client import Client
from cgtree.client.lowering import encode, lower
from cgtree.daemon import ctl

ENDPOINT, UID, SEED = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(SEED)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
x = torch.randn(2, 4)
encoded = encode(lower(model, [x]))
os.setgroups([])
os.setgid(UID)
os.setuid(UID)

def say(**fields):
    print(json.dumps(fields), flush=True)

def check(out):
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))

class Raw:
    '''The protocol by hand, with a routing id of our choosing.'''
    def __init__(self, routing_id=None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(ENDPOINT)

    def request(self, op, body, *frames):
        self.sock.send_multipart([msgpack.packb({"v": 1, "id": 1, "op": op, "body": body}, use_bin_type=True), *frames])
        assert self.sock.poll(30000), f"no reply to {op}"
        envelope = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
        return envelope.get("body"), (envelope.get("error") or {}).get("code")
"""

ALICE_FIRST = PRELUDE + """
client = Client(ENDPOINT, session="train", timeout_s=30)
for _ in range(3):
    (out,) = client.submit(encoded, [x])
check(out)
say(session=client.session_id, graph=encoded.graph_id, routing_id=client.connection.zmq.routing_id.decode(),
    lane=client.lane_attached, mode=client.last_execution["mode"])
sys.stdin.readline()  # Bob probes meanwhile
(out,) = client.submit(encoded, [x])
check(out)
say(mode=client.last_execution["mode"], sessions=[s["id"] for s in client.status()["sessions"]])
os._exit(0)  # no bye: the named session is parked, warm
"""

BOB_SCRIPT = PRELUDE + """
alice = json.loads(sys.argv[4])
found = {}
# Alice's routing id (it is secret, but suppose it leaked): nothing of her session can be touched.
hijack = Raw(alice["routing_id"].encode())
found["hijack"] = {op: hijack.request(op, body)[1] for op, body in [
    ("bye", {}), ("release", {"device": "cpu", "graph": None}), ("reset", {}),
    ("hello", {"pid": os.getpid(), "name": "train"}), ("status", {})]}
hijack.sock.close(0)
# Her session's name gives Bob a session of his own.
raw = Raw()
body, _ = raw.request("hello", {"pid": os.getpid(), "name": "train"})
found["hello"] = {"session": body["session"], "adopted": body["adopted"]}
# Her graph id alone buys nothing: the daemon asks for the payload as for a graph it lacks.
found["register_by_id"], _ = raw.request("register", {"device": "cpu", "graph": alice["graph"], "weights": {}})
_, found["submit_by_id"] = raw.request("submit", {"device": "cpu", "graph": alice["graph"], "inputs": [
    {"kind": "cpu", "dtype": "float32", "shape": [2, 4], "frame": 0}]}, x.numpy().tobytes())
found["release_by_id"], _ = raw.request("release", {"device": "cpu", "graph": alice["graph"]})
# Bob's own work runs, over ZeroMQ only (lanes off).
with Client(ENDPOINT, timeout_s=30, lanes=False) as client:
    for _ in range(3):
        (out,) = client.submit(encoded, [x])
    check(out)
    found["own"] = {"mode": client.last_execution["mode"], "lane": client.lane_attached}
    status = client.status()
found["status"] = {"sessions": [[s["id"], s["uid"]] for s in status["sessions"]],
                   "graphs": [row["graph"] for d in status["devices"] for row in d["registered"]],
                   "viewer": status["daemon"]["viewer"]}
import contextlib, io
text = io.StringIO()
with contextlib.redirect_stdout(text):
    found["ctl_exit"] = ctl.main(["--endpoint", ENDPOINT, "--json", "status"])
document = json.loads(text.getvalue())
found["ctl"] = {"sessions": [[s["id"], s["uid"]] for s in document["sessions"]],
                "graphs": [row["graph"] for d in document["devices"] for row in d["registered"]]}
say(**found)
sys.stdin.readline()  # Alice's session is parked now
raw.request("bye", {})
again = Raw()
body, _ = again.request("hello", {"pid": os.getpid(), "name": "train"})
say(session=body["session"], adopted=body["adopted"])
sys.stdin.readline()
"""

ALICE_AGAIN = PRELUDE + """
with Client(ENDPOINT, session="train", timeout_s=30) as client:
    (out,) = client.submit(encoded, [x])
    check(out)
    say(session=client.session_id, mode=client.last_execution["mode"])
"""


class User:
    """A client script running as a uid, spoken to by lines on stdin and stdout."""

    def __init__(self, workdir: str, source: str, uid: int, seed: int, endpoint: str, *args: str) -> None:
        path = Path(workdir) / f"user_{uid}_{time.monotonic_ns()}.py"
        path.write_text(textwrap.dedent(source))
        home = Path(workdir) / f"home-{uid}"
        home.mkdir(mode=0o777, exist_ok=True)
        os.chmod(home, 0o777)
        env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1", "CGTREE_GRAPH_CACHE": ""}
        self.proc = subprocess.Popen([sys.executable, str(path), endpoint, str(uid), str(seed), *args], cwd=workdir,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def line(self) -> dict:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            raise AssertionError(f"the client exited ({self.proc.returncode}):\n{self.proc.stderr.read()[-4000:]}")
        return json.loads(text)

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def shared_daemon(daemon_tools):
    """A CPU daemon as root whose sockets every uid may open (a 0777 directory, umask 0)."""
    workdir = daemon_tools.short_tmpdir()
    os.chmod(workdir, 0o777)
    daemon = daemon_tools.DaemonProcess(workdir)
    previous = os.umask(0)  # the daemon creates its socket files (and the lane's) world-connectable
    try:
        daemon.start()
    finally:
        os.umask(previous)
    try:
        yield daemon
    finally:
        daemon.kill()


def _root_status(endpoint: str) -> dict:
    return ctl.request(endpoint, "status", {}, timeout_s=10.0)


def _wait_parked(endpoint: str, session_id: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {s["id"]: s["state"] for s in _root_status(endpoint)["sessions"]}
        if states.get(session_id) == "parked":
            return
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} was not parked: {states}")


def test_a_client_of_another_uid_cannot_adopt_inspect_or_use_a_users_session(shared_daemon, capsys):
    endpoint, workdir = shared_daemon.endpoint, shared_daemon.workdir
    users = []
    try:
        alice = User(workdir, ALICE_FIRST, ALICE, 0, endpoint)
        users.append(alice)
        first = alice.line()
        assert first["mode"] == "replayed" and first["lane"] is True  # Alice's requests ride her lane
        bob = User(workdir, BOB_SCRIPT, BOB, 1, endpoint, json.dumps(first))
        users.append(bob)
        found = bob.line()

        # Alice's routing id in Bob's hands: every request is refused, her session untouched.
        assert found["hijack"] == {"bye": "forbidden", "release": "forbidden", "reset": "forbidden",
                                   "hello": "forbidden", "status": "forbidden"}
        # Her name gives Bob his own session; her graph id alone neither registers nor runs.
        assert found["hello"]["adopted"] is False and found["hello"]["session"] != first["session"]
        assert found["register_by_id"]["registered"] is False and found["register_by_id"]["need_payload"] is True
        assert found["submit_by_id"] == "unknown_graph"
        assert found["release_by_id"] == {"released": 0}
        # Bob's own work, over ZeroMQ (lanes off), is served.
        assert found["own"] == {"mode": "replayed", "lane": False}
        # Bob sees his sessions only, through the client and through cgtreectl.
        for view in (found["status"], found["ctl"]):
            assert view["sessions"] and all(uid == BOB for _, uid in view["sessions"])
            assert first["session"] not in [sid for sid, _ in view["sessions"]]
            assert first["graph"] not in view["graphs"]
        assert found["status"]["viewer"] == {"uid": BOB, "sees": "own"}
        assert found["ctl_exit"] == 0

        # Alice was not disturbed: her next submit replays on her warm tree.
        alice.go()
        after = alice.line()
        assert after["mode"] == "replayed" and after["sessions"] == [first["session"]]
        assert alice.finish() == 0
        _wait_parked(endpoint, first["session"])

        # Root (here also the daemon's user) sees every user's sessions and graphs in cgtreectl.
        assert ctl.main(["--endpoint", endpoint, "--json", "status"]) == 0
        document = json.loads(capsys.readouterr().out)
        by_id = {s["id"]: s for s in document["sessions"]}
        assert by_id[first["session"]]["uid"] == ALICE and by_id[first["session"]]["state"] == "parked"
        assert by_id[found["hello"]["session"]]["uid"] == BOB
        assert first["graph"] in [row["graph"] for d in document["devices"] for row in d["registered"]]
        assert document["daemon"]["viewer"]["sees"] == "all"

        # Alice's parked session is not Bob's to adopt by name...
        bob.go()
        retry = bob.line()
        assert retry["adopted"] is False and retry["session"] != first["session"]
        # ...but it is Alice's: warm, her first submit replays.
        again = User(workdir, ALICE_AGAIN, ALICE, 0, endpoint)
        users.append(again)
        adopted = again.line()
        assert adopted == {"session": first["session"], "mode": "replayed"}
        assert again.finish() == 0
        bob.go()
        assert bob.finish() == 0
    finally:
        for user in users:
            user.kill()
    assert shared_daemon.alive()
