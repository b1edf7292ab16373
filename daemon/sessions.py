"""Client sessions: one per client process, holding that client's trees, output buffers and
opened IPC handles; the device's decoded graphs and weights are shared (``graphs.py``).

Lifecycle::

    hello -> live --(bye)----------------------------------------------> closed
               |--(client died / idle, unnamed)----------------------> closed
               '--(client died / idle, named)--> parked --(linger)---> closed
                                                   '--(hello, same name)--> live (adopted)

Invariants:
- A session is found by the ZeroMQ routing id of its client; the client also sends its pid in
  ``hello``, and the daemon records that process's start time itself (psutil), so a reused
  pid is never mistaken for the original client.
- Closing a session frees everything it holds, in this order: output buffers (the client's
  view of them is gone first), opened IPC handles, tree managers (graphs and pools), graph
  references. Other sessions are untouched: nothing here is shared except through
  ``DeviceGraphs`` reference counts.
- Parking keeps the tree managers and graph references (recordings stay warm) but drops
  everything the dead client could have seen: output buffers and opened IPC handles.
- Liveness is a pure decision (``session_verdict``) over facts gathered by the registry, so
  it is tested without processes and without a clock.
- A session belongs to the uid that opened it (``owner``: the kernel's word for the peer, see
  ``cgtree.daemon.tenancy``). Names are per owner (the registry keys them by (owner, name)), so
  one user's ``hello`` can neither adopt nor block another user's named session, and a routing
  id already bound to another owner's session is refused (``Forbidden``), never re-opened.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import psutil

from cgtree.daemon.input_memo import InputMemo
from cgtree.daemon.lane import TOKEN_BYTES as LANE_TOKEN_BYTES
from cgtree.daemon.plans import PlanBook
from cgtree.daemon.tenancy import describe as describe_uid
from cgtree.daemon.tenancy import may_use
from cgtree.daemon.tensors import IpcImportCache, OutputBuffer

log = logging.getLogger("cgtree.daemon.sessions")

# Seconds a named session's trees stay parked after its client died, waiting for a client with
# the same name. Configured by daemon.session_linger_s; this default is for direct construction.
DEFAULT_SESSION_LINGER_S = 60.0
# Opened IPC input storages kept per session and device (each pins a client allocation).
IPC_IMPORT_CACHE_SIZE = 64
MAX_SESSION_NAME_CHARS = 128

_session_ids = itertools.count(1)


@dataclass(frozen=True)
class ClientProcess:
    """The client's process, identified by pid and start time (pids are reused)."""

    pid: int
    create_time: Optional[float]  # None: the pid is not visible to the daemon (other namespace)

    @classmethod
    def lookup(cls, pid: int) -> "ClientProcess":
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            raise ProcessLookupError(f"no process {pid}") from None
        except psutil.AccessDenied:
            return cls(pid, None)

    def alive(self) -> Optional[bool]:
        """True/False, or None when it cannot be known (the pid is not ours to see)."""
        if self.create_time is None:
            return None
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return process.create_time() == self.create_time
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return None


def session_verdict(*, state: str, client_alive: Optional[bool], idle_s: float, timeout_s: float,
                    parked_s: float, linger_s: float, named: bool) -> Optional[str]:
    """What housekeeping does with a session: None (keep), "park" or "close", as a pure decision.

    A live session whose client is known alive is kept however idle it is (a client waiting
    for work must not lose its recordings); an idle timeout applies only when liveness cannot
    be checked. A dead or timed-out client's session is parked if named, else closed.
    """
    if state == "parked":
        return "close" if parked_s >= linger_s else None
    gone = client_alive is False or (client_alive is None and idle_s >= timeout_s)
    if not gone:
        return None
    return "park" if named else "close"


