"""Tensors and numbers -> input descriptors for cgtreed (``InputEncoder``), and device names.

CPU tensors travel as data frames; CUDA tensors of this process as CUDA IPC handles
(``_ExportCache``); an earlier output passed back in as an ``output`` reference to its buffer;
numbers as scalars. A loop over the same tensors gets the same packed bytes back without
describing anything again (``packed``), which the daemon recognizes too
(``cgtree.daemon.input_memo``).

Invariants:
- CUDA inputs are exported once per storage and cached while the storage lives; a storage that
  died may be replaced at the same address, so a cached export is used only while its storage
  is alive (weak references).
- ``settle`` synchronizes the current stream before a submit is sent: the daemon reads finished
  data without any cross-process event wait.
- Device names: the daemon's ``cuda:N`` and ours differ when ``CUDA_VISIBLE_DEVICES`` differs;
  GPUs are matched by UUID (from hello), falling back to equal indices. A client that never
  created a CUDA context names the daemon's devices directly (mapping them would create one).
- Caches are bounded (``PACKED_INPUTS_KEPT``, ``MAX_KNOWN_STREAMS``, 1024 exports), then
  forgotten all at once.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import torch

from cgtree.client.errors import ClientError
from cgtree.daemon.protocol import pack
from cgtree.daemon.tensors import (
    cpu_frame_of,
    describe_cpu,
    describe_cuda,
    dtype_name,
    export_cuda_storage,
    is_cuda_malloc_ipc_handle,
)

PACKED_INPUTS_KEPT = 256  # packed descriptor lists remembered (then forgotten all at once)
MAX_KNOWN_STREAMS = 64  # stream objects kept for InputEncoder.settle (then forgotten all at once)
_current_stream_key = getattr(torch._C, "_cuda_getCurrentStream", None)


class _ExportCache:
    """CUDA IPC exports of this process's storages, one per live storage."""

    def __init__(self) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak_ref = StorageWeakRef
        self._entries: dict[int, tuple[Any, int, dict]] = {}

    def export(self, storage: torch.UntypedStorage) -> dict:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        entry = self._entries.get(ptr)
        if entry is not None and not entry[0].expired() and entry[1] == nbytes:
            return entry[2]
        try:
            ipc = export_cuda_storage(storage)
        except Exception as exc:
            raise ClientError(
                f"cannot export a CUDA tensor to cgtreed through CUDA IPC ({exc}); memory the caching allocator "
                "does not own (outputs of CUDA graph replays, tensors received from another process, "
                "from_blob views) cannot be shared: pass a .clone()"
            ) from exc
        if not is_cuda_malloc_ipc_handle(ipc["handle"]):
            raise ClientError(
                "this CUDA allocation cannot travel as a legacy CUDA IPC handle (expandable segments?): "
                "unset PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the client"
            )
        if len(self._entries) > 1024:
            self._entries = {p: e for p, e in self._entries.items() if not e[0].expired()}
        self._entries[ptr] = (self._weak_ref(storage), nbytes, ipc)
        return ipc


