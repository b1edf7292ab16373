"""Encoded graphs as documents (client side): files, their bytes, other weights bound in.

``save_encoded`` and ``load_encoded`` keep an ``EncodedGraph`` in one msgpack file, so that a
later process registers it without lowering the model again; ``pack_encoded`` and
``unpack_encoded`` are that document as bytes (the graph cache stores them without the module's
own weights); ``rebind_weights`` puts other weights into a graph's slots.

Invariants:
- Reading re-checks every blob against its hash; the documents hold data only.
- A file is written beside its path and renamed over it: readers see the old or the new file.
- ``rebind_weights`` returns byte for byte what ``encode_graph`` returns for the same graph with
  those weights, or raises ``PayloadError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Iterable, Mapping

import msgpack

from cgtree.payload.decode import _check_header
from cgtree.payload.format import (
    _HASH_RE, FORMAT_VERSION, EncodedGraph, InputSpec, PayloadError, WeightBlob, weight_hash,
)
from cgtree.payload.weights import pack_weight_blob, unpack_weight_blob


# --------------------------------------------------------------------------------------------
# Encoded graphs on disk (client side): lower once, register from the file in later processes


ENCODED_FILE_FORMAT = "cgtree.encoded"


def save_encoded(encoded: EncodedGraph, path) -> None:
    """Write ``encoded`` (graph bytes, weight blobs, input specs) to ``path`` as one msgpack
    document, so a later process can ``Client.register(load_encoded(path))`` without lowering
    the model again (``torch.export`` costs seconds in a fresh process). The file holds data
    only; ``load_encoded`` re-checks every hash. Written to a temporary file beside ``path``,
    then renamed: a reader sees the old file or the new one, never a part."""
    data = pack_encoded(encoded)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_encoded(path, *, max_bytes: int = 1 << 40) -> EncodedGraph:
    """Read a ``save_encoded`` file; ``PayloadError`` if it is malformed or any hash is wrong."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise PayloadError(f"{path}: {size} bytes, larger than the limit of {max_bytes}")
    with open(path, "rb") as fh:
        data = fh.read()
    return unpack_encoded(data, where=str(path))


def pack_encoded(encoded: EncodedGraph, *, omit_weights: Iterable[str] = ()) -> bytes:
    """The ``save_encoded`` document as bytes. ``omit_weights``: hashes whose blobs are left out
    (``unpack_encoded(..., allow_missing_weights=True)`` reads such a document; the graph cache
    stores graphs without the module's own parameters, which it binds again on a hit)."""
    omit = set(omit_weights)
    document = {
        "format": ENCODED_FILE_FORMAT,
        "version": FORMAT_VERSION,
        "graph": encoded.graph_bytes,
        "weight_hashes": list(encoded.weight_hashes),
        "weights": [[h, pack_weight_blob(b)] for h, b in encoded.weights.items() if h not in omit],
        "inputs": [[list(spec.shape), spec.dtype, spec.device] for spec in encoded.input_specs],
    }
    return msgpack.packb(document, use_bin_type=True)


