"""The per-user runtime directory holding cgtreed's default ipc socket, and endpoint helpers.

Default endpoint: ``ipc://<runtime dir>/cgtreed.sock`` where the runtime dir is
``$XDG_RUNTIME_DIR/cgtree`` or, without that variable, ``/tmp/cgtree-<uid>``.

Invariants:
- The directory is created with mode 0700. An existing one is used only if it is a real
  directory (not a symlink), owned by this user, and grants nothing to group or others;
  anything else is refused with ``RuntimeDirError`` saying what is wrong. (In /tmp anyone can
  pre-create the path: using it anyway would hand the socket, and the GPU, to them.)
- An explicitly configured endpoint (``--endpoint`` / ``daemon.endpoint``) is used as given:
  its directory is the deployment's business (systemd's ``RuntimeDirectory=``, group access).
- Pure helpers (``ipc_path``, ``default_runtime_dir``) read only what they are given.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Mapping, Optional

SOCKET_NAME = "cgtreed.sock"


class RuntimeDirError(RuntimeError):
    """The runtime directory cannot be used safely."""


def default_runtime_dir(environ: Mapping[str, str] = os.environ, uid: Optional[int] = None) -> str:
    uid = os.getuid() if uid is None else uid
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "cgtree")
    return f"/tmp/cgtree-{uid}"


def default_endpoint(environ: Mapping[str, str] = os.environ, uid: Optional[int] = None) -> str:
    return "ipc://" + os.path.join(default_runtime_dir(environ, uid), SOCKET_NAME)


def ipc_path(endpoint: str) -> Optional[str]:
    """The filesystem path of an ``ipc://`` endpoint (None for tcp/inproc or abstract ``@``)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@"):
        return None
    return path


def ensure_runtime_dir(path: str) -> str:
    """Create ``path`` with mode 0700 or check an existing one; returns ``path``."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        # $XDG_RUNTIME_DIR itself is systemd-logind's; never create it (a missing one means
        # the variable is stale, and /tmp would be the wrong fallback to guess silently).
        raise RuntimeDirError(f"parent directory {parent} of the runtime directory does not exist")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_runtime_dir(path)
    return path


def check_runtime_dir(path: str, uid: Optional[int] = None) -> None:
    uid = os.getuid() if uid is None else uid
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} exists and is not a directory")
    if info.st_uid != uid:
        raise RuntimeDirError(f"runtime directory {path} is owned by uid {info.st_uid}, not by this user (uid {uid}); refusing to use it")
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise RuntimeDirError(
            f"runtime directory {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must grant nothing to group or others "
            f"(chmod 700 {path})"
        )


def resolve_endpoint(configured: str, environ: Mapping[str, str] = os.environ) -> str:
    """The endpoint to bind: the configured one, or the default (runtime dir made safe)."""
    if configured:
        return configured
    ensure_runtime_dir(default_runtime_dir(environ))
    return default_endpoint(environ)


def ipc_endpoint_problem(endpoint: str) -> Optional[str]:
    """Why a client cannot reach an ``ipc://`` endpoint, or None if it looks reachable.

    ZeroMQ connects asynchronously and retries forever: a missing socket file or a permission
    error would only ever show as a timeout. Checking the path first turns them into errors
    that say what to fix.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    directory = os.path.dirname(path) or "."
    if os.path.isdir(directory) and not os.access(directory, os.X_OK):
        return f"permission denied: cannot enter {directory} (is this user in the daemon's group?)"
    if not os.path.exists(path):
        return f"{path} does not exist (start `cgtreed`, or set CGTREE_ENDPOINT to where it listens)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"permission denied on {path} (connecting needs write access: is this user in the daemon's group?)"
    return None


def has_listener(path: str) -> bool:
    """Whether a process listens on the unix socket file ``path``: a connection is refused at
    once when nobody does (the file a SIGKILLed daemon left behind), so a restarted daemon
    tells a stale file from a live one without waiting for an answer."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:  # ECONNREFUSED: nobody listens; ENOENT: gone meanwhile
        return False
    finally:
        probe.close()
    return True
