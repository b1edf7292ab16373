"""Whether the daemon a client is waiting on is still there: what a waiting client checks
besides its own socket.

A dead daemon does not always show on the socket a client waits on. ZeroMQ hides it (it
reconnects silently and queues requests for whoever binds the path next), and a daemon whose
exit takes a while (a CUDA context being torn down) keeps its sockets open meanwhile, so even
the submit lane sees no end-of-file yet. What does show it, at once:

- the endpoint's socket file: gone (a graceful stop removes it) or replaced (a new daemon
  unlinked the stale file and bound its own: the daemon we sent to is not the one there now),
  compared by ``(st_dev, st_ino, st_mtime_ns)`` (the inode number alone is often reused at once
  by the next file; the time the file was made is not, and nothing writes a socket file);
- the daemon's process, found by the pid the kernel reports for the socket file's listener
  (``SO_PEERCRED``, translated into this process's pid namespace): gone, a zombie, exiting
  (``PF_EXITING`` is set as soon as a SIGKILL is acted on, before its sockets are closed), or
  another process under the same pid (its start time differs).

``gone_reason`` decides from what was observed (pure); ``DaemonWatch`` observes.

Invariants:
- No false alarm from what cannot be seen: a listener pid that is not visible here (another
  pid namespace reports 0) or a ``/proc`` that cannot be read is no evidence; only the file
  counts then. An unbound watch (no daemon answered yet) only reports a missing file.
- Cheap: one ``stat`` and one read of ``/proc/<pid>/stat`` (about 10 us), at most every
  ``CHECK_EVERY_S`` (callers on a hot path need not rate-limit it themselves). Once gone, the
  watch keeps saying so until it is bound again.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Optional

from cgtree.daemon.runtime_dir import ipc_path

CHECK_EVERY_S = 0.02  # how stale a "still there" may be
PROBE_TIMEOUT_S = 0.2  # connecting to the socket file to ask the kernel who listens
PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ProcessState:
    """What ``/proc/<pid>/stat`` said about a process (``exists`` False: no such pid)."""

    exists: bool
    state: str = ""
    flags: int = 0
    start_ticks: Optional[int] = None


@dataclass(frozen=True)
class Bound:
    """The daemon a client talks to, as seen when it last answered."""

    identity: Optional[tuple[int, int, int]]  # the socket file's file_identity; None: not an ipc endpoint
    pid: Optional[int] = None  # its listener's pid in this namespace; None: not visible
    start_ticks: Optional[int] = None


def gone_reason(bound: Optional[Bound], identity: Optional[tuple[int, int, int]], has_file: bool,
                process: Optional[ProcessState]) -> Optional[str]:
    """Why the bound daemon is no longer there, or None when nothing says so.

    identity/has_file: the socket file now (``has_file`` False: it does not exist; always True
    for endpoints without a file). process: its process now, None when it cannot be told.
    """
    if not has_file:
        return "its socket file is gone"
    if bound is None:
        return None
    if bound.identity is not None and identity != bound.identity:
        return "another daemon now listens at its endpoint"
    if bound.pid is None or process is None:
        return None
    if not process.exists:
        return f"its process {bound.pid} is gone"
    if process.state in ("Z", "X"):
        return f"its process {bound.pid} exited"
    if process.flags & PF_EXITING:
        return f"its process {bound.pid} is exiting"
    if bound.start_ticks is not None and process.start_ticks != bound.start_ticks:
        return f"its process {bound.pid} is gone (the pid now names another process)"
    return None


def observe_gone(path: str, bound: Optional[Bound]) -> Optional[str]:
    """Look now (one ``stat``, one ``/proc`` read): why the daemon ``bound`` describes is no longer
    at ``path``, or None. Touches no state, so any thread may call it."""
    identity = file_identity(path)
    process = read_process(bound.pid) if bound is not None and bound.pid is not None else None
    return gone_reason(bound, identity, identity is not None, process)


def read_process(pid: int) -> Optional[ProcessState]:
    """``/proc/<pid>/stat``; None when it cannot be read (no /proc, hidepid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return ProcessState(exists=False)
    except OSError:
        return None
    try:  # fields after the command name, which may itself hold spaces and parentheses
        fields = data[data.rindex(b")") + 2:].split()
        return ProcessState(True, fields[0].decode(), int(fields[6]), int(fields[19]))
    except (ValueError, IndexError):
        return None


def file_identity(path: str) -> Optional[tuple[int, int, int]]:
    """Which file ``path`` is now: (device, inode, modification time), None when none is."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def listener_pid(path: str) -> Optional[int]:
    """The pid of the process listening on unix socket ``path``, as the kernel reports it to
    this process (0, i.e. None, when that process is in a pid namespace we cannot see).
    Connects and disconnects at once: the daemon's ZeroMQ socket sees a peer that left before
    its handshake, which it drops."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect(path)
        pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    except OSError:
        return None
    finally:
        sock.close()
    return pid or None


class DaemonWatch:
    """Observes the daemon at one endpoint. ``bind()`` once a daemon answered; ``gone()`` then
    says whether it is still there (a reason when not); ``unbind()`` while looking for one."""

    def __init__(self, endpoint: str) -> None:
        self.path = ipc_path(endpoint)
        self.bound: Optional[Bound] = None
        self._next_check = 0.0
        self._reason: Optional[str] = None

    def bind(self) -> None:
        """Record the daemon now at the endpoint (call right after it answered)."""
        self._next_check, self._reason = 0.0, None
        if self.path is None:
            self.bound = Bound(identity=None)
            return
        identity = file_identity(self.path)
        pid = listener_pid(self.path)
        process = read_process(pid) if pid is not None else None
        if process is None or not process.exists or file_identity(self.path) != identity:
            pid, process = None, None  # not visible, or the file changed under the probe
        self.bound = Bound(identity, pid, process.start_ticks if process is not None else None)

    def unbind(self) -> None:
        self.bound, self._next_check, self._reason = None, 0.0, None

    def gone(self, *, fresh: bool = False) -> Optional[str]:
        """Why the bound daemon is no longer there, or None; observed at most every
        ``CHECK_EVERY_S`` unless ``fresh``."""
        if self._reason is not None or self.path is None:
            return self._reason
        now = time.monotonic()
        if not fresh and now < self._next_check:
            return None
        self._next_check = now + CHECK_EVERY_S
        bound = self.bound
        reason = observe_gone(self.path, bound)
        if bound is not None:
            self._reason = reason  # a bound daemon that went away stays gone
        return reason