def unpack_encoded(data: bytes, *, where: str = "encoded graph", allow_missing_weights: bool = False) -> EncodedGraph:
    """Parse ``pack_encoded`` bytes; ``PayloadError`` if malformed or any blob does not match its
    hash. Every weight the graph names must have its blob unless ``allow_missing_weights``."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # msgpack raises ValueError, StackError, ExtraData, ...
        raise PayloadError(f"{where}: malformed msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != ENCODED_FILE_FORMAT:
        raise PayloadError(f"{where}: not a {ENCODED_FILE_FORMAT} file")
    if doc.get("version") != FORMAT_VERSION:
        raise PayloadError(f"{where}: unsupported version {doc.get('version')!r} (this build reads {FORMAT_VERSION})")
    graph_bytes, hashes, weights, inputs = (doc.get(k) for k in ("graph", "weight_hashes", "weights", "inputs"))
    if type(graph_bytes) is not bytes or type(hashes) is not list or type(weights) is not list or type(inputs) is not list:
        raise PayloadError(f"{where}: expected graph (bin), weight_hashes, weights and inputs (lists)")
    blobs: dict[str, WeightBlob] = {}
    for entry in weights:
        if not (type(entry) is list and len(entry) == 2 and type(entry[0]) is str):
            raise PayloadError(f"{where}: each weight must be [hash, blob]")
        if type(entry[1]) is not bytes:
            raise PayloadError(f"{where}: weight {entry[0]} must be a packed blob (bin)")
        blob = unpack_weight_blob(entry[1], max_bytes=len(entry[1]))
        actual = weight_hash(blob.dtype, blob.shape, blob.data)
        if actual != entry[0]:
            raise PayloadError(f"{where}: weight {entry[0]} does not match its data (hash {actual})")
        blobs[entry[0]] = blob
    if not all(type(h) is str and _HASH_RE.match(h) for h in hashes):
        raise PayloadError(f"{where}: weight_hashes must be sha256 hex strings")
    if not allow_missing_weights and not all(h in blobs for h in hashes):
        raise PayloadError(f"{where}: weight_hashes name weights the file does not hold")
    specs = []
    for spec in inputs:
        if not (type(spec) is list and len(spec) == 3 and type(spec[0]) is list):
            raise PayloadError(f"{where}: each input spec must be [shape, dtype, device]")
        specs.append(InputSpec(tuple(spec[0]), str(spec[1]), str(spec[2])))
    return EncodedGraph(
        graph_id=hashlib.sha256(graph_bytes).hexdigest(),
        graph_bytes=graph_bytes,
        weights=blobs,
        weight_hashes=tuple(hashes),
        input_specs=tuple(specs),
    )


def rebind_weights(encoded: EncodedGraph, blobs: Mapping[int, WeightBlob]) -> EncodedGraph:
    """The same graph with other weights in some of its weight slots.

    ``blobs`` maps a weight position (placeholder order) to its new contents, which must have
    the dtype and shape the graph declares there. The weight hashes in the graph bytes are
    replaced, so the graph id changes with them; the result is byte for byte what
    ``encode_graph`` gives for the same graph with those weights (the document is re-packed
    with the encoder's msgpack options, after checking that re-packing the original gives the
    original bytes). Every weight of the result has its blob: those not rebound come from
    ``encoded.weights``. ``PayloadError`` on any mismatch.
    """
    try:
        document = msgpack.unpackb(encoded.graph_bytes, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise PayloadError(f"graph bytes: malformed msgpack ({type(exc).__name__}: {exc})") from None
    if msgpack.packb(document, use_bin_type=True) != encoded.graph_bytes:
        raise PayloadError("graph bytes are not in the encoder's canonical form; cannot rebind weights")
    _check_header(document)
    entries = document["weights"]
    if not (type(entries) is list and all(type(e) is list and len(e) == 3 for e in entries)):
        raise PayloadError("graph weights must be [hash, dtype, shape] entries")
    if [e[0] for e in entries] != list(encoded.weight_hashes):
        raise PayloadError("the graph's weight hashes differ from the EncodedGraph's weight_hashes")
    new_blobs: dict[str, WeightBlob] = {}
    for position, blob in blobs.items():
        if not (type(position) is int and 0 <= position < len(entries)):
            raise PayloadError(f"weight position {position!r} out of range for {len(entries)} weights")
        _, dtype, shape = entries[position]
        if blob.dtype != dtype or list(blob.shape) != list(shape):
            raise PayloadError(
                f"weight {position}: {blob.dtype}{list(blob.shape)} does not fit the graph's {dtype}{list(shape)}"
            )
        entries[position][0] = blob.content_hash()
        new_blobs[entries[position][0]] = blob
    hashes = tuple(e[0] for e in entries)
    weights: dict[str, WeightBlob] = {}
    for h in hashes:
        blob = new_blobs.get(h) or encoded.weights.get(h)
        if blob is None:
            raise PayloadError(f"weight {h} has no blob: rebind it or keep its blob in the EncodedGraph")
        weights[h] = blob
    graph_bytes = msgpack.packb(document, use_bin_type=True)
    return EncodedGraph(
        graph_id=hashlib.sha256(graph_bytes).hexdigest(),
        graph_bytes=graph_bytes,
        weights=weights,
        weight_hashes=hashes,
        input_specs=encoded.input_specs,
    )
