"""The cgtreed wire protocol: the envelope every message carries, the error codes, and the
one error reply shape. Shared by the daemon and the client; the per-command bodies are
specified in each command module's docstring (``cgtree.daemon.commands``) and in
``docs/PROTOCOL.md``.

A message is a ZeroMQ multipart message:

- frame 0: the envelope, one msgpack map;
- frames 1..n: raw tensor bytes (CPU tensors, weight blobs, graph payloads) that the body
  refers to by index (``"frame": 0`` is the first frame after the envelope).

Request envelope: ``{"v": PROTOCOL_VERSION, "id": <int|str>, "op": <str>, "body": <map>}``.
Success reply:    ``{"v": PROTOCOL_VERSION, "id": <echoed>, "body": <map>}``.
Error reply:      ``{"v": PROTOCOL_VERSION, "id": <echoed or None>,
                     "error": {"code": <one of ERROR_CODES>, "message": <str>}}``.

Invariants:
- Decoding never trusts the peer: every field is type-checked here, before any command sees
  it, and any failure is a ``ProtocolError`` with a code from ``ERROR_CODES`` and a message
  that says what was wrong. msgpack is the only deserializer (no pickle, no eval).
- The request id is echoed verbatim, even in error replies, whenever the envelope was
  readable far enough to find it; replies to unreadable envelopes carry ``"id": None``.
- ``ERROR_CODES`` is the whole table: the daemon never sends a code outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# The error code table: code -> (retryable, meaning). "Retryable" means the same request may
# succeed later without being changed (after a reconnect, a hello, a re-register, a restart).
ERROR_CODES: dict[str, tuple[bool, str]] = {
    "bad_request": (False, "the envelope or body is malformed (not msgpack, a field missing or of the wrong type)"),
    "bad_version": (False, "the envelope's protocol version is not the daemon's"),
    "unknown_op": (False, "no command of that name"),
    "too_large": (False, "the message is larger than daemon.max_message_bytes"),
    "no_session": (True, "the command needs a session: send hello first (also after a daemon restart)"),
    "session_in_use": (False, "a live client already holds the named session"),
    "forbidden": (False, "the request would act on a session of another user (sessions belong to the uid that opened them)"),
    "unknown_graph": (True, "no graph of that id is registered in this session on that device: register it"),
    "unknown_device": (False, "the daemon does not serve that device"),
    "graph_compiling": (True, "the graph is still being compiled by the daemon: register it again to wait for it"),
    "plan_expired": (True, "the prepared submit no longer applies (outputs released, trees reset, session adopted): submit normally"),
    "bad_tensor": (False, "a tensor descriptor is invalid (dtype, shape, strides, size, device, handle)"),
    "payload_rejected": (False, "the graph payload failed to decode or uses a disallowed operator"),
    "unavailable": (True, "the daemon is shutting down or cannot serve now; retry later"),
    "reload_failed": (False, "the configuration file is invalid, unreadable or was never given; the running configuration is kept"),
    "cuda_error": (False, "a CUDA error; if sticky the daemon exits and its supervisor restarts it"),
    "internal": (False, "a bug in the daemon; the request id is in the daemon's log"),
}

# Envelope field types allowed for the request id: small ints or short strings only, so
# echoing it back can never amplify a message.
MAX_REQUEST_ID_CHARS = 64


class ProtocolError(Exception):
    """A request the daemon refuses, or an error reply the client received.

    code: one of ``ERROR_CODES``; message: human-readable, names what was wrong (which field,
    which input index, which operator).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:  # a bug in the caller: never put an unknown code on the wire
            raise ValueError(f"unknown error code {code!r} (message: {message})")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return ERROR_CODES[self.code][0]


@dataclass
class Request:
    """A decoded request envelope (frame 0) plus the raw frames that follow it."""

    request_id: int | str
    op: str
    body: dict
    frames: list = field(default_factory=list)


@dataclass
class Reply:
    """What a command returns: a body (msgpack-serializable map) and raw frames after it."""

    body: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)


def pack(obj: Any) -> bytes:
    """msgpack with bytes kept as bin and str as str (use_bin_type)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: Any) -> Any:
    """msgpack decode of a peer's bytes. Raises ValueError-family errors on garbage."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def frame_view(frame: Any) -> memoryview:
    """A frame's bytes without a copy: ZeroMQ frames (``.buffer``) and plain buffers (lane
    frames, bytes) alike."""
    buffer = getattr(frame, "buffer", None)
    return buffer if buffer is not None else memoryview(frame)


def encode_request(request_id: int | str, op: str, body: dict) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "body": body})