class InputEncoder:
    """Input descriptors for the daemon, and this process's CUDA devices in the daemon's names."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._exports: Optional[_ExportCache] = None
        self.uuid_map: Optional[dict[int, int]] = None
        self._packed: dict[tuple, tuple[bytes, list]] = {}  # see packed
        self._packed_by_identity: dict[tuple, tuple[bytes, list]] = {}  # the same, by tensor identity
        self._streams: dict[tuple, Any] = {}  # current-stream key -> torch.cuda.Stream (see settle)
        self.wire_names: dict[str, str] = {}

    def packed(self, device: str, inputs: list) -> Optional[bytes]:
        """The descriptor list packed as bytes, when every input is a CUDA tensor of this
        process (not an earlier output) or a number; None otherwise. Remembered per the inputs'
        storages and geometry, so a loop over the same buffers packs nothing again, and the
        daemon, seeing the same bytes, reuses what it decoded (``cgtree.daemon.input_memo``)."""
        by_identity = self._packed_by_identity.get(tuple(map(id, inputs)))
        if by_identity is not None and _same_inputs(by_identity[1], inputs):
            return by_identity[0]  # the very tensors of an earlier call, unchanged: ~0.5 us each
        key, storages = [], []
        for value in inputs:
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda":
                    return None
                storage = value.untyped_storage()
                ptr = storage.data_ptr()  # raises for an overwritten output (access error set)
                if self.client.buffers.mappings and self.client.buffers.containing(ptr, value.device) is not None:
                    return None  # an earlier output: valid for one generation only
                key.append((ptr, value.storage_offset(), value.shape, value.stride(), value.dtype, value.device.index))
                storages.append(storage)
            elif isinstance(value, (bool, int, float)):
                key.append((type(value), value))
            else:
                return None
        key_tuple = (device, *key)
        hit = self._packed.get(key_tuple)
        # A storage that died may have been replaced by another at the same address: its
        # export (and so the descriptor) differs.
        if hit is not None and not any(ref.expired() for ref in hit[1]):
            return hit[0]
        descs, _ = self.encode(device, inputs)
        packed = pack(descs)
        if len(self._packed) >= PACKED_INPUTS_KEPT:
            self._packed.clear()
        if storages:
            from torch.multiprocessing.reductions import StorageWeakRef

            refs = [StorageWeakRef(s) for s in storages]
        else:
            refs = []
        self._packed[key_tuple] = (packed, refs)
        if len(self._packed_by_identity) >= PACKED_INPUTS_KEPT:
            self._packed_by_identity.clear()
        self._packed_by_identity[tuple(map(id, inputs))] = (packed, _identity_marks(inputs))
        return packed

    def encode(self, device: str, inputs: list) -> tuple[list, list]:
        descs, frames = [], []
        for index, value in enumerate(inputs):
            if isinstance(value, torch.Tensor):
                tensor = value.detach()
                if tensor.device.type == "cpu":
                    descs.append(describe_cpu(tensor, len(frames)))
                    frames.append(cpu_frame_of(tensor))
                elif tensor.device.type == "cuda":
                    descs.append(self.describe_cuda(tensor, index))
                else:
                    raise ClientError(f"input {index}: tensors on {tensor.device} cannot travel to cgtreed (cpu or cuda)")
            elif isinstance(value, (bool, int, float)):
                descs.append({"kind": "scalar", "value": value})
            else:
                raise ClientError(f"input {index}: a {type(value).__name__}; inputs are tensors or numbers")
        return descs, frames

    def describe_cuda(self, tensor: torch.Tensor, index: int) -> dict:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()  # raises for an overwritten output (access error set)
        mapping = self.client.buffers.containing(ptr, tensor.device)
        if mapping is not None:
            return {"kind": "output", "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                    "stride": list(tensor.stride()), "offset": tensor.storage_offset(),
                    "byte_offset": ptr - mapping.base_ptr, "buffer": mapping.buffer_id, "generation": mapping.generation}
        if self._exports is None:
            self._exports = _ExportCache()
        ipc = self._exports.export(storage)
        daemon_index = self.daemon_cuda_index(tensor.device.index)
        if daemon_index != ipc["device"]:
            ipc = {**ipc, "device": daemon_index}
        return describe_cuda(tensor, ipc)

    # -- device names: the daemon's "cuda:N" and ours differ when CUDA_VISIBLE_DEVICES differs;
    # -- GPUs are matched by UUID (from hello), falling back to equal indices.

    def cuda_uuid_map(self) -> dict[int, int]:
        """Our CUDA index -> the daemon's, for GPUs both see."""
        if self.uuid_map is None:
            self.client.session.ensure()
            daemon_by_uuid = {d.get("uuid"): int(d["device"].split(":")[1]) for d in self.client.devices
                              if d.get("uuid") and d["device"].startswith("cuda:")}
            mapping = {}
            if daemon_by_uuid and torch.cuda.is_available():
                for index in range(torch.cuda.device_count()):
                    uuid = _cuda_uuid(index)
                    if uuid in daemon_by_uuid:
                        mapping[index] = daemon_by_uuid[uuid]
            self.uuid_map = mapping
        return self.uuid_map

    def daemon_cuda_index(self, local_index: Optional[int]) -> int:
        local_index = torch.cuda.current_device() if local_index is None else local_index
        return self.cuda_uuid_map().get(local_index, local_index)

    def wire_device(self, local_name: str) -> str:
        # A client that never created a CUDA context names the daemon's devices directly
        # (mapping by UUID would create one: ~550 MB of GPU memory for nothing).
        if not local_name.startswith("cuda") or not torch.cuda.is_initialized():
            return local_name
        wire = self.wire_names.get(local_name)
        if wire is None:
            wire = self.wire_names[local_name] = f"cuda:{self.daemon_cuda_index(torch.device(local_name).index)}"
        return wire

    def settle(self, device: str) -> None:
        """Before a submit is sent: the daemon reads our memory as soon as the request arrives, so
        it must be written; this also finishes our reads of the outputs the submit overwrites. A
        client without a CUDA context sends CPU inputs and gets CPU outputs: nothing to wait for.
        The current stream's object is kept per stream (building one costs microseconds)."""
        self.client.stream_order.settle()  # an earlier run's stream wait, before the daemon overwrites
        if not device.startswith("cuda") or not torch.cuda.is_initialized():
            return
        index = _torch_device(device).index
        if _current_stream_key is None:
            torch.cuda.current_stream(index).synchronize()
            return
        key = _current_stream_key(index)  # (stream id, device index, device type)
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) >= MAX_KNOWN_STREAMS:
                self._streams.clear()
            stream = self._streams[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        stream.synchronize()


def _identity_marks(inputs: list) -> list:
    """What ``_same_inputs`` checks later: a weak reference to each tensor (the same object,
    still alive) with the address and geometry it had; numbers by value."""
    marks = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            marks.append((weakref.ref(value), value.data_ptr(), value.shape, value.stride()))
        else:
            marks.append((None, value, type(value), None))
    return marks


def _same_inputs(marks: list, inputs: list) -> bool:
    """Whether ``inputs`` are the objects ``marks`` saw, at the same address and geometry (a
    tensor re-pointed with ``set_``/``resize_`` is not the same input)."""
    for mark, value in zip(marks, inputs):
        ref, first, second, stride = mark
        if ref is None:
            if value != first or type(value) is not second:
                return False
        elif ref() is not value or value.data_ptr() != first or value.shape != second or value.stride() != stride:
            return False
    return True


def _as_input_list(inputs: Any) -> list:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return list(inputs)


@functools.lru_cache(maxsize=64)
def _torch_device(name: str) -> torch.device:
    return torch.device(name)


def _normalize_device(device: Any) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type


def _cuda_uuid(index: int) -> Optional[str]:
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else None


def _device_name_only(name: Optional[str]) -> Optional[str]:
    """``"cuda"`` -> ``"cuda:0"`` without touching CUDA (this process may have none)."""
    if name is None:
        return None
    device = torch.device(name)
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type


def _device_of(inputs: list) -> str:
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return _normalize_device(value.device)
    return "cpu"