class SessionDevice:
    """A session's state on one device: its tree manager, graphed functions, output buffers."""

    def __init__(self, device: str, manager: Any) -> None:
        self.device = device
        self.manager = manager
        self.functions: dict[str, Callable] = {}  # graph id -> cudagraphified function
        self.output_buffers: dict[str, OutputBuffer] = {}  # graph id -> current output buffer
        self.buffers_by_id: dict[int, OutputBuffer] = {}
        self.ipc_imports = IpcImportCache(IPC_IMPORT_CACHE_SIZE)
        self.input_memo = InputMemo()  # views over ipc_imports' storages: cleared with them
        self.plans = PlanBook()  # prepared submits over the memo's views and output_buffers

    def replace_output_buffer(self, graph_id: str, buffer: OutputBuffer) -> None:
        """A new buffer for the graph (its outputs changed shape); the old one is freed once the
        client, seeing the new buffer id in the reply, closes its mapping of the old one."""
        old = self.output_buffers.get(graph_id)
        if old is not None:
            self.buffers_by_id.pop(old.buffer_id, None)
        self.output_buffers[graph_id] = buffer
        self.buffers_by_id[buffer.buffer_id] = buffer

    def release_outputs(self, graph_id: Optional[str] = None, *, client_alive: bool = True) -> int:
        """Free the output buffers of one graph (or all); returns how many were freed."""
        ids = [graph_id] if graph_id is not None else list(self.output_buffers)
        self.plans.forget()  # each stands for a submit into one of these buffers
        freed = 0
        for gid in ids:
            buffer = self.output_buffers.pop(gid, None)
            if buffer is None:
                continue
            self.buffers_by_id.pop(buffer.buffer_id, None)
            if not client_alive:
                buffer.release_remote_reference()
            freed += 1
        return freed

    def output_bytes(self) -> int:
        return sum(b.nbytes for b in self.output_buffers.values())

    def drop_client_state(self, *, client_alive: bool) -> None:
        """What parking drops: outputs the client could see and the client's opened handles."""
        self.release_outputs(client_alive=client_alive)
        self.plans.forget()
        self.input_memo.forget()
        self.ipc_imports.close()

    def close(self, *, client_alive: bool) -> None:
        self.drop_client_state(client_alive=client_alive)
        self.functions.clear()
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()


class Session:
    """One client's session. ``identity`` is None while parked; ``owner`` is the uid that opened
    it (None: an unverified peer, ``cgtree.daemon.tenancy``), for good."""

    def __init__(self, identity: bytes, client: ClientProcess, name: Optional[str], now: float,
                 owner: Optional[int] = None) -> None:
        self.session_id = next(_session_ids)
        self.identity: Optional[bytes] = identity
        self.client = client
        self.name = name
        self.owner = owner
        self.state = "live"
        self.created = now
        self.last_seen = now
        self.parked_at: Optional[float] = None
        self.devices: dict[str, SessionDevice] = {}
        self.graphs: dict[tuple[str, str], Any] = {}  # (device, graph id) -> GraphEntry (a reference held)
        self.staged_weights: dict[str, dict[str, Any]] = {}  # device -> weight hash -> tensor (uploads in progress)
        self.counters = {"requests": 0, "submits": 0, "errors": 0, "lane_requests": 0, "doorbell_requests": 0, "doorbell_kicks": 0,
                         "gated_requests": 0, "gate_vetoed": 0, "gate_late": 0}
        # Binds a submit lane to this session (cgtree.daemon.lane); a new one on adoption, so
        # the dead client's token is worthless.
        self.lane_token = os.urandom(LANE_TOKEN_BYTES)
        self.lane_open = False  # kept by the daemon's LaneHub
        self.doorbell_open = False  # its lane has a doorbell page (LaneHub too)

    @property
    def label(self) -> str:
        return f"s{self.session_id}" + (f"({self.name})" if self.name else "")

    def touch(self, now: float) -> None:
        self.last_seen = now