def request_id_of(envelope: Any) -> int | str | None:
    """The request id of a (possibly malformed) envelope, if it has a usable one."""
    if not isinstance(envelope, dict):
        return None
    request_id = envelope.get("id")
    if isinstance(request_id, bool):
        return None
    if isinstance(request_id, int) and -(2**63) <= request_id < 2**64:
        return request_id
    if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS:
        return request_id
    return None


def decode_request(frame0: Any, frames: list) -> Request:
    """Decode and check a request envelope. Raises ``ProtocolError`` (with the id, if found,
    on the exception as ``request_id``) for garbage, a wrong version, or a malformed field."""
    try:
        envelope = unpack(frame0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise _with_id(ProtocolError("bad_request", f"frame 0 is not a msgpack envelope ({type(exc).__name__}: {exc})"), None)
    request_id = request_id_of(envelope)
    if not isinstance(envelope, dict):
        raise _with_id(ProtocolError("bad_request", f"the envelope must be a map, got {type(envelope).__name__}"), None)
    version = envelope.get("v")
    if version != PROTOCOL_VERSION:
        raise _with_id(
            ProtocolError("bad_version", f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
            request_id,
        )
    if request_id is None:
        raise _with_id(ProtocolError("bad_request", f"the envelope needs an \"id\" (int or string of at most {MAX_REQUEST_ID_CHARS} chars)"), None)
    op = envelope.get("op")
    if not isinstance(op, str) or not op:
        raise _with_id(ProtocolError("bad_request", "the envelope needs an \"op\" string"), request_id)
    body = envelope.get("body", {})
    if not isinstance(body, dict):
        raise _with_id(ProtocolError("bad_request", f"\"body\" must be a map, got {type(body).__name__}"), request_id)
    unknown = set(envelope) - {"v", "id", "op", "body"}
    if unknown:
        raise _with_id(ProtocolError("bad_request", f"unknown envelope fields: {sorted(map(str, unknown))}"), request_id)
    return Request(request_id=request_id, op=op, body=body, frames=frames)


def encode_reply(request_id: int | str | None, body: dict) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "body": body})


def encode_error(request_id: int | str | None, code: str, message: str) -> bytes:
    if code not in ERROR_CODES:
        code, message = "internal", f"(unknown code {code!r}) {message}"
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "error": {"code": code, "message": message}})


def decode_reply(frame0: Any) -> tuple[int | str | None, dict]:
    """Client side: (request id, body) of a reply; raises ``ProtocolError`` for an error reply
    (or ``bad_request`` when the daemon's bytes are not a reply at all)."""
    try:
        envelope = unpack(frame0)
    except Exception as exc:
        raise ProtocolError("bad_request", f"the daemon's reply is not msgpack ({exc})") from None
    if not isinstance(envelope, dict):
        raise ProtocolError("bad_request", "the daemon's reply is not a map")
    request_id = envelope.get("id")
    error = envelope.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        exc = ProtocolError(code if code in ERROR_CODES else "internal", str(message))
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise exc
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "the daemon's reply has no body")
    return request_id, body


def _with_id(exc: ProtocolError, request_id: int | str | None) -> ProtocolError:
    exc.request_id = request_id  # type: ignore[attr-defined]
    return exc


# -- small body-field readers: every command checks its body with these, so that a wrong type
# -- is a bad_request naming the field, never a TypeError deep inside a handler.

_MISSING = object()


def field_of(body: dict, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``body[name]`` checked against ``kind`` (bool is not an int); ``default`` if absent."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ProtocolError("bad_request", f"body field {name!r} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError("bad_request", f"body field {name!r} must be {_kind_name(kinds)}, got a bool")
    if not isinstance(value, kinds):
        raise ProtocolError("bad_request", f"body field {name!r} must be {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an int", float: "a number", str: "a string", bytes: "bytes", list: "a list", dict: "a map", bool: "a bool"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def wire_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` made msgpack- and JSON-friendly: enums to their values, tuples and sets to
    lists, dataclasses to maps, map keys to strings, anything else unknown to ``str``.
    Used for status documents assembled from the tree manager's own ``status()``."""
    import dataclasses
    import enum

    if _depth > 32:
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        if isinstance(value, enum.Enum):
            return wire_safe(value.value, _depth + 1)
        return value
    if isinstance(value, enum.Enum):
        return wire_safe(value.value, _depth + 1)
    if isinstance(value, dict):
        return {str(k.value if isinstance(k, enum.Enum) else k): wire_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [wire_safe(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: wire_safe(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return wire_safe(as_dict(), _depth + 1)
    return str(value)
