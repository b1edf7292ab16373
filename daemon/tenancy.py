"""Tenants: which user's process is on the other end of a connection, and what that user may do
with sessions, graphs and weights. The user is the uid the kernel reports for the peer's
socket, never anything a client says about itself.

Where the uid comes from (mechanism, ``peer_uid_of_frame`` / ``peer_credentials``):
- ZeroMQ over ``ipc://``: when libzmq (>= 4.3, Linux) accepts a unix-socket connection it reads
  the peer's ``SO_PEERCRED`` and attaches ``"<address>:<uid>:<gid>:<pid>"`` to every message
  from that connection as its ``Peer-Address`` property. A peer cannot set it: libzmq fills it
  from the kernel before it merges any metadata the peer sends, and keeps the first value.
- Submit lanes: ``SO_PEERCRED`` of the accepted seqpacket socket, checked at the handshake.
- Anything else (a ``tcp://`` endpoint, a platform without ``SO_PEERCRED``): unknown, ``None``.
  All such peers are one tenant, ``UNVERIFIED``, which is never any uid: on a daemon where
  credentials are missing, its clients are not kept apart from each other (as before tenancy),
  but never reach a session opened by a known uid.

Policy (pure functions, tested without processes):
- ``may_use``: a session is used (any request on it: submit, release, reset, mark_step, bye,
  adopting it by name, its lane, its plans) only by the uid that opened it.
- ``may_inspect``: ``status`` shows a session (id, name, pid, graph ids, trees) to its owner,
  to root and to the daemon's own user (``cgtreectl`` run by the operator sees everything);
  other users see only their own. Device totals (graph count, pool bytes) stay visible to all.
- Session names are per owner: ``Client(session="train")`` of two users are two sessions.
- ``may_use_content``: graphs and weights are content-addressed and shared on a device, but a
  uid uses a graph or weight only after it has sent those bytes itself (its "proof"): the
  daemon hashes what it received, so a matching hash proves the uid holds the same bytes. A
  graph id or weight hash alone (learned, guessed, leaked) buys nothing; the daemon then answers
  exactly as for an unknown graph (``need_payload``, ``missing_weights``), so a register is not
  an oracle for what other users have uploaded. The same uid's sessions share their proofs.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Iterable, Optional

UNVERIFIED: Optional[int] = None  # the principal of peers whose uid the kernel did not tell us
ROOT_UID = 0
PEER_ADDRESS = "Peer-Address"


# ------------------------------------------------------------------------------------- policy


def may_use(peer_uid: Optional[int], owner_uid: Optional[int]) -> bool:
    """Whether a request from ``peer_uid`` may act on a session ``owner_uid`` opened."""
    return peer_uid == owner_uid


def may_inspect(viewer_uid: Optional[int], owner_uid: Optional[int], daemon_uid: int) -> bool:
    """Whether ``status`` shows ``owner_uid``'s session to ``viewer_uid``: its owner, root, or
    the daemon's own user (an unverified viewer is neither of the last two)."""
    if viewer_uid == owner_uid:
        return True
    return viewer_uid is not None and viewer_uid in (ROOT_UID, daemon_uid)


def sees_everything(viewer_uid: Optional[int], daemon_uid: int) -> bool:
    """Whether ``viewer_uid`` inspects every session (root, the daemon's user)."""
    return viewer_uid is not None and viewer_uid in (ROOT_UID, daemon_uid)


def may_use_content(uid: Optional[int], provers: Iterable[Optional[int]]) -> bool:
    """Whether ``uid`` may use a shared graph or weight: only once it sent the bytes itself."""
    return uid in provers


# ---------------------------------------------------------------------------------- mechanism


def parse_peer_address(value: Any) -> Optional[tuple[int, int, int]]:
    """(uid, gid, pid) of an ipc connection's ``Peer-Address`` (``"<address>:<uid>:<gid>:<pid>"``),
    or None when it does not end in three decimal numbers. Only meaningful for ``ipc://``: a
    ``tcp://`` peer's IPv6 address could end in digit groups."""
    if not isinstance(value, str):
        return None
    parts = value.rsplit(":", 3)
    if len(parts) != 4 or not all(part.isdigit() and part.isascii() for part in parts[1:]):
        return None
    uid, gid, pid = (int(part) for part in parts[1:])
    return uid, gid, pid


def peer_uid_of_frame(frame: Any) -> Optional[int]:
    """The peer's uid of a ZeroMQ message frame received with ``copy=False`` (``UNVERIFIED``
    when libzmq did not report credentials)."""
    try:
        value = frame.get(PEER_ADDRESS)
    except Exception:  # noqa: BLE001 - not a zmq.Frame, or libzmq without the property
        return UNVERIFIED
    credentials = parse_peer_address(value)
    return credentials[0] if credentials is not None else UNVERIFIED


def peer_credentials(sock: socket.socket) -> tuple[Optional[int], Optional[int]]:
    """(pid, uid) of a connected unix socket's peer (``SO_PEERCRED``); (None, None) where the
    platform lacks it."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return None, None
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i")))
        return pid, uid
    except OSError:
        return None, None


def describe(uid: Optional[int]) -> str:
    """A principal for messages: ``uid 1000`` or ``an unverified peer``."""
    return "an unverified peer" if uid is None else f"uid {uid}"
