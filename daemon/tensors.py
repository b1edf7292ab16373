"""Tensors on the wire: descriptors, CPU frames and CUDA IPC handles, for both ends.

A tensor travels as a descriptor (a msgpack map in the body) plus, for CPU tensors, one raw
frame of its bytes. Descriptor kinds:

- ``cpu``:    ``{"kind": "cpu", "dtype", "shape", "frame"}``; the frame holds exactly
  ``numel * itemsize`` bytes of the contiguous tensor. Received zero-copy (``torch.frombuffer``
  over the ZeroMQ frame).
- ``cuda``:   ``{"kind": "cuda", "dtype", "shape", "stride", "offset", "storage": IPC}`` where
  IPC = ``{"device", "handle", "size", "offset", "ref", "ref_offset"}`` is the first six fields
  of ``UntypedStorage._share_cuda_()`` (see ``torch/multiprocessing/reductions.py``), sent as
  msgpack bytes and ints, never pickled. ``offset`` is the tensor's storage offset in elements.
- ``output``: a view of a daemon-owned output buffer: ``{"kind": "output", "dtype", "shape",
  "stride", "byte_offset", "buffer", "generation"}``. Replies use it for CUDA outputs (the
  reply's ``buffers`` list carries each buffer's IPC export); requests use it to pass an
  earlier output back in as an input without re-exporting it (a storage opened from another
  process cannot be re-shared).
- ``none`` / ``scalar``: a graph output that is not a tensor (``{"kind": "scalar", "value"}``).

Invariants:
- Every descriptor is validated before any memory is touched: dtype from ``DTYPES`` (an
  allow-list), at most ``MAX_DIMS`` non-negative int sizes and strides, the extent inside the
  storage or frame, the device one the daemon serves. A failure is ``ProtocolError
  ("bad_tensor")`` naming the input index and what was wrong.
- CUDA readiness is by host synchronization, not IPC events: the client synchronizes its
  stream before sending, the daemon before replying, so handles are opened with
  ``event_sync_required=False`` (a cross-process event wait costs ~260 us, NOTES.md 2).
- Each IPC export is opened at most once per cache (``IpcImportCache``), and closed exactly
  once when evicted or when its session ends; closing decrements the producer's reference
  counter as PyTorch's own consumers do, so the producer's block leaves its limbo.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from cgtree.daemon.protocol import ProtocolError
from cgtree.liveness import TensorGeometry as LayoutGeometry
from cgtree.liveness import tensor_on

# The allow-list of dtypes accepted on the wire; names are torch's own (str(dtype) minus "torch.").
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

MAX_DIMS = 16
MAX_DIM_SIZE = 2**48
CUDA_IPC_HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t)
# torch wraps shareable handles as [version byte][type byte][payload] (c10's CUDA caching
# allocator: type 'c' is a plain cudaMalloc block whose payload is the 64-byte IPC handle; 'e'
# is an expandable segment, which needs file descriptors ZeroMQ cannot carry). Older torch
# sent the raw 64 bytes.
_SHAREABLE_CUDA_MALLOC = ord("c")


def is_cuda_malloc_ipc_handle(handle: bytes) -> bool:
    """Whether ``handle`` (from ``_share_cuda_``) is a legacy CUDA IPC handle we can send."""
    if len(handle) == CUDA_IPC_HANDLE_SIZE:
        return True
    return len(handle) == CUDA_IPC_HANDLE_SIZE + 2 and handle[1] == _SHAREABLE_CUDA_MALLOC
# PyTorch names its reference-counter shared-memory files "/torch_<pid>_<random>" and each
# holds CUDA_IPC_REF_COUNTER_FILE_SIZE counters. Closing a storage decrements one int64 in that
# file, so a descriptor may only ever name a file of that form and an offset inside it.
# Names vary across torch versions (/torch_<pid>_<n>, /torch_<pid>_<random>_<n>): accept the
# /torch_ prefix with word characters only (no further slash, no dots), at most 64 bytes.
_REF_COUNTER_NAME = re.compile(r"^/torch_[0-9A-Za-z_]{1,57}$")
_REF_COUNTER_FILE_SIZE = 10000
# Output buffers lay tensors out at this alignment (the CUDA caching allocator's own is 512).
OUTPUT_ALIGNMENT = 256


def dtype_name(dtype: torch.dtype) -> str:
    name = DTYPE_NAMES.get(dtype)
    if name is None:
        raise TypeError(f"dtype {dtype} cannot travel to cgtreed (allowed: {', '.join(DTYPES)})")
    return name


# ---------------------------------------------------------------------------------------------
# Validation (pure): a descriptor map -> checked fields, or ProtocolError naming what is wrong.


@dataclass(frozen=True)
class TensorGeometry:
    """A validated dtype, sizes, strides and storage offset (in elements)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent_bytes(self) -> int:
        """Bytes of storage the view needs from the storage start (0 for an empty tensor)."""
        if any(size == 0 for size in self.shape):
            return 0
        last = sum((size - 1) * step for size, step in zip(self.shape, self.stride))
        return (self.offset + last + 1) * self.itemsize


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPES.values()}