class SessionRegistry:
    """All sessions; lookup by routing id and by name; reaping by ``session_verdict``.

    ``release_graph`` gives a graph reference back to the device's store; ``client_gone`` is
    called when a session stops being live (parked or closed), so transports bound to it (its
    submit lane) are closed with it.
    """

    def __init__(self, *, release_graph: Callable[[str, Any], None], clock: Callable[[], float] = time.monotonic,
                 linger_s: float = DEFAULT_SESSION_LINGER_S,
                 client_gone: Callable[[Session], None] = lambda session: None) -> None:
        self._release_graph = release_graph
        self._client_gone = client_gone
        self.clock = clock
        self.linger_s = linger_s
        self.by_identity: dict[bytes, Session] = {}
        self.by_name: dict[tuple[Optional[int], str], Session] = {}  # (owner, name): names are per user
        self.sessions: dict[int, Session] = {}

    def by_lane_token(self, token: bytes) -> Optional[Session]:
        """The live session whose lane token this is (a lane handshake), or None."""
        for session in self.sessions.values():
            if session.state == "live" and hmac.compare_digest(session.lane_token, token):
                return session
        return None

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, identity: bytes) -> Optional[Session]:
        return self.by_identity.get(identity)

    def open(self, identity: bytes, client: ClientProcess, name: Optional[str],
             owner: Optional[int] = None) -> tuple[Session, bool]:
        """The session for a ``hello`` from uid ``owner``: (session, adopted). Raises
        ``SessionInUse`` when a live client of the same owner holds ``name``, ``Forbidden``
        when ``identity`` is bound to another owner's session."""
        now = self.clock()
        existing = self.by_identity.get(identity)
        if existing is not None:
            if not may_use(owner, existing.owner):
                raise Forbidden(f"this routing id belongs to a session of another user; {describe_uid(owner)} may not open it")
            if existing.client == client and existing.name == name:
                existing.touch(now)
                return existing, False  # the same client saying hello again (reconnect)
            self.close(existing, "its routing id said hello as another client", client_alive=existing.client.alive() is not False)
        if name is not None:
            holder = self.by_name.get((owner, name))
            if holder is not None and holder.state == "live":
                if holder.client.alive() is False:
                    self.park(holder, "its client died (found at hello)")
                else:
                    raise SessionInUse(f"session name {name!r} is held by live client pid {holder.client.pid}")
            if holder is not None and holder.state == "parked":
                holder.identity = identity
                holder.client = client
                holder.state = "live"
                holder.parked_at = None
                holder.lane_token = os.urandom(LANE_TOKEN_BYTES)
                holder.touch(now)
                self.by_identity[identity] = holder
                log.info("session %s adopted by pid %d (parked trees kept warm)", holder.label, client.pid)
                return holder, True
        session = Session(identity, client, name, now, owner)
        self.sessions[session.session_id] = session
        self.by_identity[identity] = session
        if name is not None:
            self.by_name[(owner, name)] = session
        log.info("session %s opened for pid %d (%s)", session.label, client.pid, describe_uid(owner))
        return session, False

    def park(self, session: Session, reason: str) -> None:
        """Keep a named session's trees warm for ``linger_s``; drop what the client could see."""
        if session.identity is not None:
            self.by_identity.pop(session.identity, None)
        session.identity = None
        session.state = "parked"
        session.parked_at = self.clock()
        self._client_gone(session)
        for device_state in session.devices.values():
            device_state.drop_client_state(client_alive=False)
        log.info("session %s parked for %.0f s: %s", session.label, self.linger_s, reason)

    def close(self, session: Session, reason: str, *, client_alive: bool) -> None:
        """Free everything the session holds; other sessions are untouched."""
        if self.sessions.pop(session.session_id, None) is None:
            return
        if session.identity is not None and self.by_identity.get(session.identity) is session:
            del self.by_identity[session.identity]
        if session.name is not None and self.by_name.get((session.owner, session.name)) is session:
            del self.by_name[(session.owner, session.name)]
        session.state = "closed"
        self._client_gone(session)
        errors = []
        for device_state in session.devices.values():
            try:
                device_state.close(client_alive=client_alive)
            except Exception as exc:  # keep freeing the rest; report once
                errors.append(f"{device_state.device}: {exc!r}")
        session.devices.clear()
        session.staged_weights.clear()
        for (device, _graph_id), entry in session.graphs.items():
            self._release_graph(device, entry)
        session.graphs.clear()
        log.info("session %s closed: %s", session.label, reason)
        if errors:
            log.error("session %s: errors while freeing: %s", session.label, "; ".join(errors))

    def reap(self, timeout_s: float) -> list[tuple[Session, str]]:
        """Park or close sessions whose client is gone; returns what was done."""
        now = self.clock()
        done = []
        for session in list(self.sessions.values()):
            alive = session.client.alive() if session.state == "live" else None
            verdict = session_verdict(
                state=session.state, client_alive=alive, idle_s=now - session.last_seen, timeout_s=timeout_s,
                parked_s=(now - session.parked_at) if session.parked_at is not None else 0.0, linger_s=self.linger_s, named=session.name is not None,
            )
            if verdict is None:
                continue
            if session.state == "parked":
                reason = f"parked longer than {self.linger_s:.0f} s"
            elif alive is False:
                reason = f"client pid {session.client.pid} exited"
            else:
                reason = f"no request for {now - session.last_seen:.0f} s (liveness unknown)"
            if verdict == "park":
                self.park(session, reason)
            else:
                self.close(session, reason, client_alive=False)
            done.append((session, reason))
        return done

    def close_all(self, reason: str, *, deadline: Optional[float] = None, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Close every session; False if the deadline passed or ``should_stop`` said so first."""
        for session in list(self.sessions.values()):
            if should_stop() or (deadline is not None and self.clock() > deadline):
                return False
            self.close(session, reason, client_alive=session.client.alive() is not False)
        return True


class SessionInUse(Exception):
    """A live client already holds the session name asked for."""


class Forbidden(Exception):
    """The request would act on another user's session."""
