"""A hostile client of cgtreed: generators of malformed, mutated and arbitrary messages for
every channel the daemon listens on, the client that sends them, and the checks every answer
must pass. Shared by the bounded hypothesis tests (``tests/daemon/test_protocol_fuzz.py``) and
the soak (``benchmarks/soak_fuzz.py``), so that what CI tries in seconds the soak tries 10^5
times.

Channels (``CHANNELS``), each a generator ``(rnd, target) -> Case``:

- ``envelope``: frame 0 of a ZeroMQ message as anything (random bytes, msgpack of an arbitrary
  document, a real envelope with its fields replaced, dropped or added), with 0-3 data frames.
- ``body``: a real request of every command (``templates``: hello, register, submit, release,
  reset, mark_step, status, ping, bye, reload, and an unknown op) sent from a session, with
  values anywhere in it replaced, keys dropped or added, its data frames changed.
- ``lane``: datagrams on the session's attached submit lane: bad headers, the ``body``
  mutations framed correctly, prepared-submit (plan) requests with any ids, kicks, empty and
  oversized datagrams.
- ``handshake``: the first datagram on a fresh lane connection: any bytes, the magic with any
  token, the real token.
- ``doorbell``: stores of any value into any word of the lane's doorbell page, a ring
  (``REQUEST``) with any sequence number and plan id, and a kick.
- ``flood``: up to a few hundred requests sent back to back without reading a reply, over
  ZeroMQ or the lane: the daemon must never block on a client that does not read (replies it
  cannot queue are dropped), and answers the next request of the same client as usual.

Generators draw from a ``random.Random``: in the tests hypothesis' ``st.randoms()``, which it
shrinks, in the soak a seeded one. ``Hostile.run(case)`` sends a case and returns an
``Outcome``; its ``problems`` name every property the daemon broke:

- a message the protocol answers is answered within ``reply_timeout_s`` (a hang, or a daemon
  that died, shows here first); a lane handshake is answered or the lane closed;
- an answer is a well-formed envelope (or a fixed-size plan reply), and an error carries a code
  of ``ERROR_CODES`` and a message; never ``internal`` (a bug), nor a code that cannot arise
  from one uid's bad input on a serving daemon (``forbidden``, ``unavailable``, and
  ``cuda_error`` on a CPU daemon);
- the request id is echoed whenever the envelope was readable far enough to find it (the
  same rule as ``cgtree.daemon.protocol.request_id_of``);
- what the protocol drops is dropped: a kick gets no answer, a ZeroMQ frame over
  ``max_message_bytes`` costs the sender its connection.

A well-behaved client submitting alongside is the caller's business (the tests interleave
one; the soak runs one in another process).

Invariants: nothing here deserializes the daemon's bytes but with msgpack; the hostile client
uses one uid and a bounded set of ZeroMQ identities (``IDENTITIES``), so sessions it opens
stay bounded however long it runs.
"""

from __future__ import annotations

import math
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import msgpack
import zmq

from cgtree.daemon.doorbell import ACK, KICK_MAGIC, PAGE_BYTES, REQUEST, SEQ_MASK, map_page, unmap_page
from cgtree.daemon.lane import LANE_MAGIC, LANE_MAX_BYTES, LANE_MAX_FRAMES, TOKEN_BYTES, header_of
from cgtree.daemon.plans import PLAN_REQUEST, PLAN_REQUEST_MAGIC, parse_plan_reply
from cgtree.daemon.protocol import ERROR_CODES, PROTOCOL_VERSION, request_id_of

CHANNELS = ("envelope", "body", "lane", "handshake", "doorbell", "flood")
IDENTITIES = 6  # ZeroMQ identities the hostile client speaks from; 0 owns the lane
WORDS = PAGE_BYTES // 8
PEEK_LIMIT = 64 * 1024  # the daemon reads the id of a too-large message only from a frame this small

# Codes no bad input of a single uid may cause on a daemon that is serving (CPU adds cuda_error).
IMPOSSIBLE_CODES = {"internal", "forbidden", "unavailable"}

SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 16, 64, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**53, 2**63 - 1, -(2**63), 2**64 - 1, -(2**31)]
SPECIAL_FLOATS = [0.0, -0.0, 0.5, 1.5, -2.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
SPECIAL_STRINGS = [
    "", " ", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:99", "cpu:0", "meta", "mps", "host", "device",
    "ping", "hello", "register", "submit", "release", "reset", "mark_step", "status", "bye", "reload",
    "float32", "float16", "bfloat16", "float128", "int64", "bool", "complex128", "uint64", "qint8",
    "cpu", "cuda", "output", "scalar", "none", "pickle", "graph", "payload", "weights", "inputs",
    "/torch_1_1", "/torch_0_0", "../../../etc/passwd", "\x00", "cpu\x00", "a" * 64, "a" * 65, "a" * 129,
    "é€😀", "\u202e", "g" * 64, "0" * 64, "good", "train", "fuzz",
]
FIELD_NAMES = ["v", "id", "op", "body", "device", "graph", "payload", "weights", "name", "inputs", "outputs",
               "pid", "client", "session_only", "kind", "dtype", "shape", "stride", "offset", "storage", "frame",
               "buffer", "generation", "byte_offset", "value", "handle", "size", "ref", "ref_offset", "extra"]


# ------------------------------------------------------------------------------- the target


@dataclass
class Target:
    """What the hostile client knows of the daemon: its endpoint and limits, and the graph it
    registered (whose id, payload, weights and input make templates real requests)."""

    endpoint: str
    max_message_bytes: int
    graph_id: str
    graph_bytes: bytes
    weights: dict  # hash -> raw bytes
    input_bytes: bytes  # one float32 [2, 4] input
    big_frames: bool = False  # allow frames over max_message_bytes (the soak; costly in CI)
    device: str = "cpu"  # the daemon's device the hostile graph is registered on
    pid: int = field(default_factory=os.getpid)


def fuzz_graph(seed: int = 7):
    """The hostile client's own model, lowered and encoded: ``(model, input, encoded)``."""
    import torch

    from cgtree.client.lowering import encode, lower

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    return model, x, encode(lower(model, [x]))


# ------------------------------------------------------------------------------- generators


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """Any msgpack value, biased towards what breaks parsers: edge numbers, wrong types, long
    or odd strings, bytes, nesting, ext types."""
    kind = rnd.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice(SPECIAL_INTS)
    if kind == 3:
        return rnd.randint(-(2**63), 2**64 - 1) if rnd.random() < 0.3 else rnd.randint(-3, 300)
    if kind == 4:
        return rnd.choice(SPECIAL_FLOATS)
    if kind == 5:
        return rnd.choice(SPECIAL_STRINGS)
    if kind == 6:
        return "".join(chr(rnd.choice((rnd.randint(32, 126), rnd.randint(0x80, 0xD7FF)))) for _ in range(rnd.randint(0, 24)))
    if kind == 7:
        return rnd.randbytes(rnd.choice((0, 1, 8, 16, 20, 32, rnd.randint(0, 200))))
    if kind == 8:
        if rnd.random() < 0.2:  # ext type -1: msgpack's timestamp
            return msgpack.Timestamp(rnd.randint(-(2**33), 2**34 - 1), rnd.randint(0, 999_999_999))
        return msgpack.ExtType(rnd.randint(0, 127), rnd.randbytes(rnd.randint(0, 12)))
    if kind == 9:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    if kind == 10:
        return {rnd.choice(FIELD_NAMES) if rnd.random() < 0.7 else random_value(rnd, 3): random_value(rnd, depth + 1)
                for _ in range(rnd.randint(0, 4))} if rnd.random() < 0.9 else {rnd.randint(0, 9): 1}
    nest: Any = rnd.choice((0, "x", {}))
    for _ in range(rnd.choice((10, 100, 400))):  # deeper still: ``deeply_nested`` (msgpack packs 511 levels)
        nest = [nest] if rnd.random() < 0.5 else {"k": nest}
    return nest


def deeply_nested(rnd: random.Random, request_id: int) -> bytes:
    """An envelope whose body nests deeper than msgpack's packer goes (written by hand): the
    unpacker's own limits, and every reader of the body after it."""
    depth = rnd.choice((600, 5000, 100_000))
    nest = b"".join(rnd.choice((b"\x91", b"\x81\xa1k")) for _ in range(depth)) + b"\xc0"
    return b"\x84" + b"".join(pack(x) for x in ("v", PROTOCOL_VERSION, "id", request_id, "op", rnd.choice(("ping", "status", "submit")))) \
        + pack("body") + nest


def pack(document: Any) -> bytes:
    """msgpack of any ``random_value`` (maps with non-string keys included: the peer may send them)."""
    return msgpack.packb(document, use_bin_type=True, strict_types=False)


def templates(target: Target) -> list[tuple[str, dict, list]]:
    """One real request per command (and variants): ``(op, body, frames)``."""
    gid, device = target.graph_id, target.device
    hashes = list(target.weights)
    cpu_input = {"kind": "cpu", "dtype": "float32", "shape": [2, 4], "frame": 0}
    return [
        ("ping", {}, []),
        ("hello", {"pid": target.pid, "name": None, "client": "hostile"}, []),
        ("hello", {"pid": target.pid, "name": "good", "client": "hostile"}, []),
        ("register", {"device": device, "graph": gid, "weights": {}}, []),
        ("register", {"device": device, "graph": gid, "payload": 0, "weights": {h: i + 1 for i, h in enumerate(hashes)},
                      "name": "Hostile"}, [target.graph_bytes, *target.weights.values()]),
        ("submit", {"device": device, "graph": gid, "inputs": [cpu_input]}, [target.input_bytes]),
        ("submit", {"device": device, "graph": gid, "inputs": [cpu_input], "outputs": "device"}, [target.input_bytes]),
        ("submit", {"device": device, "graph": gid, "inputs": pack([cpu_input])}, [target.input_bytes]),
        ("submit", {"device": device, "graph": gid, "inputs": [{"kind": "scalar", "value": 1.5}]}, []),
        ("submit", {"device": device, "graph": gid, "inputs": [{"kind": "output", "dtype": "float32", "shape": [2, 3],
                                                                "stride": [3, 1], "byte_offset": 0, "buffer": 1, "generation": 1}]}, []),
        ("submit", {"device": device, "graph": gid, "inputs": [{
            "kind": "cuda", "dtype": "float32", "shape": [2, 4], "stride": [4, 1], "offset": 0,
            "storage": {"device": 0, "handle": bytes(64), "size": 32, "offset": 0, "ref": "/torch_1_1", "ref_offset": 0}}]}, []),
        ("submit", {"device": device, "graph": gid, "inputs": [{
            "kind": "cuda", "dtype": "float32", "shape": [2, 4], "stride": [4, 1], "offset": 0,
            "storage": {"device": 0, "handle": bytes(56) + b"\x01" * 8, "size": 32, "offset": 0, "ref": "/torch_%d_0" % target.pid,
                        "ref_offset": 0}}]}, []),
        ("release", {"device": device, "graph": gid}, []),
        ("release", {"device": device, "graph": None}, []),
        ("reset", {"device": device}, []),
        ("mark_step", {"device": None}, []),
        ("status", {"session_only": True}, []),
        ("status", {}, []),
        ("reload", {}, []),
        ("bye", {}, []),
        ("launch_missiles", {}, []),
    ]


def _maps_and_lists(document: Any, depth: int = 0) -> list:
    found = [document] if isinstance(document, (dict, list)) else []
    if depth < 6:
        children = document.values() if isinstance(document, dict) else document if isinstance(document, list) else ()
        for child in children:
            found += _maps_and_lists(child, depth + 1)
    return found


def edge_value(rnd: random.Random, old: Any) -> Any:
    """A value of ``old``'s own type at its edges half the time (what passes a type check and
    breaks the next one: a negative pid, an empty shape, a 65-character name), else any value."""
    if rnd.random() < 0.5:
        return random_value(rnd)
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):  # signs and widths first: ids, pids, sizes, indices (msgpack's range)
        value = rnd.choice((0, -1, -old, old - 1, old + 1, -(2**31), -(2**63), 2**63 - 1, 2**64 - 1, rnd.choice(SPECIAL_INTS)))
        return min(max(value, -(2**63)), 2**64 - 1)
    if isinstance(old, float):
        return rnd.choice(SPECIAL_FLOATS)
    if isinstance(old, str):
        return rnd.choice(SPECIAL_STRINGS) if rnd.random() < 0.7 else old * rnd.choice((0, 2, 50))
    if isinstance(old, bytes):
        return rnd.choice((b"", old[:-1], old + b"\0", rnd.randbytes(len(old)), old * 2))
    if isinstance(old, list):
        return rnd.choice(([], old * 2, old[:-1], [rnd.choice(SPECIAL_INTS) for _ in old], old + [random_value(rnd)]))
    return random_value(rnd)