def contiguous_stride(shape: Iterable[int]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(tuple(shape)):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def parse_geometry(desc: dict, label: str, *, need_stride: bool) -> TensorGeometry:
    """Check dtype, shape and (if ``need_stride``) stride and offset of a descriptor."""
    dtype_text = desc.get("dtype")
    dtype = DTYPES.get(dtype_text) if isinstance(dtype_text, str) else None
    if dtype is None:
        raise ProtocolError("bad_tensor", f"{label}: dtype {dtype_text!r} is not allowed (allowed: {', '.join(DTYPES)})")
    shape = _int_list(desc.get("shape"), f"{label}: shape", minimum=0, maximum=MAX_DIM_SIZE)
    if need_stride:
        stride = _int_list(desc.get("stride"), f"{label}: stride", minimum=0, maximum=MAX_DIM_SIZE)
        if len(stride) != len(shape):
            raise ProtocolError("bad_tensor", f"{label}: stride has {len(stride)} entries for {len(shape)} dimensions")
        offset = desc.get("offset", 0)
        if not _is_int(offset) or not 0 <= offset <= MAX_DIM_SIZE:
            raise ProtocolError("bad_tensor", f"{label}: offset must be a non-negative int, got {offset!r}")
    else:
        stride, offset = contiguous_stride(shape), 0
    return TensorGeometry(dtype, tuple(shape), tuple(stride), offset)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, label: str, *, minimum: int, maximum: int) -> list[int]:
    if not isinstance(value, list):
        raise ProtocolError("bad_tensor", f"{label} must be a list of ints, got {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise ProtocolError("bad_tensor", f"{label} has {len(value)} dimensions (at most {MAX_DIMS})")
    for item in value:
        if not _is_int(item) or not minimum <= item <= maximum:
            raise ProtocolError("bad_tensor", f"{label} entries must be ints in [{minimum}, {maximum}], got {item!r}")
    return value


# ---------------------------------------------------------------------------------------------
# CPU tensors: contiguous bytes in one frame.


def cpu_frame_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer ZeroMQ can send zero-copy (copies only if not contiguous).

    The returned memoryview keeps the tensor (or its contiguous copy) alive until sent.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # numpy has no bfloat16; a byte view works for every dtype and still shares memory.
    # (numpy is a declared dependency for exactly this: torch only exposes its buffer through it.)
    return memoryview(flat.view(torch.uint8).numpy())


def describe_cpu(tensor: torch.Tensor, frame_index: int) -> dict:
    return {"kind": "cpu", "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "frame": frame_index}


def tensor_from_cpu_desc(desc: dict, frames: list, label: str) -> torch.Tensor:
    """A CPU tensor over frame ``desc["frame"]`` (zero-copy when the frame is aligned)."""
    geometry = parse_geometry(desc, label, need_stride=False)
    frame_index = desc.get("frame")
    if not _is_int(frame_index) or not 0 <= frame_index < len(frames):
        raise ProtocolError("bad_tensor", f"{label}: frame {frame_index!r} does not exist (message has {len(frames)} data frames)")
    buffer = _buffer_of(frames[frame_index])
    expected = geometry.numel * geometry.itemsize
    if len(buffer) != expected:
        raise ProtocolError(
            "bad_tensor",
            f"{label}: frame {frame_index} has {len(buffer)} bytes but dtype {desc['dtype']} shape {list(geometry.shape)} needs {expected}",
        )
    if expected == 0:
        return torch.empty(geometry.shape, dtype=geometry.dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    if raw.data_ptr() % geometry.itemsize:
        raw = raw.clone()  # ZeroMQ keeps tiny messages inline, possibly unaligned for the dtype
    return raw.view(geometry.dtype).view(geometry.shape)


def _buffer_of(frame: Any) -> memoryview:
    buffer = getattr(frame, "buffer", None)
    if buffer is None:
        buffer = memoryview(frame)
    return buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer


# ---------------------------------------------------------------------------------------------
# CUDA IPC: exporting storages (client inputs, daemon output buffers) and opening them.


def export_cuda_storage(storage: torch.UntypedStorage) -> dict:
    """``storage._share_cuda_()`` as a msgpack-ready map. Call once per storage: every call
    re-wraps the storage's memory in a new reference-counted sent-data record."""
    (device, handle, size, offset, ref, ref_offset, _event_handle, _event_sync_required) = storage._share_cuda_()
    return {"device": int(device), "handle": bytes(handle), "size": int(size), "offset": int(offset),
            "ref": bytes(ref), "ref_offset": int(ref_offset)}


def parse_ipc(ipc: Any, label: str, known_cuda_indices: Iterable[int] | None) -> tuple:
    """Validate an IPC map; returns the 8-tuple ``_new_shared_cuda`` takes."""
    if not isinstance(ipc, dict):
        raise ProtocolError("bad_tensor", f"{label}: \"storage\" must be a map of the IPC export")
    device = ipc.get("device")
    if not _is_int(device) or device < 0:
        raise ProtocolError("bad_tensor", f"{label}: storage device must be a CUDA device index, got {device!r}")
    if known_cuda_indices is not None and device not in set(known_cuda_indices):
        raise ProtocolError("bad_tensor", f"{label}: cuda:{device} is not a device this daemon serves")
    handle = ipc.get("handle")
    if not isinstance(handle, bytes) or not is_cuda_malloc_ipc_handle(handle):
        raise ProtocolError("bad_tensor", f"{label}: storage handle must be a CUDA IPC handle of a cudaMalloc block")
    size, offset = ipc.get("size"), ipc.get("offset")
    if not _is_int(size) or size < 0 or not _is_int(offset) or offset < 0:
        raise ProtocolError("bad_tensor", f"{label}: storage size and offset must be non-negative ints")
    ref, ref_offset = ipc.get("ref"), ipc.get("ref_offset")
    if not isinstance(ref, bytes) or not _REF_COUNTER_NAME.match(ref.decode("ascii", "replace")):
        raise ProtocolError("bad_tensor", f"{label}: storage ref must name a PyTorch IPC counter file (/torch_...)")
    if not _is_int(ref_offset) or not 0 <= ref_offset < _REF_COUNTER_FILE_SIZE:
        raise ProtocolError("bad_tensor", f"{label}: storage ref_offset out of range")
    return (device, handle, size, offset, ref, ref_offset, bytes(CUDA_IPC_HANDLE_SIZE), False)


def open_cuda_storage(args: tuple, label: str) -> torch.UntypedStorage:
    """Open an IPC export (cudaIpcOpenMemHandle, cached per handle by PyTorch's allocator)."""
    try:
        return torch.UntypedStorage._new_shared_cuda(*args)
    except Exception as exc:  # a stale or foreign handle: CUDA reports it, it is not sticky
        raise ProtocolError("bad_tensor", f"{label}: cannot open the CUDA IPC handle (stale or foreign?): {exc}") from None


class IpcImportCache:
    """Opened IPC storages of one session, least recently used evicted past ``capacity``.

    Keyed by the whole export (handle, offsets, counter slot): one export is opened once.
    Eviction and ``close()`` drop the storage, which closes the mapping (when it is the last
    one on that handle) and decrements the producer's counter.
    """

    def __init__(self, capacity: int = 64, opener: Callable[[tuple, str], torch.UntypedStorage] = open_cuda_storage) -> None:
        self.capacity = capacity
        self._opener = opener
        self._storages: OrderedDict[tuple, torch.UntypedStorage] = OrderedDict()

    def get(self, args: tuple, label: str) -> torch.UntypedStorage:
        key = args[:6]
        storage = self._storages.get(key)
        if storage is not None:
            self._storages.move_to_end(key)
            return storage
        storage = self._opener(args, label)
        self._storages[key] = storage
        while len(self._storages) > self.capacity:
            self._storages.popitem(last=False)
        return storage

    def __len__(self) -> int:
        return len(self._storages)

    def close(self) -> None:
        self._storages.clear()


def tensor_on_storage(storage: torch.UntypedStorage, geometry: TensorGeometry, label: str, *, byte_base: int = 0) -> torch.Tensor:
    """A view of ``geometry`` on ``storage`` (starting ``byte_base`` bytes in), bounds-checked."""
    itemsize = geometry.itemsize
    if byte_base % itemsize:
        raise ProtocolError("bad_tensor", f"{label}: byte offset {byte_base} is not a multiple of the {itemsize}-byte dtype")
    needed = byte_base + geometry.extent_bytes()
    if needed > storage.nbytes():
        raise ProtocolError("bad_tensor", f"{label}: the view needs {needed} bytes but its storage has {storage.nbytes()}")
    placed = LayoutGeometry(geometry.dtype, geometry.shape, geometry.stride,
                            geometry.offset + byte_base // itemsize, storage.device)
    return tensor_on(storage, placed)  # one C++ call on CUDA: this runs on every submit


def describe_cuda(tensor: torch.Tensor, ipc: dict) -> dict:
    return {"kind": "cuda", "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
            "stride": list(tensor.stride()), "offset": tensor.storage_offset(), "storage": ipc}


def tensor_from_cuda_desc(desc: dict, cache: IpcImportCache, label: str, known_cuda_indices: Iterable[int]) -> torch.Tensor:
    geometry = parse_geometry(desc, label, need_stride=True)
    args = parse_ipc(desc.get("storage"), label, known_cuda_indices)
    storage = cache.get(args, label)
    return tensor_on_storage(storage, geometry, label)


# ---------------------------------------------------------------------------------------------
# Output buffers: daemon-owned memory outside the graph pool that replay outputs are copied into.


@dataclass(frozen=True)
class OutputSlot:
    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_offset: int
    nbytes: int


def layout_outputs(tensors: Iterable[torch.Tensor]) -> tuple[tuple[OutputSlot, ...], int]:
    """Contiguous slots for ``tensors`` at ``OUTPUT_ALIGNMENT``; returns (slots, total bytes)."""
    slots, cursor = [], 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(OutputSlot(tensor.dtype, tuple(tensor.shape), cursor, nbytes))
        cursor += -(-nbytes // OUTPUT_ALIGNMENT) * OUTPUT_ALIGNMENT
    return tuple(slots), max(cursor, OUTPUT_ALIGNMENT)


class OutputBuffer:
    """One (session, graph) output buffer on a CUDA device: outputs of each submit are copied
    in, overwriting the previous submit's; ``generation`` counts the overwrites.

    Exported once (``ipc``); the buffer id is daemon-unique so no session can name another's.
    """

    def __init__(self, buffer_id: int, device: torch.device, slots: tuple[OutputSlot, ...], nbytes: int) -> None:
        self.buffer_id = buffer_id
        self.slots = slots
        self.nbytes = nbytes
        # A normal allocation (the daemon never allocates under a graph pool here): replay
        # outputs live in the pool and cannot be shared (NOTES.md 3).
        self.storage = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
        self.ipc = export_cuda_storage(self.storage)
        self.generation = 0
        self._views: Optional[list[torch.Tensor]] = None

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.slots) and all(
            slot.dtype == t.dtype and slot.shape == tuple(t.shape) for slot, t in zip(self.slots, tensors)
        )

    def fill(self, tensors: list[torch.Tensor]) -> list[dict]:
        """Copy ``tensors`` in (on the current stream); returns their ``output`` descriptors."""
        self.copy_in(tensors)
        return [self.describe(slot) for slot in self.slots]

    def copy_in(self, tensors: list[torch.Tensor]) -> None:
        """Copy ``tensors`` into their slots (on the current stream), a new generation."""
        self.generation += 1
        # An output may alias an input that was itself a view of this buffer (an earlier output
        # passed back in): read those before any slot is overwritten.
        own = self.storage.data_ptr()
        tensors = [t.clone() if t.untyped_storage().data_ptr() == own else t for t in tensors]
        for view, tensor in zip(self.views(), tensors):
            view.copy_(tensor)

    def views(self) -> list[torch.Tensor]:
        """A tensor over each slot (built once: the slots never move while the buffer lives)."""
        if self._views is None:
            self._views = [
                tensor_on_storage(self.storage, TensorGeometry(slot.dtype, slot.shape, contiguous_stride(slot.shape), 0),
                                  "output", byte_base=slot.byte_offset)
                for slot in self.slots
            ]
        return self._views

    def describe(self, slot: OutputSlot) -> dict:
        return {"kind": "output", "dtype": dtype_name(slot.dtype), "shape": list(slot.shape),
                "stride": list(contiguous_stride(slot.shape)), "byte_offset": slot.byte_offset,
                "buffer": self.buffer_id, "generation": self.generation}

    def wire(self) -> dict:
        return {"id": self.buffer_id, "nbytes": self.nbytes, "storage": self.ipc}

    def release_remote_reference(self) -> None:
        """The client died holding this buffer open: drop the reference it would have dropped,
        so the memory leaves PyTorch's IPC limbo when the daemon frees it."""
        try:
            torch.UntypedStorage._release_ipc_counter_cuda(self.ipc["ref"], self.ipc["ref_offset"])
        except Exception:
            pass


def tensor_from_output_desc(desc: dict, buffers: dict[int, OutputBuffer], label: str) -> torch.Tensor:
    """Daemon side: an ``output`` descriptor sent back as an input -> a view of our buffer.

    The buffer must belong to the session (``buffers``) and the generation must be current:
    an overwritten output is refused, never silently read with new values.
    """
    geometry = parse_geometry(desc, label, need_stride=True)
    buffer_id, generation, byte_offset = desc.get("buffer"), desc.get("generation"), desc.get("byte_offset", 0)
    buffer = buffers.get(buffer_id) if _is_int(buffer_id) else None
    if buffer is None:
        raise ProtocolError("bad_tensor", f"{label}: output buffer {buffer_id!r} is not one of this session's (released?)")
    if generation != buffer.generation:
        raise ProtocolError(
            "bad_tensor", f"{label}: output of buffer {buffer_id} generation {generation!r} was overwritten (now {buffer.generation})"
        )
    if not _is_int(byte_offset) or byte_offset < 0:
        raise ProtocolError("bad_tensor", f"{label}: byte_offset must be a non-negative int")
    return tensor_on_storage(buffer.storage, geometry, label, byte_base=byte_offset)
