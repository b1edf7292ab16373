"""Weight blobs: tensors to and from the bytes that travel beside graph payloads.

A blob is one weight's dtype name, shape and C-contiguous bytes (``WeightBlob``), named by its
content hash (``weight_hash``, in ``format``); ``pack_weight_blob`` and ``unpack_weight_blob``
are its wire form (docs/PAYLOAD.md).

Invariants:
- ``weight_to_tensor`` checks length and dtype, and the hash when given one (the daemon must
  give it); the tensor it returns owns a private, writable copy of the bytes.
- Unpacking caps sizes before msgpack allocates and fails only with ``PayloadError``.
"""

from __future__ import annotations

import ctypes
import math

import msgpack
import torch

from cgtree.payload.format import (
    _NAME_OF_DTYPE, DTYPES, FORMAT_VERSION, MAX_DIMS, WEIGHT_FORMAT_NAME, PayloadError, WeightBlob,
    _read_dtype, _read_shape, weight_hash,
)


def tensor_to_weight_blob(tensor: torch.Tensor, *, name: str = "weight") -> WeightBlob:
    """Copy a dense tensor's values into a blob (C-contiguous, native little-endian bytes)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise PayloadError(f"{name}: expected a plain tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise PayloadError(f"{name}: only dense (strided) tensors can be sent, got layout {tensor.layout}")
    if tensor.device.type == "meta":
        raise PayloadError(f"{name}: meta tensors carry no data (materialize the weights first)")
    dtype_name = _NAME_OF_DTYPE.get(tensor.dtype)
    if dtype_name is None:
        raise PayloadError(f"{name}: unsupported dtype {tensor.dtype} (supported: {', '.join(DTYPES)})")
    host = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    nbytes = host.numel() * host.element_size()
    # One memcpy of exactly the tensor's bytes; works for every dtype (numpy has no bfloat16).
    data = ctypes.string_at(host.data_ptr(), nbytes) if nbytes else b""
    return WeightBlob(dtype_name, tuple(int(d) for d in host.shape), data)


def weight_to_tensor(
    blob: WeightBlob, *, expected_hash: str | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Rebuild a weight as a fresh, writable tensor, checking length, dtype and optionally hash.

    The daemon must pass ``expected_hash`` for blobs it stores under a hash: otherwise a client
    could upload other bytes under the hash of someone else's weight.
    """
    if not isinstance(blob, WeightBlob):
        raise PayloadError(f"weight: expected a WeightBlob, got {type(blob).__name__}")
    dtype = _read_dtype(blob.dtype, "weight dtype")
    shape = _read_shape(list(blob.shape) if isinstance(blob.shape, tuple) else blob.shape, "weight shape")
    data = blob.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"weight data: expected bytes, got {type(data).__name__}")
    expected_len = math.prod(shape) * dtype.itemsize
    if len(data) != expected_len:
        raise PayloadError(
            f"weight data: {len(data)} bytes, but {blob.dtype}{list(shape)} needs {expected_len}"
        )
    if expected_hash is not None:
        actual = weight_hash(blob.dtype, shape, data)  # hashlib reads any buffer: no copy
        if actual != expected_hash:
            raise PayloadError(f"weight data does not match its hash: expected {expected_hash}, got {actual}")
    if expected_len == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        # bytearray(): a private, writable copy, so the tensor owns its memory.
        tensor = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    return tensor if device is None else tensor.to(device)


def pack_weight_blob(blob: WeightBlob) -> bytes:
    """Wire form of one blob: msgpack ``[format, version, dtype, shape, data(bin)]``."""
    return msgpack.packb(
        [WEIGHT_FORMAT_NAME, FORMAT_VERSION, blob.dtype, list(blob.shape), bytes(blob.data)],
        use_bin_type=True,
    )


def unpack_weight_blob(data: bytes, *, max_bytes: int = 1 << 40) -> WeightBlob:
    """Parse ``pack_weight_blob`` output; ``PayloadError`` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"weight blob: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes + 1024:
        raise PayloadError(f"weight blob: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=256,
            max_array_len=MAX_DIMS, max_map_len=0, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, StackError, ExtraData, ...
        raise PayloadError(f"weight blob: malformed msgpack ({type(exc).__name__}: {exc})") from None
    if not (type(obj) is list and len(obj) == 5):
        raise PayloadError("weight blob: expected [format, version, dtype, shape, data]")
    fmt, version, dtype, shape, blob_data = obj
    if fmt != WEIGHT_FORMAT_NAME:
        raise PayloadError(f"weight blob: format is {fmt!r}, expected {WEIGHT_FORMAT_NAME!r}")
    if type(version) is not int or version != FORMAT_VERSION:
        raise PayloadError(f"weight blob: unsupported version {version!r} (this build reads {FORMAT_VERSION})")
    _read_dtype(dtype, "weight blob dtype")
    if type(blob_data) is not bytes:
        raise PayloadError(f"weight blob data: expected bin, got {type(blob_data).__name__}")
    return WeightBlob(dtype, _read_shape(shape, "weight blob shape"), blob_data)