def mutate_document(rnd: random.Random, document: Any) -> Any:
    """One structural change anywhere in ``document`` (changed in place where it is a container):
    a value replaced (often by an edge value of its own type), a key dropped or added, an item
    inserted."""
    containers = _maps_and_lists(document)
    if not containers or rnd.random() < 0.05:
        return random_value(rnd)
    container = rnd.choice(containers)
    action = rnd.randrange(4)
    if isinstance(container, dict):
        if container and action == 0:
            del container[rnd.choice(list(container))]
        elif container and action in (1, 2):
            key = rnd.choice(list(container))
            container[key] = edge_value(rnd, container[key])
        else:
            container[rnd.choice(FIELD_NAMES) if rnd.random() < 0.8 else rnd.choice(SPECIAL_STRINGS)] = random_value(rnd)
    else:
        if container and action == 0:
            del container[rnd.randrange(len(container))]
        elif container and action in (1, 2):
            index = rnd.randrange(len(container))
            container[index] = edge_value(rnd, container[index])
        else:
            container.insert(rnd.randint(0, len(container)), random_value(rnd))
    return document


def mutate_frames(rnd: random.Random, frames: list, target: Target) -> list:
    frames = list(frames)
    action = rnd.randrange(6)
    if frames and action == 0:
        del frames[rnd.randrange(len(frames))]
    elif frames and action == 1:
        i = rnd.randrange(len(frames))
        frames[i] = frames[i][:rnd.randint(0, len(frames[i]))]
    elif frames and action == 2:
        i = rnd.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rnd.randint(1, 4)):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        frames[i] = bytes(data)
    elif action == 3:
        frames.insert(rnd.randint(0, len(frames)), random_frame(rnd, target))
    elif frames and action == 4:
        rnd.shuffle(frames)
    else:
        frames += [b""] * rnd.randint(1, 3)
    return frames


