"""cgtreed's compile worker: a child process that compiles graphs with inductor so that the
daemon's serving loop never does (``cgtree.daemon.compile_service`` starts and feeds it).

Why a process and not a thread: inductor's compile is Python holding the GIL for seconds (tens
for a large model); a thread beside the serving loop would take the GIL from every submit for
up to ``sys.getswitchinterval()`` at each hand-over, several times per request. A process
shares nothing with the loop but the disk: it writes the compiled graph as an artifact file
(``cgtree.daemon.compiling``) that the daemon loads in a fraction of a second.

Wire (the worker's stdin and the duplicate of its stdout it keeps; everything it prints goes to
stderr, the daemon's log): a message is ``<u32 header length><JSON header><u64 blob length>
<blob>``. A job's header is ``{"job": int, "device": str, "path": str, "namespaces": [str]}``
and its blob the graph's payload bytes (``cgtree.payload``, already accepted by the daemon; the
worker decodes them again with the same allow-list: nothing is unpickled). A result's header is
``{"job": int, "ok": bool, "seconds": float, "error": str | None, "eager_reason": str | None}``
with an empty blob; ``eager_reason`` says why the graph keeps its ATen code (an op a CUDA graph
cannot hold: ``compiling.compile_decision``, judged here so that the loop never traces it).

Invariants:
- One job at a time, answered in order; EOF on stdin ends the worker (exit status 0).
- A job that fails answers ``ok: false`` with the reason; only a crash of the process itself
  goes unanswered (the daemon sees the exit).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Optional

_HEADER = struct.Struct("<I")
_BLOB = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 16

log = logging.getLogger("cgtree.daemon.compile_worker")


def pack_message(header: dict, blob: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return _HEADER.pack(len(encoded)) + encoded + _BLOB.pack(len(blob)) + blob


def unpack_message(buffer: bytearray) -> Optional[tuple[dict, bytes, int]]:
    """(header, blob, bytes used) of the first complete message in ``buffer``; None if incomplete."""
    if len(buffer) < _HEADER.size:
        return None
    (header_len,) = _HEADER.unpack_from(buffer)
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"compile worker message header of {header_len} bytes")
    blob_at = _HEADER.size + header_len
    if len(buffer) < blob_at + _BLOB.size:
        return None
    (blob_len,) = _BLOB.unpack_from(buffer, blob_at)
    end = blob_at + _BLOB.size + blob_len
    if len(buffer) < end:
        return None
    header = json.loads(bytes(buffer[_HEADER.size:blob_at]))
    return header, bytes(buffer[blob_at + _BLOB.size:end]), end


def _read_exactly(stream: BinaryIO, count: int) -> Optional[bytes]:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> Optional[tuple[dict, bytes]]:
    """The next message from a blocking stream; None at EOF."""
    head = _read_exactly(stream, _HEADER.size)
    if head is None:
        return None
    header = _read_exactly(stream, _HEADER.unpack(head)[0])
    size = _read_exactly(stream, _BLOB.size) if header is not None else None
    blob = _read_exactly(stream, _BLOB.unpack(size)[0]) if size is not None else None
    if blob is None:
        return None
    return json.loads(header), blob


def run_job(header: dict, blob: bytes) -> dict:
    """Decode, compile and save one graph; the result header."""
    import torch

    from cgtree.daemon.compiling import compile_artifact, compile_decision, describe_failure, example_inputs
    from cgtree.payload import decode_graph

    job = header.get("job")
    try:
        device = torch.device(header["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        decoded = decode_graph(blob, allowed_namespaces=tuple(header.get("namespaces", ())), device=device)
        examples = example_inputs(decoded, device)
        reason = compile_decision(decoded, examples[:len(decoded.weight_hashes)], device)
        if reason is not None:
            return {"job": job, "ok": False, "seconds": 0.0, "error": None, "eager_reason": reason}
        seconds = compile_artifact(decoded, device, Path(header["path"]), examples)
        return {"job": job, "ok": True, "seconds": round(seconds, 3), "error": None, "eager_reason": None}
    except Exception as exc:  # noqa: BLE001 - every failure is the job's answer
        log.warning("compile job %s failed: %s", job, describe_failure(exc))
        return {"job": job, "ok": False, "seconds": 0.0, "error": describe_failure(exc), "eager_reason": None}


def main() -> int:
    jobs = os.fdopen(0, "rb", buffering=0)
    results = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # whatever inductor or triton print goes to the log, not into the result stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"cgtreed compile worker[{os.getpid()}]: %(levelname)s %(message)s")
    while True:
        message = read_message(jobs)
        if message is None:
            return 0
        results.write(pack_message(run_job(*message)))


if __name__ == "__main__":
    sys.exit(main())