def random_frame(rnd: random.Random, target: Target) -> bytes:
    size = rnd.choice((0, 1, 4, 16, 32, 64, rnd.randint(0, 4096)))
    if target.big_frames and rnd.random() < 0.01:
        size = rnd.choice((target.max_message_bytes // 2 + 1, target.max_message_bytes + 1))
    return rnd.randbytes(size) if size <= 4096 else bytes(size)


def envelope_of(op: str, body: Any, request_id: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "body": body}


def gen_envelope(rnd: random.Random, target: Target) -> "Case":
    """Frame 0 as anything; a few data frames."""
    choice = rnd.randrange(11)
    if choice == 10:
        frame0 = deeply_nested(rnd, rnd.randint(1, 10**6))
    elif choice < 2:
        frame0 = rnd.randbytes(rnd.randint(0, 300))
    elif choice < 4:
        frame0 = pack(random_value(rnd))
    else:
        envelope = envelope_of(rnd.choice(("ping", "status", "hello")), {}, rnd.randint(1, 10**6))
        for _ in range(rnd.randint(1, 3)):
            envelope = mutate_document(rnd, envelope)
        frame0 = pack(envelope)
    frames = [frame0] + [random_frame(rnd, target) for _ in range(rnd.choice((0, 0, 1, 2, 3)))]
    if rnd.random() < 0.1:
        frames.insert(0, b"")  # a REQ socket's delimiter, or a sender pretending to be one
    return Case("envelope", frames, identity=rnd.randrange(IDENTITIES), needs_session=False)


def gen_body(rnd: random.Random, target: Target) -> "Case":
    """A real request of any command, mutated."""
    op, body, frames = rnd.choice(templates(target))
    envelope = envelope_of(op, msgpack.unpackb(pack(body), raw=False, strict_map_key=False), rnd.randint(1, 2**31))
    for _ in range(rnd.choice((0, 1, 1, 1, 2, 3))):
        # Mostly inside the body: the envelope's own fields are the envelope channel's.
        if rnd.random() < 0.85 and isinstance(envelope, dict) and isinstance(envelope.get("body"), dict):
            envelope["body"] = mutate_document(rnd, envelope["body"])
        else:
            envelope = mutate_document(rnd, envelope)
    if rnd.random() < 0.3:
        frames = mutate_frames(rnd, frames, target)
    return Case("body", [pack(envelope), *frames], identity=rnd.randrange(IDENTITIES), needs_session=True,
                op=op)


def raw_datagram(rnd: random.Random) -> bytes:
    """Bytes that are not a well-formed datagram, mostly: counts past the limit, lengths that
    do not add up, truncated headers."""
    choice = rnd.randrange(5)
    if choice == 0:
        return rnd.randbytes(rnd.randint(0, 64))
    if choice == 1:
        count = rnd.choice((0, 1, 2, LANE_MAX_FRAMES, LANE_MAX_FRAMES + 1, 2**32 - 1, rnd.randint(0, 1000)))
        lengths = [rnd.choice((0, 1, 7, 2**31, 2**32 - 1)) for _ in range(min(count, rnd.randint(0, 4)))]
        return struct.pack(f"<I{len(lengths)}I", count, *lengths) + rnd.randbytes(rnd.randint(0, 32))
    if choice == 2:
        return struct.pack("<I", 1)  # one frame announced, its length missing
    frames = [rnd.randbytes(rnd.randint(0, 40)) for _ in range(rnd.randint(0, 5))]
    data = bytearray(header_of(frames) + b"".join(frames))
    if data and choice == 3:
        cut = rnd.randint(0, len(data) - 1)
        return bytes(data[:cut]) if rnd.random() < 0.5 else bytes(data) + rnd.randbytes(rnd.randint(1, 9))
    return bytes(data)


def gen_lane(rnd: random.Random, target: Target) -> "Case":
    """A datagram on the attached lane."""
    choice = rnd.randrange(20)
    if choice < 5:
        return Case("lane", [], datagram=raw_datagram(rnd))
    if choice < 12:
        body = gen_body(rnd, target)
        frames = [f for f in body.frames if len(f) < LANE_MAX_BYTES // 2][:LANE_MAX_FRAMES]
        return Case("lane", frames, datagram=header_of(frames) + b"".join(frames), op=body.op)
    if choice < 16:
        plan_id = rnd.choice((rnd.randint(0, 256), rnd.randint(0, 2**64 - 1), 0, 2**32, 2**64 - 1))
        frame = PLAN_REQUEST.pack(PLAN_REQUEST_MAGIC, rnd.randint(-(2**63), 2**63 - 1), plan_id)
        if rnd.random() < 0.15:  # the magic, one byte short or long
            frame = frame[:-1] if rnd.random() < 0.5 else frame + b"\0"
        return Case("lane", [frame], datagram=header_of([frame]) + frame)
    if choice < 18:
        frames = [KICK_MAGIC] if rnd.random() < 0.7 else [KICK_MAGIC + rnd.randbytes(rnd.randint(1, 4))]
        return Case("lane", frames, datagram=header_of(frames) + b"".join(frames))
    frames = rnd.choice(([], [b""], [b""] * rnd.randint(2, LANE_MAX_FRAMES + 2),
                         [bytes(LANE_MAX_BYTES)], [bytes(rnd.randint(LANE_MAX_BYTES // 2, LANE_MAX_BYTES - 8))]))
    data = header_of(frames) + b"".join(frames)
    return Case("lane", frames, datagram=data[:200_000])


def gen_handshake(rnd: random.Random, target: Target) -> "Case":
    """The first datagram of a new lane connection."""
    choice = rnd.randrange(6)
    if choice == 0:
        return Case("handshake", [], datagram=raw_datagram(rnd))
    token = rnd.randbytes(rnd.choice((TOKEN_BYTES, TOKEN_BYTES, 0, 15, 17, 64)))
    magic = LANE_MAGIC if choice < 4 else rnd.choice((b"", LANE_MAGIC[:-1], b"cgtree-lane-2", rnd.randbytes(13)))
    frames = [magic, token] if choice != 3 else [magic, token, random_frame(rnd, target)]
    if choice == 2:
        frames = [LANE_MAGIC, b"<the session's token>"]  # replaced by the real token when sent
    return Case("handshake", frames, datagram=header_of(frames) + b"".join(frames))


def gen_doorbell(rnd: random.Random, target: Target) -> "Case":
    """Stores into the page (any word but REQUEST, any value), then maybe a ring."""
    stores = []
    for _ in range(rnd.choice((0, 1, 2, 4))):
        index = rnd.choice((ACK, ACK - 1, 8, 16, 24, 32, rnd.randrange(1, WORDS)))
        stores.append((index, rnd.choice((0, 1, SEQ_MASK, 2**64 - 1, rnd.getrandbits(64)))))
    ring = None
    if rnd.random() < 0.85:
        seq = rnd.choice((0, 1, SEQ_MASK, rnd.randint(1, SEQ_MASK)))
        plan_id = rnd.choice((0, 1, rnd.randint(0, 256), rnd.getrandbits(32)))
        ring = (seq, plan_id)
    return Case("doorbell", [], stores=stores, ring=ring)


def gen_flood(rnd: random.Random, target: Target) -> "Case":
    """Requests back to back, none of their replies read."""
    messages = []
    for _ in range(rnd.choice((8, 64, 300))):
        op, body, frames = rnd.choice(templates(target)[:1] + [t for t in templates(target) if t[0] in ("status", "submit")])
        messages.append([pack(envelope_of(op, body, rnd.randint(1, 2**31))), *frames])
    return Case("flood", messages, identity=rnd.randrange(IDENTITIES), needs_session=True, op="lane" if rnd.random() < 0.5 else "zmq")


GENERATORS: dict[str, Callable[[random.Random, Target], "Case"]] = {
    "envelope": gen_envelope, "body": gen_body, "lane": gen_lane, "handshake": gen_handshake, "doorbell": gen_doorbell,
    "flood": gen_flood,
}


# ------------------------------------------------------------------------------ cases, checks


@dataclass
class Case:
    channel: str
    frames: list  # ZeroMQ frames, or the frames a lane datagram carries
    identity: int = 0
    needs_session: bool = False
    op: Optional[str] = None
    datagram: Optional[bytes] = None  # lane channels: the exact bytes sent
    stores: list = field(default_factory=list)  # doorbell: (word, value)
    ring: Optional[tuple[int, int]] = None  # doorbell: (seq, plan id)

    def describe(self) -> str:
        head = f"{self.channel}" + (f" op={self.op}" if self.op else "")
        if self.channel == "doorbell":
            return f"{head} stores={self.stores} ring={self.ring}"
        if self.datagram is not None:
            return f"{head} datagram={self.datagram[:64]!r} ({len(self.datagram)} bytes)"
        return f"{head} frames={[bytes(f[:48]) for f in self.frames][:6]}"


@dataclass
class Outcome:
    channel: str
    answered: bool = False
    code: Optional[str] = None  # the error code, "ok", or None (nothing to answer)
    problems: list = field(default_factory=list)


def expected_id(frames: list, max_message_bytes: int) -> Any:
    """The request id the daemon must echo for these envelope frames (``None``: unreadable)."""
    if not frames:
        return None
    total = sum(len(f) for f in frames)
    if total > max_message_bytes and len(frames[0]) > PEEK_LIMIT:
        return None
    try:
        document = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, use_list=True)
    except Exception:  # noqa: BLE001 - garbage: no id to echo
        return None
    return request_id_of(document)


def check_envelope(reply: bytes, wanted_id: Any, *, cpu: bool, where: str) -> tuple[Optional[str], list[str]]:
    """(code or "ok", problems) of one reply envelope."""
    try:
        envelope = msgpack.unpackb(reply, raw=False)
    except Exception as exc:  # noqa: BLE001
        return None, [f"{where}: the reply is not msgpack ({exc})"]
    if not isinstance(envelope, dict) or envelope.get("v") != PROTOCOL_VERSION:
        return None, [f"{where}: the reply is not an envelope: {envelope!r:.200}"]
    problems = []
    if envelope.get("id") != wanted_id and not (wanted_id is None and envelope.get("id") is None):
        problems.append(f"{where}: reply id {envelope.get('id')!r:.80} is not the request's {wanted_id!r:.80}")
    error = envelope.get("error")
    if error is None:
        if not isinstance(envelope.get("body"), dict):
            problems.append(f"{where}: a success reply without a body map")
        return "ok", problems
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if code not in ERROR_CODES:
        problems.append(f"{where}: unknown error code {code!r}")
    if not isinstance(message, str) or not message.strip():
        problems.append(f"{where}: error {code} without a message")
    if code in IMPOSSIBLE_CODES or (cpu and code == "cuda_error"):
        problems.append(f"{where}: error {code}: {message}")
    return code, problems


# ------------------------------------------------------------------------------- the client


class Hostile:
    """Sends cases. ``setup()`` opens identity 0's session, registers the hostile model and
    attaches the lane (with its doorbell page where the daemon offers one)."""

    def __init__(self, endpoint: str, *, max_message_bytes: int, reply_timeout_s: float = 10.0, device: str = "cpu",
                 big_frames: bool = False) -> None:
        self.endpoint = endpoint
        self.device = device
        self.max_message_bytes = max_message_bytes
        self.reply_timeout_s = reply_timeout_s
        self.cpu = device == "cpu"
        self.big_frames = big_frames
        self.context = zmq.Context()
        self.dealers: list[Optional[zmq.Socket]] = [None] * IDENTITIES
        self.routing_ids = [b"hostile-%d-%s" % (i, os.urandom(8).hex().encode()) for i in range(IDENTITIES)]
        self.in_session = [False] * IDENTITIES
        self.lane: Optional[socket.socket] = None
        self.lane_path: Optional[str] = None
        self.token: Optional[bytes] = None
        self.page: Any = None
        self.words: Optional[memoryview] = None
        self.last_seq: Optional[int] = None
        self.target: Optional[Target] = None
        self._next_id = 1

    # -- plumbing ------------------------------------------------------------------------------

    def dealer(self, index: int) -> zmq.Socket:
        sock = self.dealers[index]
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, self.routing_ids[index])
            sock.connect(self.endpoint)
            self.dealers[index] = sock
        return sock

    def _request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def call(self, index: int, op: str, body: dict, frames: tuple = ()) -> dict:
        """A well-formed request from identity ``index``: the reply envelope."""
        sock = self.dealer(index)
        _drain(sock)
        sock.send_multipart([pack(envelope_of(op, body, self._request_id())), *frames])
        if not sock.poll(int(self.reply_timeout_s * 1000)):
            raise TimeoutError(f"no reply to {op} within {self.reply_timeout_s} s")
        return msgpack.unpackb(sock.recv_multipart()[0], raw=False)

    def setup(self) -> Target:
        _, x, encoded = fuzz_graph()
        self.encoded = encoded
        self.target = Target(self.endpoint, self.max_message_bytes, encoded.graph_id, encoded.graph_bytes,
                             {h: bytes(blob.data) for h, blob in encoded.weights.items()}, x.numpy().tobytes(),
                             big_frames=self.big_frames, device=self.device)
        self.ensure_session(0)
        self.attach_lane()
        return self.target

    def ensure_session(self, index: int) -> None:
        """Identity ``index`` has a session holding the hostile graph (said hello, registered)."""
        if self.in_session[index]:
            return
        reply = self.call(index, "hello", {"pid": os.getpid(), "client": "hostile"})
        body = reply["body"]
        if index == 0:
            self.lane_path, self.token = (body["lane"]["path"], body["lane"]["token"]) if "lane" in body else (None, None)
            self.close_lane()
        target = self.target
        by_id = {"device": target.device, "graph": target.graph_id, "weights": {}}
        reply = self.call(index, "register", by_id)
        if reply["body"]["need_payload"]:  # every session holding it closed: the device dropped it
            reply = self.call(index, "register", {**by_id, "payload": 0, "weights": {h: i + 1 for i, h in enumerate(target.weights)}},
                              (target.graph_bytes, *target.weights.values()))
        deadline = time.monotonic() + 600  # a CUDA daemon compiles a new graph first (daemon.compile)
        while reply["body"].get("compiling") and time.monotonic() < deadline:
            time.sleep(0.2)
            reply = self.call(index, "register", by_id)
        if not reply["body"]["registered"]:
            raise RuntimeError(f"the hostile graph could not be registered: {reply}")
        self.in_session[index] = True

    def attach_lane(self) -> None:
        if self.lane is not None or self.lane_path is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(self.reply_timeout_s)
        sock.connect(self.lane_path)
        sock.sendmsg([header_of([LANE_MAGIC, self.token]), LANE_MAGIC, self.token])
        answer, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        frames = _split(answer)
        if not frames or frames[0] != b"ok":
            sock.close()
            raise RuntimeError(f"the hostile lane was refused: {frames}")
        if fds:
            self.page, self.words = map_page(fds[0])
            os.close(fds[0])
            self.last_seq = self.words[REQUEST] & SEQ_MASK
        sock.setblocking(False)
        self.lane = sock

    def close_lane(self) -> None:
        if self.words is not None:
            unmap_page(self.page, self.words)
            self.page = self.words = None
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    def close(self) -> None:
        self.close_lane()
        for sock in self.dealers:
            if sock is not None:
                sock.close(0)
        self.context.term()

    def _session_lost(self, index: int) -> None:
        self.in_session[index] = False
        if index == 0:
            self.close_lane()

    # -- cases ---------------------------------------------------------------------------------

    def run(self, case: Case) -> Outcome:
        if case.channel in ("lane", "doorbell"):
            self.ensure_session(0)
            self.attach_lane()
            if self.lane is None or (case.channel == "doorbell" and self.words is None):
                return Outcome(case.channel, code="skipped")
            return self._lane_case(case) if case.channel == "lane" else self._doorbell_case(case)
        if case.channel == "handshake":
            if self.lane_path is None:
                return Outcome(case.channel, code="skipped")
            return self._handshake_case(case)
        if case.channel == "flood":
            return self._flood_case(case)
        if case.needs_session:
            self.ensure_session(case.identity)
        return self._zmq_case(case)

    def _zmq_case(self, case: Case) -> Outcome:
        outcome = Outcome(case.channel)
        sock = self.dealer(case.identity)
        _drain(sock)
        frames = case.frames
        sock.send_multipart(frames)
        if any(len(f) > self.max_message_bytes for f in frames):
            # The protocol: libzmq drops the connection (MAXMSGSIZE); nothing to answer. The
            # dealer reconnects by itself, under the same identity (its session is kept).
            if sock.poll(200):
                outcome.problems.append("a frame over max_message_bytes was answered instead of dropped")
            return outcome
        if not sock.poll(int(self.reply_timeout_s * 1000)):
            outcome.problems.append(f"no reply within {self.reply_timeout_s} s to {case.describe()}")
            return outcome
        reply = sock.recv_multipart()
        body_frames = frames
        if len(frames) >= 2 and len(frames[0]) == 0:  # a REQ delimiter is echoed
            body_frames = frames[1:]
            if reply[0] != b"":
                outcome.problems.append("the empty delimiter frame was not echoed")
            reply = reply[1:]
        outcome.answered = True
        outcome.code, problems = check_envelope(reply[0], expected_id(body_frames, self.max_message_bytes), cpu=self.cpu,
                                                where=case.describe())
        outcome.problems += problems
        self._after(case.identity, body_frames, outcome.code)
        return outcome

    def _after(self, identity: int, frames: list, code: Optional[str]) -> None:
        """What a case may have done to the identity's session: a hello (even a refused one may
        have closed it first) or a bye ends it, as ``no_session`` says it has ended."""
        if code == "no_session" or _op_of(frames) in ("hello", "bye"):
            self._session_lost(identity)

    def _lane_case(self, case: Case) -> Outcome:
        outcome = Outcome(case.channel)
        _drain_lane(self.lane)
        try:
            self.lane.send(case.datagram)
        except OSError as exc:  # EMSGSIZE for a datagram over the socket buffer; the lane may be gone
            if exc.errno == 90:  # EMSGSIZE: the kernel refused it: nothing reached the daemon
                return outcome
            self._session_lost(0)
            return outcome
        frames = _split(case.datagram)
        if frames == [KICK_MAGIC]:
            if _poll(self.lane, 0.05):
                outcome.problems.append("a kick was answered")
            return outcome
        reply = self._lane_reply(outcome, case)
        if reply is None:
            return outcome
        outcome.answered = True
        wanted = None
        if frames is not None and len(case.datagram) <= LANE_MAX_BYTES:
            if len(frames) == 1 and len(frames[0]) == PLAN_REQUEST.size and frames[0][:4] == PLAN_REQUEST_MAGIC:
                wanted = PLAN_REQUEST.unpack(frames[0])[1]
                plan = parse_plan_reply(reply[0]) if len(reply) == 1 else None
                if plan is not None:
                    outcome.code = "plan"
                    if plan[0] != wanted:
                        outcome.problems.append(f"plan reply id {plan[0]} is not the request's {wanted}")
                    return outcome
            elif frames:
                wanted = expected_id(frames, self.max_message_bytes)
        outcome.code, problems = check_envelope(reply[0], wanted, cpu=self.cpu, where=case.describe())
        outcome.problems += problems
        self._after(0, frames or [], outcome.code)
        return outcome

    def _lane_reply(self, outcome: Outcome, case: Case) -> Optional[list]:
        """The reply's frames on the lane (or over ZeroMQ after ``MOVED``); None when the lane
        closed or nothing came (noted as a problem)."""
        if not _poll(self.lane, self.reply_timeout_s):
            outcome.problems.append(f"no lane reply within {self.reply_timeout_s} s to {case.describe()}")
            return None
        try:
            data = self.lane.recv(LANE_MAX_BYTES + 4096)
        except OSError:
            data = b""
        if not data:
            self._session_lost(0)
            # The daemon closes a lane unanswered only when its request ended the session (a
            # hello or bye sent on the lane, where clients never send them); else it answers
            # first (``no_session``). Anything else is a daemon that died or dropped us.
            if case.channel != "lane" or _op_of(_split(case.datagram) or []) not in ("hello", "bye"):
                outcome.problems.append(f"the daemon closed the lane without answering {case.describe()}")
            return None
        reply = _split(data)
        if reply is None or (reply and len(reply[0]) == 0 and len(reply) == 1):
            outcome.problems.append(f"an unreadable lane reply {data[:40]!r}")
            return None
        if not reply:  # MOVED: the reply came over ZeroMQ, to identity 0
            sock = self.dealer(0)
            if not sock.poll(int(self.reply_timeout_s * 1000)):
                outcome.problems.append("MOVED, but no reply over ZeroMQ")
                return None
            reply = sock.recv_multipart()
        return reply

    def _handshake_case(self, case: Case) -> Outcome:
        outcome = Outcome(case.channel)
        datagram = case.datagram
        if case.frames == [LANE_MAGIC, b"<the session's token>"] and self.token is not None:
            datagram = header_of([LANE_MAGIC, self.token]) + LANE_MAGIC + self.token
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(self.reply_timeout_s)
            sock.connect(self.lane_path)
            try:
                sock.send(datagram)
            except OSError as exc:
                if exc.errno == 90:
                    return outcome
                raise
            answer, fds, _, _ = socket.recv_fds(sock, LANE_MAX_BYTES, 4)
            for fd in fds:
                os.close(fd)
            outcome.answered = True
            frames = _split(answer) if answer else None
            if not answer:
                outcome.code = "closed"
            elif frames and frames[0] == b"ok":
                outcome.code = "ok"
            elif frames and frames[0] == b"refused":
                outcome.code = "refused"
                if len(frames) < 2 or not frames[1]:
                    outcome.problems.append("a refusal without a reason")
            elif frames:
                outcome.code, problems = check_envelope(frames[0], None, cpu=self.cpu, where=case.describe())
                outcome.problems += problems
            else:
                outcome.problems.append(f"an unreadable handshake answer {answer[:40]!r}")
        except socket.timeout:
            outcome.problems.append(f"no handshake answer within {self.reply_timeout_s} s to {case.describe()}")
        except OSError as exc:
            outcome.code = "closed"  # reset by the daemon closing a refused lane
            if exc.errno not in (104, 32):
                outcome.problems.append(f"handshake: {exc}")
        finally:
            sock.close()
        if outcome.code == "ok" and case.frames == [LANE_MAGIC, b"<the session's token>"]:
            self.close_lane()  # the daemon closed our older lane: one per session
        return outcome

    def _flood_case(self, case: Case) -> Outcome:
        """Send every message without reading; read what comes back until it is quiet (replies
        the client's queue could not take were dropped by the daemon: the protocol says so);
        then the same client's next request must be answered as usual."""
        outcome = Outcome(case.channel)
        on_lane = case.op == "lane"
        index = 0 if on_lane else case.identity
        self.ensure_session(index)
        if on_lane:
            self.attach_lane()
            if self.lane is None:
                return Outcome(case.channel, code="skipped")
            for frames in case.frames:
                if not _send_quietly(self.lane, header_of(frames) + b"".join(frames)):
                    break  # the lane's queue is full (the daemon does not read faster): enough
        else:
            sock = self.dealer(index)
            for frames in case.frames:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
        deadline = time.monotonic() + self.reply_timeout_s * 3
        while time.monotonic() < deadline:
            reply = self._any_reply(on_lane, index, min(deadline, time.monotonic() + 0.05))
            if reply is None:
                break  # quiet
            outcome.problems += check_envelope(reply[0], _id_of(reply[0]), cpu=self.cpu, where="flood")[1]
        else:
            outcome.problems.append(f"replies to a flood of {len(case.frames)} requests still came after {self.reply_timeout_s * 3} s")
            return outcome
        probe_id = self._request_id()
        probe = [pack(envelope_of("ping", {}, probe_id))]
        if on_lane:
            if not _send_quietly(self.lane, header_of(probe) + probe[0]):
                self._session_lost(0)  # closed under us (a fuzzed bye in the flood): fine
                return outcome
        else:
            self.dealer(index).send_multipart(probe)
        probe_deadline = time.monotonic() + self.reply_timeout_s
        while True:  # stragglers of the flood may come first: checked, then passed over
            reply = self._any_reply(on_lane, index, probe_deadline)
            if reply is None:
                outcome.problems.append(f"no answer to a ping after a flood of {len(case.frames)} requests over "
                                        f"{'the lane' if on_lane else 'ZeroMQ'}")
                return outcome
            if _id_of(reply[0]) == probe_id:
                break
            outcome.problems += check_envelope(reply[0], _id_of(reply[0]), cpu=self.cpu, where="flood")[1]
        outcome.answered = True
        outcome.code, problems = check_envelope(reply[0], probe_id, cpu=self.cpu, where="flood probe")
        outcome.problems += problems
        return outcome

    def _any_reply(self, on_lane: bool, index: int, deadline: float) -> Optional[list]:
        """The next reply on the lane (or ZeroMQ after MOVED) or identity ``index``'s socket,
        waiting until ``deadline``; None when none came."""
        remaining = max(0.0, deadline - time.monotonic())
        if on_lane:
            if not _poll(self.lane, remaining):
                return None
            try:
                data = self.lane.recv(LANE_MAX_BYTES + 4096)
            except OSError:
                return None
            frames = _split(data) if data else None
            if frames == []:  # MOVED
                sock = self.dealer(0)
                return sock.recv_multipart() if sock.poll(int(remaining * 1000)) else None
            return frames
        sock = self.dealer(index)
        return sock.recv_multipart() if sock.poll(int(remaining * 1000)) else None

    def _doorbell_case(self, case: Case) -> Outcome:
        outcome = Outcome(case.channel)
        words = self.words
        for index, value in case.stores:
            if index != REQUEST:
                words[index] = value
        if case.ring is None:
            return outcome
        seq, plan_id = case.ring
        if words[ACK] & SEQ_MASK == seq:
            words[ACK] = 0  # an ack stored by ourselves above is not the daemon's answer
        _drain_lane(self.lane)
        words[REQUEST] = (plan_id << 32) | seq
        send_ok = _send_quietly(self.lane, header_of([KICK_MAGIC]) + KICK_MAGIC)
        if seq == 0 or seq == self.last_seq:
            self.last_seq = seq if seq else self.last_seq
            if not send_ok:
                self._session_lost(0)
            return outcome  # nothing rung: nothing to answer (the daemon saw this seq already)
        self.last_seq = seq
        deadline = time.monotonic() + self.reply_timeout_s
        while time.monotonic() < deadline:
            ack = words[ACK]
            if ack & SEQ_MASK == seq:
                outcome.answered = True
                outcome.code = {1: "replayed", 2: "on_lane"}.get(ack >> 32, f"status {ack >> 32}")
                if ack >> 32 == 2:  # ON_LANE: the reply was sent before the ack
                    reply = self._lane_reply(outcome, case)
                    if reply is not None:
                        outcome.code, problems = check_envelope(reply[0], seq, cpu=self.cpu, where=case.describe())
                        outcome.problems += problems
                elif ack >> 32 != 1:
                    outcome.problems.append(f"doorbell ack with status {ack >> 32}")
                return outcome
            if _poll(self.lane, 0.0005):  # the lane may carry the reply before the ack
                continue
        outcome.problems.append(f"no doorbell answer within {self.reply_timeout_s} s to {case.describe()}")
        return outcome


# ----------------------------------------------------------------------------------- helpers


def _drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


def _drain_lane(sock: socket.socket) -> None:
    """Drop datagrams left from an earlier case (an answer that came after its deadline)."""
    while True:
        try:
            if not sock.recv(LANE_MAX_BYTES + 4096, socket.MSG_DONTWAIT):
                return  # EOF: the next read says so again
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return


def _id_of(envelope: bytes) -> Any:
    try:
        document = msgpack.unpackb(envelope, raw=False)
    except Exception:  # noqa: BLE001
        return None
    return document.get("id") if isinstance(document, dict) else None


def _op_of(frames: list) -> Any:
    """The op of an envelope, if it is readable as one."""
    try:
        document = msgpack.unpackb(frames[0], raw=False) if frames else None
    except Exception:  # noqa: BLE001
        return None
    return document.get("op") if isinstance(document, dict) else None


def _poll(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


def _send_quietly(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.send(data)
        return True
    except OSError:
        return False


def _split(data: bytes) -> Optional[list]:
    """The frames of a datagram (bytes), or None when its header does not describe it."""
    if len(data) < 4:
        return None
    (count,) = struct.unpack_from("<I", data, 0)
    head = 4 * (1 + count)
    if count > LANE_MAX_FRAMES or len(data) < head:
        return None
    lengths = struct.unpack_from(f"<{count}I", data, 4)
    if head + sum(lengths) != len(data):
        return None
    frames, cursor = [], head
    for length in lengths:
        frames.append(bytes(data[cursor:cursor + length]))
        cursor += length
    return frames
